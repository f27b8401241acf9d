"""The LeNets of the papers, exactly as the papers give them (docs/papers.md).

Plain ``nn.Sequential`` with named layers: nothing but standard modules, so they
trace, export and prune without special cases, and stats read ``conv1``, ``fc1``…
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence

from torch import nn


class MLP(nn.Sequential):
    """in → hidden… → classes, ReLU between: ``fc1``, ``relu1``, ``fc2``… (SSL's 784-500-300-10
    is ``hidden=[500, 300]``, 545,810 parameters on 28×28×1)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28,
                 hidden: Sequence[int] = (300, 100)) -> None:
        widths = [in_channels * image_size * image_size, *hidden]
        layers: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten())]
        for i, (width_in, width_out) in enumerate(itertools.pairwise(widths), 1):
            layers += [(f"fc{i}", nn.Linear(width_in, width_out)), (f"relu{i}", nn.ReLU())]
        layers.append((f"fc{len(widths)}", nn.Linear(widths[-1], num_classes)))
        super().__init__(OrderedDict(layers))


class LeNet300(MLP):
    """LeNet-300-100: 784 → 300 → 100 → 10 with ReLU (266,610 parameters on 28×28×1)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> None:
        super().__init__(in_channels, num_classes, image_size, hidden=(300, 100))


class LeNet5(nn.Sequential):
    """LeNet-5-Caffe: conv 20@5×5 → maxpool 2 → conv 50@5×5 → maxpool 2 → fc 500 → ReLU → fc 10.

    As in Caffe's definition there is no ReLU after the convs. 431,080 parameters on
    28×28×1; other input sizes change only fc1's width.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> None:
        side = ((image_size - 4) // 2 - 4) // 2
        super().__init__(OrderedDict([
            ("conv1", nn.Conv2d(in_channels, 20, 5)),
            ("pool1", nn.MaxPool2d(2)),
            ("conv2", nn.Conv2d(20, 50, 5)),
            ("pool2", nn.MaxPool2d(2)),
            ("flatten", nn.Flatten()),
            ("fc1", nn.Linear(50 * side * side, 500)),
            ("relu", nn.ReLU()),
            ("fc2", nn.Linear(500, num_classes)),
        ]))
