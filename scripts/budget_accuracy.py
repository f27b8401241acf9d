"""How closely ``compress.target`` meets a budget: the share of the dense model's parameters
or MACs that remains after each compressor, asked against reached, on LeNet-5, LeNet-300-100
and ResNet-20 (randomly initialised, seed 0: the allocation, not the training, is measured).

    python scripts/budget_accuracy.py          # a Markdown table (docs/compression.md)
"""

from __future__ import annotations

import torch

from compaware.compress import SVD, Prune, PruneSVD
from compaware.deploy.bench import count_macs, count_params
from compaware.models.cifar import CifarResNet
from compaware.models.lenet import LeNet5, LeNet300

MODELS = {"LeNet-5": (LeNet5, (1, 28, 28)), "LeNet-300-100": (LeNet300, (1, 28, 28)),
          "ResNet-20": (lambda: CifarResNet(3), (3, 32, 32))}


def reached(method, make, shape: tuple[int, ...], kind: str, share: float) -> float:
    torch.manual_seed(0)
    model = make()
    compressed, _ = method(target=f"{kind}:{share}", input_shape=shape)(model)
    if kind == "params":
        return count_params(compressed) / count_params(model)
    return count_macs(compressed, shape) / count_macs(model, shape)


def main() -> None:
    print("| model | budget | svd | prune | prune+svd |\n|---|---|---|---|---|")
    for name, (make, shape) in MODELS.items():
        for kind in ("params", "macs"):
            for share in (0.5, 0.25):
                cells = [f"{reached(method, make, shape, kind, share):.4f}"
                         for method in (SVD, Prune, PruneSVD)]
                print(f"| {name} | {kind}:{share} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
