"""The clock latency-aware compression times candidate layers with (``compress.latency_aware``).

A compressor gets its timer from outside (``compressor(model, artifacts, timer=...)``), so
that compression needs nothing of the deployment forms: ``compaware/train.py`` builds a
:class:`LayerTimer` in the form ``compress.latency_form`` names, and tests hand in a fake
clock. Any ``Callable[[nn.Module, Tensor], float]`` giving seconds will do
(:data:`compaware.compress.base.Timer`). It times single layers and, for a latency budget
(``compress.target=latency:<share>``), whole models, dense and compressed.
"""

from __future__ import annotations

import tempfile
import weakref
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from compaware.deploy.bench import channels_last_forward, inference_model, median_ms
from compaware.deploy.export import compile_inductor, onnxruntime_forward

TRACED = ("onnxruntime", "inductor")  # forms built once per shape, not per call


class LayerTimer:
    """Median seconds of one inference forward pass of a layer (``torch.utils.benchmark``),
    in ``form``: ``eager`` (the module in eval mode), ``channels_last`` (a copy in NHWC,
    :func:`compaware.deploy.bench.channels_last_forward`), ``onnxruntime`` (the module exported to
    ONNX, run by ONNX Runtime's CPU provider) or ``inductor`` (compiled by TorchInductor,
    :func:`compaware.deploy.export.compile_inductor`, on an NHWC input: the layout Inductor keeps
    between the convs of a compiled network, so a layer is not charged for converting to it).
    A module with BatchNorms (a whole model) is timed as the benchmark times it, folded
    (:func:`~compaware.deploy.bench.inference_model`). A deployed layer or folded model is
    built once per weight and input shape and kept while the module lives: a compilation
    takes seconds."""

    def __init__(self, form: str = "eager", min_run_time: float = 0.05) -> None:
        self.form, self.min_run_time = form, min_run_time
        self.deployed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @torch.inference_mode()
    def __call__(self, layer: nn.Module, x: torch.Tensor) -> float:
        layer.eval()
        if self.form == "inductor" and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        folds = any(isinstance(module, _BatchNorm) for module in layer.modules())
        forward = (self.deployed_forward(layer, x) if folds or self.form in TRACED else
                   layer if self.form == "eager" else channels_last_forward(layer))
        return median_ms(forward, x, self.min_run_time, torch.get_num_threads()) / 1e3

    def deployed_forward(self, layer: nn.Module, x: torch.Tensor) -> Callable:
        """``layer`` in the deployment form, built anew only when its shapes changed (a
        pruned layer is narrowed in place between two timings)."""
        shapes = (tuple(x.shape), *(tuple(p.shape) for p in layer.parameters()))
        cached = self.deployed.get(layer)
        if cached is None or cached[0] != shapes:
            cached = self.deployed[layer] = (shapes, self.deploy(layer, x))
        return cached[1]

    def deploy(self, layer: nn.Module, x: torch.Tensor) -> Callable:
        """``layer`` with its BatchNorms folded, in the form: as it is, in NHWC, compiled by
        TorchInductor or exported to an ONNX Runtime session."""
        layer = inference_model(layer)
        if self.form in ("eager", "channels_last"):
            return layer if self.form == "eager" else channels_last_forward(layer)
        if self.form == "inductor":
            return compile_inductor(layer, x)
        with tempfile.TemporaryDirectory() as folder:  # the session holds the model
            return onnxruntime_forward(layer, x, Path(folder) / "layer.onnx",
                                       torch.get_num_threads())
