"""Global against uniform allocation at the same MACs budget, after the same fine-tuning.

For each model, one dense training run (compaware's own run, ``compress=none``); then, from
those weights, each compressor at each MACs budget twice:

- global: ``compress.target=macs:<share>``, the sizes chosen over all layers together
  (compaware/compress/budget.py), none cut by more than ``compress.max_layer_cut``
  (``--max-layer-cut``, default the config's);
- uniform: the per-layer option the same for every layer (``compress.energy`` for svd,
  ``compress.ratio`` for prune) at its weakest value whose compressed model keeps at most
  the budget's share of the MACs, found by bisection on the compressed model's MAC count.

Each compressed model is fine-tuned alike, by the run's own stages 2 and 3
(``compress_and_finetune`` in compaware/train.py), and the table puts side by side the MACs
share reached and the test accuracy after compression and after fine-tuning.

    OMP_NUM_THREADS=1 python scripts/budget_allocation.py --out /tmp/budget_allocation
    python scripts/budget_allocation.py --quick      # digits, a few steps: a smoke test
    python scripts/budget_allocation.py --model LeNet-5 --max-layer-cut 1   # one model, no floor

prints a Markdown table (docs/budgets.md). The runs stay under ``--out``; a finished one is
read back rather than redone, so an interrupted script picks up where it stopped.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from torch import nn

from compaware import checkpoint
from compaware.compress import Compressor
from compaware.compress.budget import MAX_LAYER_CUT
from compaware.config import CONF_DIR, instantiate
from compaware.costs import count_macs
from compaware.data import Data, build_data
from compaware.distributed import NoWriter
from compaware.models import build_model
from compaware.train import compress_and_finetune, train


@dataclass(frozen=True)
class Setup:
    """A model and how it is trained and fine-tuned (config overrides)."""

    label: str
    overrides: tuple[str, ...]


FULL = (
    Setup("LeNet-5", ("model=lenet5", "data=fashion_mnist", "data.limit=20000",
                      "schedule.epochs=2", "schedule.finetune_epochs=1")),
    Setup("ResNet-20", ("model=resnet20", "data=fashion_mnist", "data.limit=5000",
                        "schedule.epochs=3", "schedule.finetune_epochs=1")),
)
QUICK = tuple(Setup(s.label, (s.overrides[0], "data=digits", "debug=fast")) for s in FULL)
SHARES = (0.5, 0.25)
# compressor → (per-layer option, its weakest value: nothing removed, its strongest)
UNIFORM = {"svd": ("energy", 1.0, 1e-6), "prune": ("ratio", 0.0, 0.99)}
BISECTION_STEPS = 20


def config(setup: Setup, *overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=[*setup.overrides, "regularizer=none",
                                            "bench.latency=false", *overrides])


def finished(path: Path) -> dict | None:
    """What an earlier call of this script left at ``path``, if it got there."""
    return json.loads(path.read_text()) if path.exists() else None


def dense_run(setup: Setup, run_dir: Path) -> float:
    """Train the model once (a compaware run, nothing compressed); its test accuracy."""
    results = finished(run_dir / "results.json")
    if not results or results.get("status") != "completed":
        with redirect_stdout(sys.stderr):  # the run's summary; stdout is the table's
            results = train(config(setup, "compress=none", "schedule.finetune_epochs=0",
                                   f"paths.run_dir={run_dir}"))
    return results["accuracy"]["dense"]


@dataclass
class Trained:
    """A model with the dense run's weights, its data and what each compression starts from."""

    cfg: DictConfig
    model: nn.Module
    data: Data
    shape: tuple[int, int, int]

    @classmethod
    def load(cls, setup: Setup, run_dir: Path) -> Trained:
        cfg = config(setup)
        data = build_data(cfg.data)
        model = build_model(cfg.model, data.info)
        checkpoint.load_weights(model, run_dir)
        return cls(cfg, model, data, (data.info.channels, data.info.image_size,
                                      data.info.image_size))

    def macs_share(self, compressed: nn.Module) -> float:
        return count_macs(compressed, self.shape) / count_macs(self.model, self.shape)

    def compress_and_finetune(self, compressor: Compressor, files: Path) -> dict:
        """The run's stages 2 and 3, files in ``files``; the accuracies and the MACs share."""
        torch.manual_seed(self.cfg.seed)
        common = {"seed": self.cfg.seed, "device": torch.device("cpu"), "writer": NoWriter(),
                  "resume": False, "meta": {}, "num_workers": 0}
        tried = compress_and_finetune(compressor, files, "finetune", model=self.model,
                                      artifacts={}, data=self.data, schedule=self.cfg.schedule,
                                      seconds={}, common=common, distill=None, limit=None)
        return {**tried.accuracy, "macs": self.macs_share(tried.model)}


def weakest(share_at: Callable[[float], float], weak: float, strong: float,
            goal: float) -> float:
    """The value of a per-layer option between ``weak`` (share above ``goal``) and
    ``strong`` (at most ``goal``) closest to ``weak`` whose MACs share is at most ``goal``:
    the share falls as the option goes from ``weak`` to ``strong``."""
    if share_at(strong) > goal:
        sys.exit(f"even at {strong} the per-layer option keeps more than {goal} of the MACs")
    for _ in range(BISECTION_STEPS):
        middle = float(f"{(weak + strong) / 2:.6g}")
        if middle in (weak, strong):
            break
        if share_at(middle) <= goal:
            strong = middle
        else:
            weak = middle
    return strong


def settings(trained: Trained, name: str, node: DictConfig, allocation: str,
             share: float, max_layer_cut: float) -> dict:
    """The options of ``compress=name`` (its config: ``node``) for ``allocation`` at a MACs
    budget of ``share``."""
    if allocation == "global":
        return {"target": f"macs:{share}", "max_layer_cut": max_layer_cut}
    option, weak, strong = UNIFORM[name]

    def share_at(value: float) -> float:
        compressed, _ = build(node, {option: value})(trained.model)
        return trained.macs_share(compressed)

    return {option: weakest(share_at, weak, strong, share)}


def build(node: DictConfig, options: dict) -> Compressor:
    """``node`` with ``options``: a uniform option replaces svd's default target."""
    return instantiate(OmegaConf.merge(node, {"target": None}, options), "compress")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/budget_allocation"))
    parser.add_argument("--quick", action="store_true", help="digits and a few steps")
    parser.add_argument("--model", choices=[setup.label for setup in FULL],
                        help="only this model (default: all)")
    parser.add_argument("--max-layer-cut", type=float, default=MAX_LAYER_CUT,
                        help="compress.max_layer_cut of the global rows")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    start = time.perf_counter()
    rows = ["| model | MACs budget | compressor | allocation | setting | MACs share | "
            "accuracy compressed (%) | fine-tuned (%) |", "|---|---|---|---|---|---|---|---|"]
    for setup in QUICK if args.quick else FULL:
        if args.model and setup.label != args.model:
            continue
        folder = args.out / setup.label
        rows.append(f"| {setup.label} | dense | | | | 1 | "
                    f"{dense_run(setup, folder / 'dense'):.2f} | |")
        trained = Trained.load(setup, folder / "dense")
        for name in UNIFORM:
            node = config(setup, f"compress={name}").compress
            for share in SHARES:
                for allocation in ("global", "uniform"):
                    record = folder / f"{name}_{allocation}_{share}.json"
                    row = finished(record)
                    if row is None:
                        options = settings(trained, name, node, allocation, share,
                                           args.max_layer_cut)
                        row = {"setting": ", ".join(f"{k}={v}" for k, v in options.items()),
                               **trained.compress_and_finetune(build(node, options),
                                                               record.with_suffix(""))}
                        checkpoint.save_json(row, record)
                    finetuned = row["finetuned"]
                    rows.append(f"| {setup.label} | {share} | {name} | {allocation} | "
                                f"{row['setting']} | {row['macs']:.4f} | "
                                f"{row['compressed']:.2f} | "
                                f"{'' if finetuned is None else f'{finetuned:.2f}'} |")
    print("\n".join(rows))
    print(f"\n{time.perf_counter() - start:.0f} s, {torch.get_num_threads()} thread(s)",
          file=sys.stderr)


if __name__ == "__main__":
    main()
