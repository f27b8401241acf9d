"""retain_freed_memory: a forward pass stops page-faulting its activations back in."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from compaware.deploy.allocator import retain_freed_memory

FAULTS_PER_CONV = """
import resource, sys, torch
import torch.nn.functional as F
from compaware.deploy.allocator import retain_freed_memory
if sys.argv[1] == "retain":
    assert retain_freed_memory()
torch.set_num_threads(1)
x, w = torch.randn(32, 64, 16, 16), torch.randn(256, 64, 1, 1)  # a 1x1 conv of ResNet-50's layer1
for _ in range(3):
    F.conv2d(x, w)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    F.conv2d(x, w)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


def faults_per_conv(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", FAULTS_PER_CONV, mode], capture_output=True,
                         text=True, check=True)
    return float(out.stdout.split()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
@pytest.mark.skipif(bool(os.environ.get("LD_PRELOAD") or os.environ.get("GLIBC_TUNABLES")),
                    reason="another allocator or tuned thresholds: no default to compare with")
def test_retained_memory_is_not_page_faulted_in_again():
    released, retained = faults_per_conv("release"), faults_per_conv("retain")
    # an 8 MiB output is 2048 pages: faulted in on every call unless the memory is kept
    assert released > 1000
    assert retained < 50


def test_reports_whether_it_applied():
    assert retain_freed_memory() is (platform.libc_ver()[0] == "glibc")
