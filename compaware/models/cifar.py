"""The CIFAR-10 networks of SSL (docs/papers.md, Wen et al. 2016): ResNet-20/32 and the ConvNet.

Plain ``nn.Sequential`` of standard modules with named layers, like the LeNets, so they
trace, export and prune, and stats read ``conv1``, ``layer2.0.conv1``…
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock

STAGE_WIDTHS = (16, 32, 64)


def _stage(in_width: int, width: int, blocks: int, stride: int) -> nn.Sequential:
    """``blocks`` basic blocks; the first changes width/resolution through a projection."""
    downsample = None
    if stride != 1 or in_width != width:
        downsample = nn.Sequential(nn.Conv2d(in_width, width, 1, stride, bias=False),
                                   nn.BatchNorm2d(width))
    return nn.Sequential(BasicBlock(in_width, width, stride, downsample),
                         *(BasicBlock(width, width) for _ in range(blocks - 1)))


class CifarResNet(nn.Sequential):
    """He et al.'s CIFAR ResNet-(6n+2): a 3×3 conv of 16, three stages of n basic blocks of
    16/32/64 channels (the 2nd and 3rd halve the resolution), global average pool, fc.

    3×3 convs without bias, each followed by BN. The blocks are torchvision's ``BasicBlock``,
    so SSL's depth groups (``compaware/residual.py``) and torchvision tooling recognise them.
    Shortcuts are option B: identity, and a 1×1 conv + BN projection where width and
    resolution change (2 of the blocks), rather than option A's parameter-free zero-padding:
    option A needs a non-standard padding op, which Torch-Pruning's dependency graph cannot
    couple to the channels it pads; option B is made of standard layers and prunes exactly.
    It costs 2,560 weights (+ 192 BN parameters) over option A.
    """

    def __init__(self, blocks_per_stage: int, in_channels: int = 3, num_classes: int = 10,
                 image_size: int = 32) -> None:
        del image_size  # global average pooling: any size works
        stages, width = [], STAGE_WIDTHS[0]
        for i, stage_width in enumerate(STAGE_WIDTHS):
            stages.append((f"layer{i + 1}", _stage(width, stage_width, blocks_per_stage,
                                                   1 if i == 0 else 2)))
            width = stage_width
        super().__init__(OrderedDict([
            ("conv1", nn.Conv2d(in_channels, STAGE_WIDTHS[0], 3, padding=1, bias=False)),
            ("bn1", nn.BatchNorm2d(STAGE_WIDTHS[0])),
            ("relu", nn.ReLU()),
            *stages,
            ("avgpool", nn.AdaptiveAvgPool2d(1)),
            ("flatten", nn.Flatten()),
            ("fc", nn.Linear(width, num_classes)),
        ]))
        for m in self.modules():  # He initialisation, as torchvision's ResNets
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


def resnet20(in_channels: int = 3, num_classes: int = 10, image_size: int = 32) -> CifarResNet:
    """ResNet-20: n = 3 blocks per stage (272,474 parameters with 10 classes)."""
    return CifarResNet(3, in_channels, num_classes, image_size)


def resnet32(in_channels: int = 3, num_classes: int = 10, image_size: int = 32) -> CifarResNet:
    """ResNet-32: n = 5 blocks per stage."""
    return CifarResNet(5, in_channels, num_classes, image_size)


class WithinChannelLRN(nn.Module):
    """Caffe's LRN with ``norm_region: WITHIN_CHANNEL``, as SSL's ConvNet uses it:
    x / (1 + alpha · mean of x² over a size×size window)^beta, each channel on its own.

    ``nn.LocalResponseNorm`` is Caffe's ACROSS_CHANNELS variant: it normalises each channel
    by its neighbours, so it is another network and removing a channel would change the
    others' outputs. This one is an ``nn.AvgPool2d`` and elementwise ops: it exports, and
    channel pruning passes through it exactly.
    """

    def __init__(self, size: int = 3, alpha: float = 5e-5, beta: float = 0.75) -> None:
        super().__init__()
        self.alpha, self.beta = alpha, beta
        # Caffe's zero-padded average divides by size² everywhere: count_include_pad
        self.mean = nn.AvgPool2d(size, stride=1, padding=size // 2, count_include_pad=True)

    def forward(self, x: Tensor) -> Tensor:
        return x / (1 + self.alpha * self.mean(x * x)).pow(self.beta)


class SSLConvNet(nn.Sequential):
    """SSL's CIFAR-10 ConvNet, Caffe's ``cifar10_full`` (docs/papers.md): conv 32@5×5 →
    maxpool 3/2 → ReLU → LRN → conv 32@5×5 → ReLU → avgpool 3/2 → LRN → conv 64@5×5 → ReLU →
    avgpool 3/2 → fc 10.

    As in the official prototxt (``examples/cifar10/cifar10_full_train_test_kernel_shape``)
    every conv has padding 2 and pooling rounds up (Caffe's ceil mode), so 32×32 inputs go
    32 → 16 → 8 → 4 and the fc reads 64·4·4 = 1,024 features: 89,440 weights (89,578
    parameters). A count of 79,440 is not reachable by any padding (the convs alone hold
    79,200 weights, leaving 240 for an fc of 10 outputs); 89,440 − 79,440 = 10,000 suggests
    a typo. The prototxt's dropout on the logits is left out (not in the layer list above).
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, image_size: int = 32) -> None:
        side = image_size
        for _ in range(3):  # each 3/2 pooling with ceil mode
            side = -(-(side - 3) // 2) + 1
        super().__init__(OrderedDict([
            ("conv1", nn.Conv2d(in_channels, 32, 5, padding=2)),
            ("pool1", nn.MaxPool2d(3, 2, ceil_mode=True)),
            ("relu1", nn.ReLU()),
            ("norm1", WithinChannelLRN()),
            ("conv2", nn.Conv2d(32, 32, 5, padding=2)),
            ("relu2", nn.ReLU()),
            ("pool2", nn.AvgPool2d(3, 2, ceil_mode=True)),
            ("norm2", WithinChannelLRN()),
            ("conv3", nn.Conv2d(32, 64, 5, padding=2)),
            ("relu3", nn.ReLU()),
            ("pool3", nn.AvgPool2d(3, 2, ceil_mode=True)),
            ("flatten", nn.Flatten()),
            ("fc", nn.Linear(64 * side * side, num_classes)),
        ]))

