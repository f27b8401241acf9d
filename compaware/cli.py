"""``compaware <command> [args]``: the console script (``train``, ``compress``, ``report``,
``export``).

``compaware train [overrides]`` is the Hydra app of :mod:`compaware.train`, exactly as
``python -m compaware.train [overrides]``: Hydra's ``--cfg job``, ``--hydra-help``, ``-m`` and
overrides all work after ``train``; ``--help`` describes the config groups and keys
(compaware/train_help.py), at once here, before torch is imported. ``compaware compress
[overrides]`` is its second app, the same run on trained weights with training skipped.
"""

from __future__ import annotations

import sys

USAGE = """usage: compaware <command> [args]

commands:
  train [overrides]   train, compress, fine-tune and benchmark one model (a Hydra app:
                      `compaware train --help` lists the config groups; -m sweeps)
  compress [overrides]
                      the same on an already-trained model, without training it:
                      init_from=<weights file> or model.weights=DEFAULT (torchvision)
  report DIR... [--out OUT]
                      tables (Markdown, CSV) and Pareto plots from run and sweep directories
  export RUN_DIR --format onnx|torchscript|pt2 [--out PATH]
                      write a run's compressed model again in a deployment format

examples:
  compaware train
  compaware train regularizer=lowrank regularizer.lam=0.5 compress.target=null compress.energy=0.9
  compaware train -m regularizer=none,lowrank
  compaware compress model=lenet5 init_from=lenet5.pt compress=prune compress.target=macs:0.5
  compaware report outputs/multirun/2026-11-21/10-00-00-000000 --out docs
  compaware export outputs/2026-11-21/10-00-00-000000 --format onnx"""


def main() -> None:
    args = sys.argv[1:]
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        sys.exit(0 if args else 2)
    if args[0] == "train":  # the help answers before the run's imports (torch: seconds)
        from compaware.train_help import describe, wants_help

        if wants_help(args[1:]):
            print(describe(args[1:]))
            sys.exit(0)
    command = args[0]
    if command == "train":
        from compaware.train import run_app

        sys.argv = [f"{sys.argv[0]} train", *args[1:]]
        run_app()
    elif command == "compress":
        from compaware.train import compress_main, run_app

        sys.argv = [f"{sys.argv[0]} compress", *args[1:]]
        run_app(compress_main)
    elif command == "report":
        from compaware.report import main as report_main

        sys.exit(report_main(args[1:]))
    elif command == "export":
        from compaware.deploy.export_cli import main as export_main

        sys.exit(export_main(args[1:]))
    else:
        print(f"compaware: unknown command {command!r}; commands: train, compress, report, "
              f"export.\n\n{USAGE}", file=sys.stderr)
        sys.exit(2)
