"""The model registry: ``conf/model/<name>.yaml`` names a factory in ``_target_``.

Every factory takes ``in_channels``, ``num_classes`` and ``image_size``, filled in
from the data, so any model runs on any dataset it fits.
"""

from __future__ import annotations

from omegaconf import DictConfig
from torch import nn

from compaware.config import instantiate
from compaware.data import DataInfo


def build_model(node: DictConfig, info: DataInfo) -> nn.Module:
    return instantiate(node, "model", in_channels=info.channels, num_classes=info.num_classes,
                       image_size=info.image_size)
