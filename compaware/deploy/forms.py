"""The inference forms compaware times a model in: one vocabulary for the benchmark
(``bench.forms``, the results.json keys ``latency_ms.<form>`` and ``efficiency_<form>``), the
latency-aware compressors (``compress.latency_form``) and the scripts (``--form``).

Every form starts from the model as exported to ``model_<name>.pt2``: an eval-mode copy with
its BatchNorms folded into the layers before them
(:func:`compaware.deploy.bench.inference_model`). Then:

- ``eager``: that model in eager PyTorch, NCHW: what the exported file runs. The reference
  (``latency_ms.eager`` and ``efficiency``).
- ``channels_last``: its 4-D weights and inputs in NHWC (``torch.channels_last``), oneDNN's
  own layout: faster at batch 32, not always at batch 1 (docs/performance.md).
- ``strided_pools``: eager, NCHW, with its max-pools rewritten as maxima of strided views
  (compaware/deploy/pooling.py), off PyTorch's slow NCHW max-pool kernel. Same outputs bit
  for bit, but not what the exported file runs (an exported graph keeps one pooling op), so
  it is a form of its own, timed only when asked for.
- ``inductor``: compiled by TorchInductor (weights frozen, C++ wrapper), each model with its
  convs on oneDNN or on PyTorch's own dispatch, whichever runs it faster (recorded).
- ``onnxruntime``: exported to ONNX and run by ONNX Runtime's CPU provider
  (``pip install 'compaware[onnx]'``).

And :data:`FASTEST`, which is not a form but a choice among forms: each model, at each batch
size, in whichever of the forms timed runs it fastest (the choice recorded), what a
deployment free to choose would run, for the dense and the compressed model alike.

This module holds names only (no compaware import), so that the config schema can check
them; compaware/deploy/bench.py builds and times the forms.
"""

from __future__ import annotations

# name → what the model runs as, in that form
FORMS: dict[str, str] = {
    "eager": "eager PyTorch, NCHW, BatchNorm folded (what the exported file runs)",
    "channels_last": "eager PyTorch, NHWC (channels_last), BatchNorm folded",
    "strided_pools": "eager PyTorch, NCHW, BatchNorm folded, max-pools as strided maxima",
    "inductor": "compiled by TorchInductor, weights frozen, convs on oneDNN or PyTorch's "
                "dispatch, whichever is faster",
    "onnxruntime": "exported to ONNX, under ONNX Runtime's CPU provider",
}

# Each model in the fastest of several forms, per batch size.
FASTEST = "fastest"

# The forms a single layer can be timed in (``compress.latency_form``): a layer has no
# max-pool to rewrite, so strided_pools times a conv or linear layer as eager does.
LAYER_FORMS = ("eager", "channels_last", "onnxruntime", "inductor")


def layer_form(form: str) -> str:
    """The form a layer of a model run in ``form`` (or :data:`FASTEST`) is timed in: the same
    where a layer has it, eager otherwise."""
    return form if form in LAYER_FORMS else "eager"
