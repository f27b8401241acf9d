"""Per-layer table of an SSL run, as SSL's Tables 1-2 report it: live filters, channels and
filter size (columns) of each conv, its MACs, and its measured CPU time before and after.

    python scripts/ssl_layers.py outputs/<date>/<time> [--batch 32] [--threads 1]

Reads the run's config and its trained dense weights (``checkpoints/train.pt``). For each
conv, side by side in this process, on the layer's real input shape:
- ``conv``: the dense ``nn.Conv2d`` (oneDNN);
- ``shape``: the live-column module ``compress=ssl`` builds (gathers the im2col rows of the
  live columns only, one GEMM);
  ``lowered``: the same module with every column live, i.e. im2col + dense GEMM, the
  baseline of SSL's speed-ups (Caffe lowers every conv this way);
- ``filter+channel``: an ``nn.Conv2d`` of the shape that removing the zero filters and zero
  input channels gives (``compress=prune`` builds it; timed here with random weights).
MACs are ``torch.utils.flop_counter``'s, per layer, batch 1.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from compaware.checkpoint import load_weights
from compaware.compress.shape import LiveColumnConv2d, live_columns
from compaware.data import DataInfo
from compaware.deploy.bench import count_macs, latency_ms
from compaware.models import build_model


def layer_inputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input each conv of ``model`` sees when ``x`` goes through it."""
    inputs: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            inputs[name] = args[0].detach()
        return hook

    hooks = [m.register_forward_hook(keep(name)) for name, m in model.named_modules()
             if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model.eval()(x)
    for hook in hooks:
        hook.remove()
    return inputs


def pruned_conv(conv: nn.Conv2d, filters: int, channels: int) -> nn.Conv2d:
    return nn.Conv2d(channels, filters, conv.kernel_size, stride=conv.stride,
                     padding=conv.padding, dilation=conv.dilation, bias=conv.bias is not None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--batch", type=int, default=32, help="batch size of the timings")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--min-run-time", type=float, default=0.5)
    args = parser.parse_args()

    results = json.loads((args.run_dir / "results.json").read_text())
    cfg = OmegaConf.create(results["config"])
    info = DataInfo(cfg.data.name, cfg.data.channels, cfg.data.image_size,
                    cfg.data.num_classes, 0)
    model = build_model(cfg.model, info)
    load_weights(model, args.run_dir)
    x = torch.randn(args.batch, info.channels, info.image_size, info.image_size)
    time = lambda m, inp: latency_ms(m, inp, args.min_run_time, args.threads)  # noqa: E731

    accuracy = results["accuracy"]
    print(f"{args.run_dir}: error dense {100 - accuracy['dense']:.2f}%, final "
          f"{100 - (accuracy['finetuned'] or accuracy['compressed']):.2f}%; "
          f"CPU ms per layer at batch {args.batch}, {args.threads} thread(s)\n")
    print("| layer | filters | channels | filter size | MACs | MACs shape | MACs filter+channel "
          "| ms conv | ms lowered | ms shape | speed-up shape (vs conv, vs lowered) "
          "| ms filter+channel | speed-up filter+channel |")
    print("|---" * 13 + "|")
    for name, inp in layer_inputs(model, x).items():
        conv = model.get_submodule(name)
        w = conv.weight.detach()
        filters = int((w.flatten(1).abs().sum(1) > 0).sum())
        channels = int((w.transpose(0, 1).flatten(1).abs().sum(1) > 0).sum())
        live = live_columns(w)
        shape = LiveColumnConv2d(conv, live)
        lowered = LiveColumnConv2d(conv, torch.arange(w[0].numel()))
        pruned = pruned_conv(conv, max(filters, 1), max(channels, 1))
        pruned_input = inp[:, : max(channels, 1)].contiguous()
        macs = count_macs(conv, inp.shape[1:])
        shape_macs = count_macs(shape, inp.shape[1:])
        pruned_macs = count_macs(pruned, pruned_input.shape[1:]) if filters and channels else 0
        ms = {key: time(m, i) for key, (m, i) in {
            "conv": (conv, inp), "lowered": (lowered, inp), "shape": (shape, inp),
            "pruned": (pruned, pruned_input)}.items()}
        print(f"| {name} | {filters}/{w.shape[0]} | {channels}/{w.shape[1]} "
              f"| {len(live)}/{w[0].numel()} | {macs:,} | {shape_macs:,} "
              f"({100 * shape_macs / macs:.1f}%) | {pruned_macs:,} "
              f"({100 * pruned_macs / macs:.1f}%) | {ms['conv']:.3f} | {ms['lowered']:.3f} "
              f"| {ms['shape']:.3f} | {ms['conv'] / ms['shape']:.2f}×, "
              f"{ms['lowered'] / ms['shape']:.2f}× | {ms['pruned']:.3f} "
              f"| {ms['conv'] / ms['pruned']:.2f}× |")


if __name__ == "__main__":
    main()
