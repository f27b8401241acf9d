"""Which layers a regularizer or compressor acts on, chosen by type and config.

Regularizers and compressors share this one rule, so ``regularizer.layers=conv`` and
``compress.layers=conv`` select the same modules, and no method ever names layers
by hand. :func:`dead_layers` finds those a compressed model has left with nothing.
"""

from __future__ import annotations

import inspect
import logging
import re
import traceback
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import torch.fx
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from compaware.config import check_choice

log = logging.getLogger(__name__)

LAYER_KINDS = ("all", "conv", "linear")
WEIGHT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear)


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every conv and linear layer of ``model``, in module order (the order of the forward
    pass for the models we build)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, WEIGHT_LAYERS)]


def dead_layers(model: nn.Module) -> list[str]:
    """The conv/linear layers of ``model`` that pass nothing on: a weight with a zero-size
    dimension (every unit, input or rank removed) or with every entry zero (its output no
    longer depends on its input, so neither does the model's after it). A model with one
    has collapsed, whatever its accuracy says. Cheap: one look at each weight, no forward."""
    return [name for name, m in weight_layers(model) if not m.weight.detach().any()]


class LayerSelection:
    """``layers: all|conv|linear`` plus ``skip_first``/``skip_last`` (first and last weight
    layer of the model, the ones papers often leave alone)."""

    def __init__(self, option: str, layers: str = "all", skip_first: bool = False,
                 skip_last: bool = False) -> None:
        check_choice(f"{option}.layers", layers, LAYER_KINDS)
        self.kind, self.skip_first, self.skip_last = layers, skip_first, skip_last

    def __call__(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        chosen = weight_layers(model)
        if self.skip_last:
            chosen = chosen[:-1]
        if self.skip_first:
            chosen = chosen[1:]
        if self.kind == "conv":
            return [(n, m) for n, m in chosen if not isinstance(m, nn.Linear)]
        if self.kind == "linear":
            return [(n, m) for n, m in chosen if isinstance(m, nn.Linear)]
        return chosen


def weight_matrix(layer: nn.Module) -> Tensor:
    """The layer's weight as a matrix, out × (in·kh·kw): a view, so writing it writes the layer.

    This is the reshape of Alvarez & Salzmann 2017 under which a rank-r factorization is
    r filters of in×kh×kw followed by a 1×1 conv r→out.
    """
    return layer.weight.view(layer.weight.shape[0], -1)


def is_grouped(layer: nn.Module) -> bool:
    """Grouped and depthwise convs: their weight matrix is not the layer's linear map."""
    return getattr(layer, "groups", 1) > 1


def batchnorm_after(model: nn.Module) -> dict[str, nn.Module]:
    """For each conv/linear whose output goes straight into a BatchNorm, that BatchNorm.

    Found in the forward pass traced by ``torch.fx`` (module order can lie: DenseNet's norm
    layers precede their convs), so methods that treat a unit as "filter plus its
    normalization" see the real data flow. Empty when fx cannot trace the model.
    """
    modules = dict(model.named_modules())
    return {layer: modules[norm] for layer, norm in batchnorm_pairs(model)}


class _Tracer(torch.fx.Tracer):
    """fx's tracer, keeping a module whose class sets ``fx_leaf = True`` as one call: a
    compressed layer whose forward computes shapes in Python, which fx cannot trace through
    (``compaware/compress/shape.py``), would otherwise fail the whole model's trace."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return getattr(m, "fx_leaf", False) or super().is_leaf_module(m, module_qualified_name)


def batchnorm_pairs(model: nn.Module, exclusive: bool = False) -> list[tuple[str, str]]:
    """``(layer, batchnorm)`` names for each conv/linear (or compressed layer with a
    ``fold_batchnorm`` method) whose output goes straight into a BatchNorm, from the
    ``torch.fx`` trace (empty when fx cannot trace the model).

    ``exclusive``: only pairs where the BatchNorm is the sole reader of the layer's output and
    each of the two modules runs once per forward pass: what folding the BatchNorm into the
    layer needs to leave every output unchanged.
    """
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # fx fails in many ways on data-dependent Python code
        log.warning("torch.fx cannot trace %s (%s): no BatchNorm is tied to the layer before it",
                    type(model).__name__, e)
        return []
    modules = dict(model.named_modules())
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    found = []
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], _BatchNorm):
            source = node.args[0]
            if (isinstance(source, torch.fx.Node) and source.op == "call_module"
                    and (isinstance(modules[source.target], WEIGHT_LAYERS)
                         or hasattr(modules[source.target], "fold_batchnorm"))):
                alone = (len(source.users) == 1 and calls[source.target] == 1
                         and calls[node.target] == 1)
                if alone or not exclusive:
                    found.append((source.target, node.target))
    return found


def read_by_parent(model: nn.Module, name: str) -> bool:
    """Whether the parent of layer ``name`` uses its ``weight`` tensor directly in its own
    ``forward`` (``nn.MultiheadAttention`` passes ``self.out_proj.weight`` to a functional
    kernel) rather than calling the layer: replacing such a layer by other modules breaks
    the parent. Read from the parent's source; a parent without source is assumed not to."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    try:
        source = inspect.getsource(type(parent).forward)
    except (OSError, TypeError):
        return False
    return re.search(rf"self\.{re.escape(child)}\.weight\b", source) is not None


def describe_failure(model: nn.Module, error: BaseException) -> str:
    """``"fails at <layer> (<Type>): <first line of the error>"``, for user messages."""
    layer = failing_layer(model, error)
    message = str(error).strip()
    reason = message.splitlines()[0] if message else type(error).__name__
    return f"fails{f' at {layer}' if layer else ''}: {reason}"


def failing_layer(model: nn.Module, error: BaseException) -> str | None:
    """The innermost submodule of ``model`` whose ``forward`` was running when ``error`` was
    raised, as ``"name (Type)"`` (the model's own forward if no submodule was running);
    None if the error came from outside the model.

    Read from the tracebacks of the error and of the errors it chains (tracers re-raise),
    so it names the culprit for an eager forward pass and for ``torch.export`` alike.
    """
    names = {id(m): name for name, m in model.named_modules()}
    culprit = None
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        for frame, _ in traceback.walk_tb(error.__traceback__):
            module = frame.f_locals.get("self")
            if id(module) in names:
                culprit = module
        error = error.__cause__ or error.__context__
    if culprit is None:
        return None
    kind = type(culprit).__name__
    return f"{names[id(culprit)]} ({kind})" if names[id(culprit)] else f"the model's own {kind}"


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode meanwhile, then back in the mode it was in: forward passes
    that only look at the model (tracing, recording shapes) must not move BatchNorm's
    running statistics."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
