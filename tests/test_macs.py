"""count_macs counts attention: its projections and its two matmuls (QKᵀ and AV)."""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from compaware.deploy.bench import count_macs


def test_vit_macs_are_its_projections_and_attention_matmuls():
    image, patch, hidden, mlp, heads, classes = 32, 8, 16, 32, 2, 10
    model = torchvision.models.VisionTransformer(
        image_size=image, patch_size=patch, num_layers=1, num_heads=heads, hidden_dim=hidden,
        mlp_dim=mlp, num_classes=classes)
    patches = (image // patch) ** 2
    tokens = patches + 1  # the class token
    expected = (patches * hidden * 3 * patch * patch  # patch embedding (a strided conv)
                + tokens * hidden * 3 * hidden  # Q, K, V projections
                + 2 * tokens * tokens * hidden  # QKᵀ and AV, all heads together
                + tokens * hidden * hidden  # output projection
                + 2 * tokens * hidden * mlp  # MLP
                + hidden * classes)  # head, on the class token
    assert count_macs(model, (3, image, image)) == expected
    assert torch.backends.mha.get_fastpath_enabled()  # restored after counting


def test_encoder_layer_counts_the_same_in_eval_as_in_training_mode():
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    tokens = 5
    expected = tokens * 16 * 4 * 16 + 2 * tokens * tokens * 16 + 2 * tokens * 16 * 32
    assert count_macs(layer.eval(), (tokens, 16)) == expected
    assert layer.training is False
    assert count_macs(layer.train(), (tokens, 16)) == expected
