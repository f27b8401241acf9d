"""A small convolutional classifier of the kind a user brings to compaware.

compaware calls the factory named by ``model._target_`` with the data's ``in_channels``,
``num_classes`` and ``image_size``, but only those its signature takes: TinyNet takes the
first two and ignores the image size (its global pooling works at any size). Its other
parameters (``width``) are set on the command line with ``+model.width=…``.
"""

from __future__ import annotations

from torch import nn


class TinyNet(nn.Module):
    """Two conv blocks (conv, BatchNorm, ReLU, max-pool), global average pooling, a linear
    classifier: 2·width and 4·width channels."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(4 * width), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))
