"""Do MAC savings become wall-clock savings? Compression × model, measured on this CPU.

    python scripts/bench_speedup.py                 # make bench; a few minutes on 2 cores
    python scripts/bench_speedup.py --full          # 224×224 inputs (much longer)
    python scripts/bench_speedup.py --models lenet5 dec8 --rounds 5

For ResNet-50, AlexNet, Dec8 (DecomposeMe) and LeNet-5 (random weights: latency depends on
shapes, not values), each compressed by ``svd`` (energies), ``prune`` (ratios), SSL's shape
sparsity (a share of every conv's im2col columns zeroed, smallest norms first, then
``compress=ssl``'s live-column layers) and the latency-aware variants (``round_to=8`` and
``latency_aware=true``), it prints the MACs ratio (dense / compressed), the measured CPU
latency ratio at batch 1 and batch N, and the realization efficiency = latency ratio ÷ MACs
ratio (1: the whole MAC saving became time). Both models run in one inference form,
BatchNorm folded, max-pools off PyTorch's slow NCHW kernel (``bench.inference_model``):
eager PyTorch (NCHW, what a run's benchmark times) by default; NHWC
(``channels_last``), each model in whichever of the two layouts runs it faster at each batch
size (``fastest``: what a deployment would pick), TorchScript frozen, compiled by
TorchInductor (``inductor``: frozen, C++ wrapper, convs prepacked for oneDNN;
``inductor_aten``: convs left to PyTorch's own dispatch; ``inductor_fastest``: each model
compiled both ways, the faster kept per batch size), ONNX Runtime, or each model in the
fastest of all of these (``best``: what a deployment free to choose would run) with
``--form``; the latency-aware variants time their layers in that form (in NCHW eager for
``fastest``, ``best`` and TorchScript, on oneDNN for the Inductor forms) unless
``--latency-form`` names another. Dense and compressed are timed interleaved in this
process, ``--rounds`` times, and the median of the per-round ratios is reported, so load
from other processes hits both alike.

A second table compares inference forms of each model, dense and pruned at 0.5: eager with
BatchNorm, BatchNorm folded and max-pools swapped (NCHW and channels_last), TorchScript
frozen, compiled by TorchInductor and ONNX Runtime (when installed).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from compaware.allocator import retain_freed_memory  # noqa: E402
from compaware.bench import (  # noqa: E402
    channels_last_forward,
    count_macs,
    inference_model,
    torch_threads,
)
from compaware.compress import SVD, Prune, ShapeDepth  # noqa: E402
from compaware.compress.latency import LATENCY_FORMS, input_shapes  # noqa: E402
from compaware.compress.prune import stand_in  # noqa: E402
from compaware.compress.svd import choose_rank, factorize, singular_triplets  # noqa: E402
from compaware.config import UserError  # noqa: E402
from compaware.export import (  # noqa: E402
    compile_inductor,
    freeze_torchscript,
    inductor_convs,
    onnxruntime_forward,
)
from compaware.layers import weight_layers, weight_matrix  # noqa: E402
from compaware.models.decomposeme import DecomposeMe  # noqa: E402
from compaware.models.lenet import LeNet5  # noqa: E402
from compaware.models.tv import torchvision_classifier  # noqa: E402

logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
import torch.utils.benchmark as benchmark  # noqa: E402

# name → (builder taking the image size, channels, reduced image size, full image size)
MODELS: dict[str, tuple[Callable[[int], nn.Module], int, int, int]] = {
    "resnet50": (lambda size: torchvision_classifier("resnet50", 3, 1000, size), 3, 64, 224),
    "alexnet": (lambda size: torchvision_classifier("alexnet", 3, 1000, size), 3, 112, 224),
    "dec8": (lambda size: DecomposeMe("dec8", in_channels=3, num_classes=1000,
                                      image_size=size), 3, 64, 224),
    "lenet5": (lambda size: LeNet5(1, 10, size), 1, 28, 28),
}


def dense_model(name: str, full: bool) -> tuple[nn.Module, tuple[int, int, int]]:
    """Model ``name`` with seeded random weights in eval mode, and its input (C, H, W) at the
    reduced (or, with ``full``, the full) image size."""
    build, channels, small, large = MODELS[name]
    size = large if full else small
    torch.manual_seed(0)
    return build(size).eval(), (channels, size, size)


def zero_columns(model: nn.Module, share: float) -> nn.Module:
    """SSL's shape-wise result, emulated: in every conv, the ``share`` of im2col columns
    W[:, c, h, w] with the smallest ℓ2 norms set to exactly zero (in a copy)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for _, layer in weight_layers(model):
            if isinstance(layer, nn.Conv2d) and layer.groups == 1:
                columns = layer.weight.flatten(1)
                dead = columns.norm(dim=0).argsort()[:int(share * columns.shape[1])]
                columns[:, dead] = 0
    return model


def ssl_shape(share: float, **latency) -> Callable[[nn.Module, tuple], nn.Module]:
    """SSL's shape-wise result (``zero_columns``) compressed by ``compress=ssl``; ``latency``:
    its latency-aware options (the input shape is added)."""
    def compress(model: nn.Module, shape: tuple) -> nn.Module:
        model = zero_columns(model, share)
        options = {"input_shape": shape, **latency} if latency else {}
        return ShapeDepth(min_sparsity=0.5, **options)(model)[0]
    return compress


def compressor(make: Callable[[tuple], object]) -> Callable[[nn.Module, tuple], nn.Module]:
    return lambda model, shape: make(shape)(model)[0]


def latency_form_of(form: str) -> str:
    """The form the latency-aware variants time their layers in by default: the form
    benchmarked (NCHW eager for TorchScript, ``fastest`` and ``best``; on oneDNN for the
    Inductor forms)."""
    return ("inductor" if form.startswith("inductor") else form if form in LATENCY_FORMS
            else "eager")


def variants(batch: int, latency_form: str) -> dict[str, Callable[[nn.Module, tuple],
                                                                   nn.Module]]:
    """The compressions benchmarked: name → (model, input shape) → compressed model. The
    latency-aware ones time their layers at ``batch`` in ``latency_form``."""
    aware_timing = {"latency_aware": True, "latency_batch": batch,
                    "latency_form": latency_form}
    aware = {"round_to": 8, **aware_timing}
    return {
        "none (noise control)": lambda model, shape: copy.deepcopy(model),
        "svd energy=0.5": compressor(lambda shape: SVD(energy=0.5)),
        "svd energy=0.3": compressor(lambda shape: SVD(energy=0.3)),
        "svd energy=0.5 round8": compressor(lambda shape: SVD(energy=0.5, round_to=8)),
        "svd energy=0.5 round8+aware": compressor(
            lambda shape: SVD(energy=0.5, input_shape=shape, **aware)),
        "svd energy=0.3 round8+aware": compressor(
            lambda shape: SVD(energy=0.3, input_shape=shape, **aware)),
        "prune ratio=0.5": compressor(lambda shape: Prune(0.5, input_shape=shape)),
        "prune ratio=0.7": compressor(lambda shape: Prune(0.7, input_shape=shape)),
        "prune ratio=0.5 round8": compressor(
            lambda shape: Prune(0.5, input_shape=shape, round_to=8)),
        "prune ratio=0.5 round8+aware": compressor(
            lambda shape: Prune(0.5, input_shape=shape, **aware)),
        "prune ratio=0.7 round8+aware": compressor(
            lambda shape: Prune(0.7, input_shape=shape, **aware)),
        "ssl shape 50%": ssl_shape(0.5),
        "ssl shape 75%": ssl_shape(0.75),
        "ssl shape 50% +aware": ssl_shape(0.5, **aware_timing),
        "ssl shape 75% +aware": ssl_shape(0.75, **aware_timing),
    }


@torch.inference_mode()
def interleaved(models: dict[str, Callable], batch: torch.Tensor, rounds: int,
                block: float) -> dict[str, float]:
    """Seconds per call of each model, and each one's speed-up over the first.

    The models take turns, one block of about ``block`` seconds each (a
    ``torch.utils.benchmark`` measurement of a fixed number of calls), ``rounds`` times over,
    so a burst of load from other processes hits neighbouring blocks of every model alike.
    Reported: each model's median block, and ``speedup <name>``, the median over the rounds
    of first model's block ÷ this one's.
    """
    timers = {name: benchmark.Timer(stmt="model(batch)", globals={"model": m, "batch": batch},
                                    num_threads=torch.get_num_threads())
              for name, m in models.items()}
    calls = {name: max(1, int(block / timer.timeit(1).median))  # after one warm-up call
             for name, timer in timers.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, timer in timers.items():
            times[name].append(timer.timeit(calls[name]).median)
    first = next(iter(models))
    result = {name: statistics.median(t) for name, t in times.items()}
    for name in models:
        result[f"speedup {name}"] = statistics.median(
            a / b for a, b in zip(times[first], times[name], strict=True))
    return result


def row(cells: list[str], widths: list[int]) -> str:
    return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                     enumerate(zip(cells, widths, strict=True)))


SPEEDUP_HEAD = ["model (input)", "compression", "MACs ratio", "lat b1", "lat bN", "eff b1",
                "eff bN", "≥2×: eff bN≥0.8, b1≥0.7"]
SPEEDUP_WIDTHS = [18, 28, 10, 7, 7, 7, 7, 22]


def speedup_table(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        _speedup_table(args, Path(tmp))


def _speedup_table(args: argparse.Namespace, workdir: Path) -> None:
    latency_form = args.latency_form or latency_form_of(args.form)
    print(f"Realization efficiency = latency ratio ÷ MACs ratio; CPU, "
          f"{torch.get_num_threads()} threads, batch 1 and batch {args.batch_size}, median of "
          f"{args.rounds} interleaved rounds, both models {FORMS[args.form]}; latency-aware "
          f"layers timed {latency_form}")
    print(row(SPEEDUP_HEAD, SPEEDUP_WIDTHS))
    for name in args.models:
        dense, shape = dense_model(name, args.full)
        size = shape[-1]
        dense_macs = count_macs(dense, shape)
        batches = [torch.randn(batch_size, *shape) for batch_size in (1, args.batch_size)]
        try:  # traced forms are traced at the batch size they are timed at
            dense_forms = [inference_form(dense, args.form, batch, workdir) for batch in batches]
        except UserError as e:  # e.g. an op the ONNX exporter does not support at this size
            print(f"{name} ({size}px): no {FORMS[args.form]} form: {str(e)[:200]}", flush=True)
            continue
        for label, compress in variants(args.batch_size, latency_form).items():
            if args.only and not any(word in label for word in args.only):
                continue
            start = time.perf_counter()
            with torch_threads(args.compress_threads):
                compressed = compress(dense, shape).eval()
            macs_ratio = dense_macs / count_macs(compressed, shape)
            ratios = []
            for batch, dense_form in zip(batches, dense_forms, strict=True):
                forms = {"dense": dense_form,
                         "compressed": inference_form(compressed, args.form, batch, workdir)}
                measured = interleaved(forms, batch, args.rounds, args.block)
                ratios.append(measured["speedup compressed"])
            efficiency = [r / macs_ratio for r in ratios]
            verdict = ("—" if macs_ratio < 2 else
                       "yes" if efficiency[1] >= 0.8 and efficiency[0] >= 0.7 else "no")
            print(row([f"{name} ({size}px)", label, f"{macs_ratio:.2f}×",
                       *(f"{r:.2f}×" for r in ratios), *(f"{e:.2f}" for e in efficiency),
                       verdict], SPEEDUP_WIDTHS), flush=True)
            logging.info("%s %s: %.0f s", name, label, time.perf_counter() - start)


FORMS = {"eager": "eager, BN folded, max-pools strided", "channels_last": "eager, BN folded, NHWC",
         "fastest": "eager, BN folded, each in its faster layout (NCHW, max-pools strided, or "
                    "NHWC) per batch size",
         "torchscript": "TorchScript frozen", "inductor": "compiled by TorchInductor, frozen",
         "inductor_aten": "compiled by TorchInductor, frozen, convs on PyTorch's dispatch",
         "inductor_fastest": "compiled by TorchInductor, frozen, each with its convs on oneDNN or "
                             "PyTorch's dispatch, whichever is faster per batch size",
         "onnxruntime": "ONNX Runtime",
         "best": "each in the fastest of eager NCHW, eager NHWC, TorchInductor (convs on oneDNN "
                 "or PyTorch's dispatch) and ONNX Runtime, per batch size"}
# The forms that time each model in every one of several other forms and keep the fastest,
# for the dense and the compressed model alike: what a deployment would pick.
CHOOSING_FORMS = {"fastest": ("eager", "channels_last"),
                  "inductor_fastest": ("inductor", "inductor_aten"),
                  "best": ("eager", "channels_last", "inductor", "inductor_aten", "onnxruntime")}


def inference_form(model: nn.Module, form: str, example: torch.Tensor,
                   workdir: Path) -> Callable[[torch.Tensor], object]:
    """``model`` in an inference form (a key of FORMS), BatchNorm folded and max-pools swapped
    (``bench.inference_model``), callable on a batch."""
    if form in CHOOSING_FORMS:
        return faster_of(available_forms(model, CHOOSING_FORMS[form], example, workdir), example)
    deployed = inference_model(model)
    if form == "eager":
        return deployed
    if form == "channels_last":
        return channels_last_forward(deployed)
    if form == "torchscript":
        return freeze_torchscript(deployed, example)
    if form in ("inductor", "inductor_aten"):
        return compile_inductor(deployed, example,
                                "aten" if form == "inductor_aten" else "onednn")
    return onnxruntime_forward(deployed, example, workdir / f"{id(model)}_{len(example)}.onnx",
                               torch.get_num_threads())


def available_forms(model: nn.Module, forms: tuple[str, ...], example: torch.Tensor,
                    workdir: Path) -> dict[str, Callable[[torch.Tensor], object]]:
    """``model`` in each of ``forms`` that this process and this model allow: Inductor's
    convs on PyTorch's dispatch only where the switch is installed
    (``export.inductor_convs``), ONNX Runtime only where it is installed and the model
    exports. A UserError where none is left."""
    built = {}
    for form in forms:
        if form == "inductor_aten" and "aten" not in inductor_convs():
            continue
        try:
            built[form] = inference_form(model, form, example, workdir)
        except UserError as e:  # e.g. AlexNet at 112 px has no ONNX form
            logging.info("no %s form: %s", form, str(e)[:200])
    if not built:
        raise UserError(f"none of the forms {', '.join(forms)} could be built")
    return built


def faster_of(variants: dict[str, Callable], batch: torch.Tensor,
              rounds: int = 5) -> Callable[[torch.Tensor], object]:
    """The variant of one model (its forms: NCHW or NHWC, convs on oneDNN or not, …) that
    runs ``batch`` fastest here (interleaved rounds): what a deployment would pick, chosen
    for each model and batch size, so that neither the dense nor the compressed model is
    timed in the variant that suits it less."""
    if len(variants) == 1:
        return next(iter(variants.values()))
    speedups = interleaved(variants, batch, rounds, 0.05)
    chosen = max(variants, key=lambda name: speedups[f"speedup {name}"])
    logging.info("batch %d: %s", len(batch), chosen)
    return variants[chosen]


def inference_forms(model: nn.Module, example: torch.Tensor, workdir: Path) -> dict:
    """The same network in each inference form (ONNX Runtime when installed)."""
    forms = {"eager, BatchNorm": model.eval()}
    for form, label in FORMS.items():
        if form in CHOOSING_FORMS:  # both its variants are in the table already
            continue
        if form != "onnxruntime" or importlib.util.find_spec("onnxruntime"):
            try:
                forms[label] = inference_form(model, form, example, workdir)
            except UserError as e:  # e.g. AlexNet at 112 px has no ONNX form
                logging.warning("no %s form: %s", label, str(e)[:200])
    return forms


def forms_table(args: argparse.Namespace) -> None:
    print(f"\nInference forms, CPU, {torch.get_num_threads()} threads: ms (speed-up over eager "
          f"with BatchNorm), median of {args.rounds} interleaved rounds")
    heads = ["model", "form", "b1 ms", "b1 speedup", f"b{args.batch_size} ms",
             f"b{args.batch_size} speedup"]
    label_width = max(len(label) for form, label in FORMS.items() if form not in CHOOSING_FORMS)
    widths = [30, label_width, 9, 10, 9, 10]
    print(row(heads, widths))
    for model_name in args.models:
        dense, shape = dense_model(model_name, args.full)
        size = shape[-1]
        with torch_threads(args.compress_threads):
            pruned = Prune(0.5, input_shape=shape)(dense)[0].eval()
        with tempfile.TemporaryDirectory() as tmp:
            for name, model in (("dense", dense), ("prune ratio=0.5", pruned)):
                cells: dict[str, list[str]] = {}
                for batch_size in (1, args.batch_size):
                    batch = torch.randn(batch_size, *shape)
                    forms = inference_forms(model, batch, Path(tmp))
                    measured = interleaved(forms, batch, args.rounds, args.block)
                    for form in forms:
                        cells.setdefault(form, []).extend(
                            [f"{measured[form] * 1e3:.2f}",
                             f"{measured[f'speedup {form}']:.2f}×"])
                for form, values in cells.items():
                    print(row([f"{model_name} ({size}px) {name}", form, *values], widths),
                          flush=True)


def layer_kind(layer: nn.Module) -> str:
    if isinstance(layer, nn.Linear):
        return "linear"
    kh, kw = layer.kernel_size
    return f"conv {kh}×{kw}" + (f" /{layer.stride[0]}" if layer.stride[0] > 1 else "")


@torch.no_grad()
def layer_kinds_table(args: argparse.Namespace) -> None:
    """Per layer kind: each conv/linear alone, dense against (a) its SVD pair at energy 0.5 and
    (b) a layer with half its output and half its input units (what pruning at ratio 0.5 gives
    a layer inside the network), timed interleaved on its real input shape in the network."""
    print(f"\nPer layer kind, each layer alone on its input in the network, CPU, "
          f"{torch.get_num_threads()} threads, batch {args.batch_size} (b1 in brackets): MACs "
          f"ratio, latency ratio, efficiency, summed over the layers of the kind")
    heads = ["model", "layer kind", "n", "svd MACs", "svd lat", "svd eff", "half MACs",
             "half lat", "half eff"]
    widths = [16, 14, 3, 9, 14, 14, 9, 14, 14]
    print(row(heads, widths))
    for name in [m for m in args.models if m != "lenet5"] + (["lenet5"] * ("lenet5" in
                                                                          args.models)):
        model, shape = dense_model(name, args.full)
        sums: dict[str, dict[str, list[float]]] = {}
        for batch_size in (args.batch_size, 1):
            shapes = input_shapes(model, shape, batch_size)
            for layer_name, layer in weight_layers(model):
                if getattr(layer, "groups", 1) > 1:
                    continue
                u, s, vh = singular_triplets(weight_matrix(layer).float())
                rank = choose_rank(s, 0.5, 1e-5, None)
                out_dim, in_dim = weight_matrix(layer).shape
                if rank * (out_dim + in_dim) >= out_dim * in_dim or min(out_dim, in_dim) < 2:
                    continue
                half = stand_in(layer, out_dim // 2, 0 if layer is weight_layers(model)[0][1]
                                else layer.weight.shape[1] // 2)
                x = torch.randn(shapes[layer_name])
                x_half = x[:, :half.weight.shape[1]] if x.dim() == 4 else x[..., :half.in_features]
                pair = factorize(layer, u, s, vh, rank)
                forms = {"dense": layer, "svd": pair, "half": lambda _, h=half, xh=x_half: h(xh)}
                measured = interleaved(forms, x, args.rounds, args.block)
                macs = {k: layer_macs(m, x) for k, m in (("dense", layer), ("svd", pair))}
                macs["half"] = layer_macs(half, x_half)
                entry = sums.setdefault(layer_kind(layer), {})
                for key in ("dense", "svd", "half"):
                    entry.setdefault(f"{key} ms b{batch_size}", []).append(measured[key])
                    if batch_size == 1:
                        entry.setdefault(f"{key} macs", []).append(macs[key])
        for kind, entry in sorted(sums.items()):
            cells = [name, kind, str(len(entry["dense macs"]))]
            for key in ("svd", "half"):
                macs_ratio = sum(entry["dense macs"]) / sum(entry[f"{key} macs"])
                lat = [sum(entry[f"dense ms b{b}"]) / sum(entry[f"{key} ms b{b}"])
                       for b in (args.batch_size, 1)]
                cells += [f"{macs_ratio:.2f}×", f"{lat[0]:.2f}× ({lat[1]:.2f}×)",
                          f"{lat[0] / macs_ratio:.2f} ({lat[1] / macs_ratio:.2f})"]
            print(row(cells, widths), flush=True)


def layer_macs(layer: Callable, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter:
        layer(x[:1])
    return counter.get_total_flops() // 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--only", nargs="+", help="only compressions whose label has one of "
                        "these words (svd, prune, ssl, aware, 0.5 …)")
    parser.add_argument("--full", action="store_true", help="224×224 inputs (ImageNet size)")
    parser.add_argument("--batch-size", type=int, default=32, help="the batch N")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved repetitions")
    parser.add_argument("--block", type=float, default=0.05,
                        help="seconds per measurement block (at least one call)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--release-memory", action="store_true",
                        help="let glibc hand freed tensor memory back to the system, to be "
                        "page-faulted in again (compaware train's retain_freed_memory=false)")
    parser.add_argument("--compress-threads", type=int, default=1,
                        help="torch threads while compressing (not timed)")
    parser.add_argument("--form", choices=list(FORMS), default="eager",
                        help="the inference form of both models in the speedup table")
    parser.add_argument("--latency-form", choices=LATENCY_FORMS,
                        help="what the latency-aware variants time their layers in (default: "
                        "the form benchmarked, eager for fastest, best and torchscript)")
    parser.add_argument("--tables", nargs="+", choices=("speedup", "forms", "layers"),
                        default=["speedup", "forms", "layers"], help="which tables to print")
    parser.add_argument("--verbose", action="store_true", help="also log each row's time and, "
                        "with a --form that chooses (fastest, inductor_fastest, best), each "
                        "model's chosen form per batch size and the forms it could not build")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(message)s")
    torch.set_num_threads(args.threads)
    if not args.release_memory:  # as `compaware train` runs (retain_freed_memory)
        retain_freed_memory()
    tables = {"speedup": speedup_table, "forms": forms_table, "layers": layer_kinds_table}
    for name in args.tables:
        tables[name](args)


if __name__ == "__main__":
    main()
