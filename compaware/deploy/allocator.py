"""Keep freed tensor memory in the process, so a forward pass does not page-fault it back.

PyTorch's CPU tensors come from the C library's ``malloc``. glibc serves a large block
(above ``M_MMAP_THRESHOLD``, 128 KiB to 32 MiB as it adapts) with a fresh ``mmap`` and hands
it back to the kernel when freed, and it trims the top of its heap above ``M_TRIM_THRESHOLD``.
A network's activations are such blocks, allocated and freed on every call: each pass then
touches fresh pages, and the kernel faults in and zeroes every 4 KiB of them. Measured on
Dec8 at batch 32 (64 px, 1 thread): 88,000 minor page faults per forward pass, 136 ms of
kernel time out of 343 ms (docs/performance.md); with the thresholds raised, no fault and
199 ms. PyTorch's CPU tuning guide points to jemalloc or
tcmalloc (``LD_PRELOAD``) for this; raising glibc's two thresholds with ``mallopt`` does the
same from inside the process, with no new dependency and no launcher.

The cost: memory a run freed stays mapped to it (its peak, up to the limit) instead of going
back to the system, for the whole process. So it is an opt-in: ``retain_freed_memory=true``
for ``compaware train`` (off by default), ``--retain-freed-memory`` for the scripts that
time models.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>
LIMIT = 1 << 30  # blocks up to 1 GiB come from the heap and stay there once freed


def retain_freed_memory(limit: int = LIMIT) -> bool:
    """Raise glibc's mmap and trim thresholds to ``limit`` bytes for this process: freed
    blocks up to that size are kept and reused instead of returned to the kernel. Returns
    whether it applied; False (logged) where the C library is not glibc."""
    libc_name, _ = platform.libc_ver()
    if libc_name != "glibc":
        log.info("freed memory goes back to the system: the C library is %s, not glibc",
                 libc_name or "unknown")
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    applied = all(libc.mallopt(option, limit) == 1
                  for option in (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD))
    if not applied:
        log.warning("glibc refused mallopt thresholds of %d bytes: freed tensor memory may "
                    "go back to the system and be page-faulted in again", limit)
    return applied
