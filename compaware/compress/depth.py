"""Depth-wise removal: a residual block whose branch outputs zero becomes its shortcut.

A block computes relu(branch(x) + shortcut(x)). When its branch is zero (the BN ending it
has γ = β = 0, see ``compaware/residual.py``), it computes relu(shortcut(x)) exactly, in
training and in eval mode: the block is replaced by an ``nn.ReLU`` (identity shortcut) or by
its projection followed by one, and its branch convs are gone.
"""

from __future__ import annotations

from torch import nn

from compaware.compress.base import Report
from compaware.residual import branch_is_zero, residual_blocks, shortcut


def shortcut_only(block: nn.Module) -> nn.Module:
    """What ``block`` computes once its branch is zero: relu(shortcut(x))."""
    projection = shortcut(block)
    return nn.ReLU() if projection is None else nn.Sequential(projection, nn.ReLU())


def remove_zero_branches(model: nn.Module, threshold: float = 0.0) -> Report:
    """Replace, in ``model``, every residual block whose branch is zero (its last BN's |γ|,
    |β| ≤ ``threshold``; 0: exactly, outputs unchanged) by :func:`shortcut_only`. Returns
    ``{block name: {"removed": bool}}``."""
    report: Report = {}
    for name, block in residual_blocks(model):
        removed = branch_is_zero(block, threshold)
        report[name] = {"removed": removed}
        if removed:
            model.set_submodule(name, shortcut_only(block))
    return report
