"""What the machine can hold, checked at start: a batch or an image size that cannot fit
stops with a message naming the option, not an allocation failure deep inside torch after
minutes (or hours) of work.

The estimates are deliberately rough, made to catch sizes off by orders of magnitude (a
batch of 100,000, an image of 20,000 pixels), not to predict a peak to the megabyte:
activations are the outputs of every leaf module in one forward pass, counted on the
``meta`` device (shapes only, no memory), and training holds them all for the backward pass
along with the weights, their gradients and the optimizer's state.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from torch import nn

from compaware.config import UserError

GIB = 1 << 30
PARAMETER_COPIES = 4  # weights, gradients, momentum (or Adam's two moments, at most one more)


def available_memory(device: torch.device) -> int:
    """Bytes free for this process on ``device``: on a GPU what CUDA reports free, on the
    CPU the kernel's MemAvailable, capped by the cgroup's limit where one is set."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            free = min(free, int(limit) - used)
    except (OSError, ValueError):
        pass
    return free


def require(needed: int, what: str, options: str, device: torch.device) -> None:
    """Stop unless ``needed`` bytes fit in what ``device`` has free; the message says
    ``what`` needs them and which ``options`` size it."""
    free = available_memory(device)
    if needed > free:
        raise UserError(f"{what} needs about {needed / GIB:,.1f} GiB of memory, and this "
                        f"machine has {free / GIB:,.1f} GiB free on {device.type}: lower "
                        f"{options}.")


def activation_bytes(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[int, int] | None:
    """Bytes of the outputs of ``model``'s leaf modules for one sample (float32): all of them
    together (what training keeps for the backward pass) and the largest (what inference
    holds at once, with its input). None where the model does not run on the meta device."""
    sizes: list[int] = []

    def record(_: nn.Module, __: tuple, output: object) -> None:
        if isinstance(output, torch.Tensor):
            sizes.append(output.numel() * 4)

    meta = copy.deepcopy(model).to("meta").eval()
    hooks = [m.register_forward_hook(record) for m in meta.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            meta(torch.empty(1, *input_shape, device="meta"))
    except Exception:  # an op without a meta kernel: no estimate, the run goes on
        return None
    finally:
        for hook in hooks:
            hook.remove()
    return (sum(sizes), max(sizes)) if sizes else None


def check_batches(model: nn.Module, input_shape: tuple[int, ...], train_batch: int,
                  bench_batch: int | None, device: torch.device) -> None:
    """Stop at start where a training batch of ``train_batch`` samples (activations kept for
    backward, plus the parameters' copies) or a benchmark batch of ``bench_batch`` (None: not
    timed) cannot fit."""
    sizes = activation_bytes(model, input_shape)
    if sizes is None:
        return
    every, largest = sizes
    sample = 4 * int(torch.Size(input_shape).numel())
    weights = PARAMETER_COPIES * 4 * sum(p.numel() for p in model.parameters())
    require(train_batch * (every + sample) + weights,
            f"a training batch of {train_batch} samples of {list(input_shape)}",
            "schedule.batch_size (or data.image_size)", device)
    if bench_batch:
        require(bench_batch * (2 * largest + sample) + weights,
                f"the benchmark's batch of {bench_batch} samples of {list(input_shape)}",
                "bench.batch_size (or data.image_size)", torch.device("cpu"))
