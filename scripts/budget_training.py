"""The same MACs budgets reached two ways on LeNet-5, Fashion-MNIST: plain training, then
compression to the budget (post-hoc), against training steered toward the budget
(compaware/steering.py), then the same compression; every run with the same epochs and the
same fine-tuning.

    OMP_NUM_THREADS=1 python scripts/budget_training.py     # a Markdown table (docs/strengths.md)

Post-hoc: one plain run (``regularizer=none``), whose weights every post-hoc row compresses
(``init_from``, no training epoch) with ``compress=svd`` or ``compress=prune`` to the budget,
then fine-tunes. Steered: ``regularizer=lowrank compress=svd`` and ``regularizer=sgl
compress=prune`` trained toward the budget. Run directories go under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from compaware.config import CONF_DIR
from compaware.train import train

METHODS = {  # label: (regularizer, compressor, trained here rather than taken from plain)
    "plain + svd": ("none", "svd", False),
    "plain + prune": ("none", "prune", False),
    "lowrank steered + svd": ("lowrank", "svd", True),
    "sgl steered + prune": ("sgl", "prune", True),
}


def run(run_dir: Path, *overrides: str) -> dict:
    """One compaware run in ``run_dir``; its results (read back when it already finished)."""
    results = run_dir / "results.json"
    if not results.exists():  # each run's own summary goes to stderr, the table to stdout
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"), \
                redirect_stdout(sys.stderr):
            train(compose("config", overrides=[f"paths.run_dir={run_dir}", "bench.latency=false",
                                               *overrides]))
    return json.loads(results.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.25])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--limit", type=int, default=10_000, help="training samples used")
    parser.add_argument("--data", default="fashion_mnist")
    parser.add_argument("--out", type=Path, default=Path("outputs/budget_training"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    began = time.perf_counter()
    common = (f"data={args.data}", f"data.limit={args.limit}", "model=lenet5",
              f"schedule.finetune_epochs={args.finetune_epochs}")
    plain = args.out / "plain"
    run(plain, *common, f"schedule.epochs={args.epochs}", "regularizer=none", "compress=none",
        "schedule.finetune_epochs=0")
    rows = ["| MACs budget | method | MACs left by training | MACs reached | parameters "
            "| accuracy trained | compressed | fine-tuned |", "|---|---|---|---|---|---|---|---|"]
    for share in args.budgets:
        for label, (regularizer, compressor, trained) in METHODS.items():
            setting = (f"regularizer={regularizer}", f"compress={compressor}",
                       f"compress.target=macs:{share}")
            start = ((f"schedule.epochs={args.epochs}",) if trained else
                     (f"init_from={plain}", "schedule.epochs=0"))
            name = f"{label.split()[0]}_{compressor}_{share}"
            results = run(args.out / name, *common, *setting, *start)
            accuracy = results["accuracy"]
            left = results["steering"]["remaining"] if "steering" in results else 1.0
            reached = results["macs"]["compressed"] / results["macs"]["dense"]
            fewer = results["params"]["dense"] / results["params"]["compressed"]
            rows.append(f"| {share} | {label} | {left:.3f} | {reached:.3f} | {fewer:.2f}× fewer "
                        f"| {accuracy['dense']:.2f} | {accuracy['compressed']:.2f} "
                        f"| {accuracy['finetuned']:.2f} |")
    print(f"LeNet-5, {args.data} ({args.limit} training samples), {args.epochs} epochs, "
          f"{args.finetune_epochs} of fine-tuning; {time.perf_counter() - began:.0f} s\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
