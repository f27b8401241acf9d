"""Standalone model files: architecture and weights in one file, loadable without compaware
(``.pt2``; and ``.onnx`` and TorchScript files, for ONNX Runtime and older serving stacks).

We use ``torch.export`` (TorchScript's successor; ``torch.jit.trace`` is deprecated in
this torch). The exported program records the graph and the weights, not Python
code, and ``torch.export.load(path).module()`` gives back an ordinary callable
``nn.Module`` in any Python that has torch.

A model torch.export cannot trace (Python control flow on tensor values, say) stops with
a :class:`~compaware.config.UserError` naming the layer; ``compaware train`` checks this
before training (:func:`check_exportable`) so the run does not fail at its end.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import functools
import importlib.util
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from compaware.checkpoint import write_atomically
from compaware.config import UserError
from compaware.layers import describe_failure

log = logging.getLogger(__name__)


def trace(model: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """``model`` (a copy, on the CPU, in eval mode) as an exported program, batch size dynamic."""
    model = copy.deepcopy(model).cpu().eval()
    try:
        return torch.export.export(model, (example.cpu(),),
                                   dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))
    except Exception as e:  # torch.export's many error types, all deep inside torch
        raise UserError(
            f"The model cannot be exported with torch.export (the standalone model_*.pt2 "
            f"files): tracing {describe_failure(model, e)}. Make that layer traceable (no Python "
            f"control flow on tensor values, no data-dependent shapes) or choose another "
            f"model.") from None


def check_exportable(model: nn.Module, input_shape: tuple[int, ...]) -> None:
    """Stop with a :class:`UserError` naming the layer unless ``model`` exports."""
    trace(model, torch.zeros(2, *input_shape))


def export_model(model: nn.Module, example: torch.Tensor, path: str | Path) -> int:
    """Write ``model`` (in eval mode, batch size dynamic) to ``path``; return its size in bytes."""
    program = trace(model, example)
    path = Path(path)
    write_atomically(path, lambda f: torch.export.save(program, f))
    return path.stat().st_size


def load_exported(path: str | Path) -> nn.Module:
    """A model written by :func:`export_model`, as a plain callable module."""
    return torch.export.load(str(path)).module()


def freeze_torchscript(model: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    """``model`` traced and frozen by TorchScript (weights inlined as constants, conv+BN and
    conv+add fused by its passes): the deployment form of older serving stacks, kept for the
    inference benchmark (``scripts/bench_speedup.py``), which traces it at the batch size it
    times. torch warns that TorchScript is deprecated, and that sizes read from the input
    become constants of the trace (the strided max-pools of compaware/deploy/pooling.py do);
    those warnings are silenced here."""
    model = copy.deepcopy(model).cpu().eval()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*deprecated.*")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        with torch.no_grad():
            return torch.jit.freeze(torch.jit.trace(model, example.cpu()))


# How compile_inductor's convolutions run: "onednn", Inductor's default (weights prepacked for
# oneDNN, ReLU fused in), or "aten", left to PyTorch's own conv dispatch, which runs small
# convs through its native im2col + GEMM. oneDNN's op sets itself up on every call (a 60 µs
# call around 7 µs of work for a small conv, docs/performance.md), so at batch 1 a
# compressed network of many small convs can run faster on "aten"; at batch 32 "onednn"
# mostly is.
INDUCTOR_CONVS = ("onednn", "aten")
_PACK_CONVS = contextvars.ContextVar("compaware_pack_convs", default=True)


@functools.cache
def conv_packing_switchable() -> bool:
    """Whether :func:`compile_inductor` can compile with ``convs="aten"`` in this process.

    Inductor has no per-compile option for this: its freezing pass registers the conv
    weight-packing pattern once per process, after which ``cpp.weight_prepack`` is no longer
    read. The pattern's check, ``_is_packable_convolution``, is looked up when it registers,
    so wrapping it before the first compile lets each compile choose (torch 2.14; False,
    the switch not installed, where torch's internals differ or a compile came first)."""
    try:
        from torch._inductor.fx_passes import mkldnn_fusion
        packable = mkldnn_fusion._is_packable_convolution
        if mkldnn_fusion._mkldnn_weight_pack_init.cache_info().currsize:
            return False
    except (ImportError, AttributeError):
        return False
    mkldnn_fusion._is_packable_convolution = lambda match: _PACK_CONVS.get() and packable(match)
    return True


def inductor_convs() -> tuple[str, ...]:
    """The ``convs`` choices :func:`compile_inductor` has in this process: both of
    :data:`INDUCTOR_CONVS`, or ``onednn`` alone where the switch cannot be installed."""
    return INDUCTOR_CONVS if conv_packing_switchable() else ("onednn",)


def compile_inductor(model: nn.Module, example: torch.Tensor,
                     convs: str = "onednn") -> Callable[[torch.Tensor], object]:
    """``model`` compiled by TorchInductor for inference on batches shaped like ``example``:
    PyTorch 2's own CPU deployment path. Traced by torch.export and the graph handed to
    Inductor directly (``torch._inductor.compile``), weights frozen (constant-folded and,
    with ``convs="onednn"``, prepacked for oneDNN's convolutions; ``"aten"``: see
    :data:`INDUCTOR_CONVS`), elementwise work fused, and the kernels launched from C++, not
    Python (the C++ wrapper: what AOTInductor packages).
    Not through ``torch.compile``: its TorchDynamo guards and the exported module's input
    checks run in Python on every call, which cost LeNet-5 0.27 ms of its 0.59 ms at batch
    1 (measured), and compiling many models would hit its per-function
    recompilation limit. The compiled code checks its input's sizes and strides instead (a
    batch of another size raises RuntimeError). Compiled here under ``torch.inference_mode``
    (freezing needs it), like every timed call, and called once, so a timer sees only warm
    code. Compilation failures (no C++ compiler, say) stop with a :class:`UserError`."""
    available = inductor_convs()  # the switch installed before this process's first compile
    if convs not in available:
        raise ValueError(f"convs={convs!r}: this process compiles convs with "
                         f"{' or '.join(available)}")
    model = copy.deepcopy(model).cpu().eval()
    example = example.cpu()
    token = _PACK_CONVS.set(convs == "onednn")
    loaded = set(sys.modules)
    try:
        graph = torch.export.export(model, (example,)).module()
        with torch.inference_mode():
            compiled = torch._inductor.compile(graph, [example],
                                               options={"freezing": True, "cpp_wrapper": True})
            compiled(example)
    except Exception as e:  # torch.export's and Inductor's many error types
        raise UserError(f"The model cannot be compiled by TorchInductor: "
                        f"{describe_failure(model, e)}.") from None
    finally:
        _PACK_CONVS.reset(token)
        _release_compiled_modules(set(sys.modules) - loaded)
    return compiled


def _release_compiled_modules(names: set[str]) -> None:
    """Drop the process-wide references Inductor keeps to the Python modules of a compile
    (``sys.modules`` and its ``PyCodeCache``), so that they live only as long as the compiled
    callable that uses them. With weights frozen, such a module holds the model's constants:
    without this, every compile kept its model in memory for the life of the process
    (AlexNet at 112 px: +500 MB per compile, until a benchmark of many models ran out of
    memory). A torch whose cache differs keeps its modules: only memory is at stake."""
    from torch._inductor.codecache import PyCodeCache

    released = [sys.modules.pop(name) for name in names
                if name.startswith("torch._inductor.runtime.compile_tasks.")]
    try:
        PyCodeCache.modules[:] = [m for m in PyCodeCache.modules if m not in released]
        for path, module in list(PyCodeCache.modules_no_attr.items()):
            if module in released:
                del PyCodeCache.modules_no_attr[path]
    except AttributeError:
        pass


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path) -> int:
    """Write ``model`` as an ONNX file (batch size dynamic) to ``path``; return its size.

    TorchScript-based exporter: the torch.export-based one needs ``onnxscript``, which
    compaware does not require. Needs the ``onnx`` package (``pip install compaware[onnx]``).
    """
    model = copy.deepcopy(model).cpu().eval()
    path = Path(path)
    with warnings.catch_warnings(), _stdout_silenced():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*deprecated.*")
        try:
            torch.onnx.export(model, (example.cpu(),), str(path), dynamo=False,
                              input_names=["input"], output_names=["output"],
                              dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
        except ModuleNotFoundError as e:
            raise UserError(f"ONNX export needs the onnx package ({e}): pip install "
                            f"'compaware[onnx]'.") from None
        except Exception as e:  # the exporter's many error types, all deep inside torch
            raise UserError(f"The model cannot be exported to ONNX: "
                            f"{describe_failure(model, e)}.") from None
    return path.stat().st_size


def keep_onnx(model: nn.Module, example: torch.Tensor, path: str | Path) -> int | None:
    """:func:`export_onnx`, for a file a run keeps beside its results: where the ``onnx``
    package is missing or the model cannot be exported, nothing is written and one log line
    says why (None); otherwise the file's size."""
    if importlib.util.find_spec("onnx") is None:
        log.info("%s not written: ONNX export needs the onnx package (pip install "
                 "'compaware[onnx]'); the .pt2 and .pt files are written without it.", path)
        return None
    try:
        return export_onnx(model, example, path)
    except UserError as e:
        log.warning("%s not written: %s", path, e)
        return None


def export_torchscript(model: nn.Module, example: torch.Tensor, path: str | Path) -> int:
    """Write ``model`` traced and frozen by TorchScript (:func:`freeze_torchscript`, traced
    at ``example``) to ``path``, for serving stacks that load ``torch.jit.load`` files;
    return its size. A model that cannot be traced stops with a :class:`UserError`."""
    try:
        frozen = freeze_torchscript(model, example)
    except Exception as e:  # the tracer's many error types, all deep inside torch
        raise UserError(f"The model cannot be traced by TorchScript: "
                        f"{describe_failure(model, e)}.") from None
    path = Path(path)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*deprecated.*")
        write_atomically(path, lambda f: torch.jit.save(frozen, f))
    return path.stat().st_size


@contextlib.contextmanager
def _stdout_silenced() -> Iterator[None]:
    """The process's standard output (file descriptor 1) sent to /dev/null for the block.
    torch 2.14's TorchScript ONNX exporter switches its C++ log on for every export (it
    tests ``_C._jit_is_onnx_log_enabled`` without calling it), and where an export fails,
    that log prints the whole TorchScript graph to stdout, hundreds of lines before the
    clear error :func:`export_onnx` raises."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def onnxruntime_forward(model: nn.Module, example: torch.Tensor, path: str | Path,
                        threads: int) -> Callable[[torch.Tensor], list]:
    """``model`` exported to ONNX at ``path`` (:func:`export_onnx`, traced at ``example``'s
    batch size, which a traced module may fix) and run by ONNX Runtime's CPU provider with
    ``threads`` intra-op threads: a forward function of a CPU batch. A missing onnxruntime
    or a model that cannot be exported stops with a :class:`UserError`."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError("onnxruntime is not installed: pip install 'compaware[onnx]'.") from None
    export_onnx(model, example, path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"input": x.numpy()})
