"""Residual blocks: the branches SSL's depth-wise groups act on and depth removal drops.

A block computes relu(branch(x) + shortcut(x)). Its branch is a chain of convs ending in a
BatchNorm; when that last BN's γ and β are zero, the branch outputs exactly 0 in training
and in eval mode, whatever its convs hold (BN's output is γ·x̂ + β). This, not "all convs
zero", is when a branch counts as zero: a zero conv followed by a BN still outputs β
(eval: β − γ·mean/√(var + ε)), a constant that must not be dropped. SSL's depth group holds
the branch convs *and* that BN's affine, so driving the group to zero produces such a branch.

Blocks are recognised by type: torchvision's ``BasicBlock`` and ``Bottleneck`` (its ResNets,
ResNeXts, wide ResNets, and compaware's CIFAR ResNets, which are built from them).
"""

from __future__ import annotations

from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck

# block type → (its branch convs, in order; the BN that ends the branch)
BRANCHES: dict[type, tuple[tuple[str, ...], str]] = {
    BasicBlock: (("conv1", "conv2"), "bn2"),
    Bottleneck: (("conv1", "conv2", "conv3"), "bn3"),
}


def _spec(block: nn.Module) -> tuple[tuple[str, ...], str]:
    return next(spec for kind, spec in BRANCHES.items() if isinstance(block, kind))


def residual_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every residual block of ``model`` (by qualified name), in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, tuple(BRANCHES))]


def branch_parameters(block: nn.Module) -> list[Tensor]:
    """The depth group of ``block``: every parameter of its branch convs and the affine of
    the BN that ends the branch."""
    convs, norm = _spec(block)
    return [p for name in (*convs, norm) for p in getattr(block, name).parameters()]


def branch_is_zero(block: nn.Module, threshold: float = 0.0) -> bool:
    """Whether the branch outputs (within ``threshold``) zero: its last BN's γ and β all have
    |·| ≤ ``threshold`` (0: exactly zero, removal changes nothing)."""
    norm = getattr(block, _spec(block)[1])
    if norm.weight is None or norm.bias is None:
        return False
    return bool(norm.weight.abs().max() <= threshold and norm.bias.abs().max() <= threshold)


def shortcut(block: nn.Module) -> nn.Module | None:
    """The block's shortcut: ``None`` for the identity, else its projection (conv + BN)."""
    return block.downsample
