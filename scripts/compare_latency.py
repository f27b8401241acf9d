"""CPU latency of standalone model files side by side, in one process, as ratios.

Runs of compaware each time their models in their own process, at whatever load the
machine had then; to compare the models of different runs, time them together:

    python scripts/compare_latency.py outputs/A/model_dense.pt2 outputs/A/model_compressed.pt2 \\
        outputs/B/model_compressed.pt2 --shape 1 28 28

prints the median forward time at batch 1 and batch N of each file and its speed-up
over the first one. The files run as exported: the ``eager`` form of compaware/deploy/forms.py
(a run's ``latency_ms.eager``). The allocator is left as a run leaves it by default
(``retain_freed_memory=false``); ``--retain-freed-memory`` times as a run with
``retain_freed_memory=true`` does.
"""

from __future__ import annotations

import argparse

import torch

from compaware.deploy.allocator import retain_freed_memory
from compaware.deploy.bench import median_ms
from compaware.deploy.export import load_exported


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="model_*.pt2 files written by compaware")
    parser.add_argument("--shape", type=int, nargs="+", default=[1, 28, 28],
                        help="one input's shape (C H W)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds per measure")
    parser.add_argument("--retain-freed-memory", action="store_true",
                        help="let glibc keep freed tensor memory for reuse (compaware train's "
                        "retain_freed_memory=true; default: off, as a run)")
    args = parser.parse_args()
    if args.retain_freed_memory:  # as `compaware train retain_freed_memory=true` timed them
        retain_freed_memory()
    models = {path: load_exported(path) for path in args.models}
    for size in (1, args.batch_size):
        batch = torch.randn(size, *args.shape)
        times = {path: median_ms(model, batch, args.min_run_time, args.threads)
                 for path, model in models.items()}
        first = times[args.models[0]]
        print(f"batch {size}, {args.threads} threads:")
        for path, ms in times.items():
            print(f"  {ms:8.3f} ms  {first / ms:5.2f}×  {path}")


if __name__ == "__main__":
    main()
