"""``compaware <command> [args]``: the console script (``train``, ``report``, ``export``).

``compaware train [overrides]`` is the Hydra app of :mod:`compaware.train`, exactly as
``python -m compaware.train [overrides]``: Hydra's ``--help``, ``--cfg job``, ``-m`` and
overrides all work after ``train``.
"""

from __future__ import annotations

import sys

USAGE = """usage: compaware <command> [args]

commands:
  train [overrides]   train, compress, fine-tune and benchmark one model (a Hydra app:
                      `compaware train --help` lists the config groups; -m sweeps)
  report DIR... [--out OUT]
                      tables (Markdown, CSV) and Pareto plots from run and sweep directories
  export RUN_DIR --format onnx|torchscript|pt2 [--out PATH]
                      write a run's compressed model again in a deployment format

examples:
  compaware train
  compaware train regularizer=lowrank regularizer.lam=0.5 compress.energy=0.9
  compaware train -m regularizer=none,lowrank
  compaware report outputs/multirun/2026-11-21/10-00-00-000000 --out docs
  compaware export outputs/2026-11-21/10-00-00-000000 --format onnx"""


def main() -> None:
    args = sys.argv[1:]
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        sys.exit(0 if args else 2)
    command = args[0]
    if command == "train":
        from compaware.train import run_app

        sys.argv = [f"{sys.argv[0]} train", *args[1:]]
        run_app()
    elif command == "report":
        from compaware.report import main as report_main

        sys.exit(report_main(args[1:]))
    elif command == "export":
        from compaware.deploy.export_cli import main as export_main

        sys.exit(export_main(args[1:]))
    else:
        print(f"compaware: unknown command {command!r}; commands: train, report, "
              f"export.\n\n{USAGE}", file=sys.stderr)
        sys.exit(2)
