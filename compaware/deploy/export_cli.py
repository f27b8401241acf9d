"""``compaware export RUN_DIR --format onnx|torchscript|pt2 [--out PATH]``: a run's compressed
model written again in a deployment format, from the trainable file the run kept
(``model_compressed.pt``, compaware/deploy/model_file.py) and the input shape recorded in it.

Every format holds the model as the run's ``model_compressed.pt2`` does: in eval mode, its
BatchNorms folded (:func:`~compaware.deploy.bench.inference_model`), traced at batch 2 with
the batch size left dynamic.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from compaware.config import UserError
from compaware.deploy.bench import inference_model
from compaware.deploy.export import export_model, export_onnx, export_torchscript
from compaware.deploy.model_file import read_model

# format → (writer, file name in the run directory)
FORMATS: dict[str, tuple[Callable, str]] = {
    "onnx": (export_onnx, "model_compressed.onnx"),
    "torchscript": (export_torchscript, "model_compressed.torchscript"),
    "pt2": (export_model, "model_compressed.pt2"),
}


def export_run(run_dir: Path, form: str, out: Path | None = None) -> tuple[Path, int]:
    """Write the compressed model of the run in ``run_dir`` in ``form`` (a key of
    :data:`FORMATS`) to ``out`` (default: the run directory's file of that format); return
    the path and its size in bytes. Problems a user can cause raise :class:`UserError`."""
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a directory. compaware export takes the directory "
                        f"of a run (the one `compaware train` printed last).")
    if form not in FORMATS:
        raise UserError(f"--format {form!r} is not an export format; the formats are "
                        f"{', '.join(FORMATS)}.")
    source = run_dir / "model_compressed.pt"
    if not source.is_file():
        raise UserError(f"{run_dir} has no model_compressed.pt, which compaware export reads: "
                        f"the run failed or was stopped before its benchmark, or was made by a "
                        f"compaware from before that file existed (its model_compressed.pt2 "
                        f"is still a standalone model). Run it again to get one.")
    kept = read_model(source)
    write, name = FORMATS[form]
    path = out or run_dir / name
    size = write(inference_model(kept.model), torch.zeros(2, *kept.input_shape), path)
    return path, size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="compaware export",
        description="Write a run's compressed model again in a deployment format, from the "
                    "trainable model_compressed.pt the run kept.")
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run directory")
    parser.add_argument("--format", required=True, dest="form", metavar="|".join(FORMATS),
                        help="the format to write")
    parser.add_argument("--out", type=Path, default=None, metavar="PATH",
                        help="where to write it (default: RUN_DIR/model_compressed.<format>)")
    args = parser.parse_args(argv)
    try:
        path, size = export_run(args.run_dir, args.form, args.out)
    except UserError as e:
        print(f"compaware export: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({size:,} bytes)")
    return 0
