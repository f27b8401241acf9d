"""Do MAC savings become wall-clock savings? Compression × model, measured on this CPU.

    python scripts/bench_speedup.py                 # make bench; a few minutes on 2 cores
    python scripts/bench_speedup.py --full          # 224×224 inputs (much longer)
    python scripts/bench_speedup.py --models lenet5 dec8 --rounds 5

For ResNet-50, AlexNet, Dec8 (DecomposeMe) and LeNet-5 (random weights: latency depends on
shapes, not values), each compressed by ``svd`` (energies), ``prune`` (ratios), SSL's shape
sparsity (a share of every conv's im2col columns zeroed, smallest norms first, then
``compress=ssl``'s live-column layers), the latency-aware variants (``round_to=8`` and
``latency_aware=true``) and the measured budgets (``target=latency:0.5`` and ``0.33``,
``round_to=8``: planned with layers timed at batch N, checked whole against the dense model),
it prints the MACs ratio (dense / compressed), the measured CPU latency ratio at batch 1 and
batch N, and the realization efficiency = latency ratio ÷ MACs ratio (1: the whole MAC saving
became time); a latency budget is met where the latency ratio at batch N is at least 1/share
(2× for 0.5, 3.03× for 0.33), within the noise control row's spread. Both models run in one
inference form (compaware/deploy/forms.py, the forms ``compaware train`` times with
``bench.forms``), each from the model as exported (``bench.inference_model``: BatchNorm
folded): ``eager`` (NCHW, what the exported file runs) by default; ``channels_last`` (NHWC),
``strided_pools`` (max-pools off PyTorch's slow NCHW kernel), ``inductor`` (compiled by
TorchInductor, frozen, C++ wrapper, each model with its convs on oneDNN or PyTorch's dispatch,
the faster kept per batch size), ``onnxruntime``, or ``fastest`` (each model in the fastest of
``--fastest-of``, all the forms by default, per batch size: what a deployment free to choose
would run) with ``--form``. The latency-aware variants and the latency budgets time in that
form (eager for ``strided_pools`` and ``fastest``) unless ``--latency-form`` names another.
Dense and compressed are timed interleaved in this process, ``--rounds`` times, and the
median of the per-round ratios is reported, so load from other processes hits both alike.

A second table compares the inference forms of each model, dense and pruned at 0.5, with
two reference rows besides them: eager with its BatchNorms (as trained) and TorchScript
frozen.

The process's allocator is left as a run leaves it (``retain_freed_memory=false``);
``--retain-freed-memory`` times as a run with ``retain_freed_memory=true`` does.
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from compaware.compress import SVD, Compressor, Prune, ShapeDepth
from compaware.compress.latency import input_shapes, stand_in
from compaware.compress.svd import choose_rank, factorize, singular_triplets
from compaware.config import UserError
from compaware.deploy.allocator import retain_freed_memory
from compaware.deploy.bench import count_macs, form_forward, inference_model, torch_threads
from compaware.deploy.export import freeze_torchscript, inductor_convs
from compaware.deploy.forms import FASTEST, FORMS, LAYER_FORMS, layer_form
from compaware.deploy.timing import LayerTimer
from compaware.layers import weight_layers, weight_matrix
from compaware.models.decomposeme import DecomposeMe
from compaware.models.lenet import LeNet5
from compaware.models.tv import torchvision_classifier

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
        return timed(ShapeDepth(min_sparsity=0.5, **options), model)
    return compress


def compressor(make: Callable[[tuple], object]) -> Callable[[nn.Module, tuple], nn.Module]:
    return lambda model, shape: timed(make(shape), model)


def timed(compress: Compressor, model: nn.Module) -> nn.Module:
    """``model`` compressed, a latency-aware compressor timing its layers as a run's does."""
    timer = LayerTimer(compress.latency.latency_form) if compress.latency_aware else None
    compressed, report = compress(model, timer=timer)
    if "budget" in report:  # a latency budget: what its own check measured
        logging.info("budget %s", report["budget"])
    return compressed


def variants(batch: int, latency_form: str) -> dict[str, Callable[[nn.Module, tuple],
                                                                   nn.Module]]:
    """The compressions benchmarked: name → (model, input shape) → compressed model. The
    latency-aware ones time their layers at ``batch`` in ``latency_form``."""
    aware_timing = {"latency_aware": True, "latency_batch": batch,
                    "latency_form": latency_form}
    aware = {"round_to": 8, **aware_timing}
    budgeted = {"round_to": 8, "latency_batch": batch, "latency_form": latency_form}
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
        "prune latency:0.5": compressor(
            lambda shape: Prune(input_shape=shape, target="latency:0.5", **budgeted)),
        "prune latency:0.33": compressor(
            lambda shape: Prune(input_shape=shape, target="latency:0.33", **budgeted)),
        "svd latency:0.5": compressor(
            lambda shape: SVD(input_shape=shape, target="latency:0.5", **budgeted)),
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
    latency_form = args.latency_form or layer_form(args.form)
    print(f"Realization efficiency = latency ratio ÷ MACs ratio; CPU, "
          f"{torch.get_num_threads()} threads, batch 1 and batch {args.batch_size}, median of "
          f"{args.rounds} interleaved rounds, both models {describe(args)}; latency-aware "
          f"layers timed {latency_form}")
    print(row(SPEEDUP_HEAD, SPEEDUP_WIDTHS))
    for name in args.models:
        dense, shape = dense_model(name, args.full)
        size = shape[-1]
        dense_macs = count_macs(dense, shape)
        batches = [torch.randn(batch_size, *shape) for batch_size in (1, args.batch_size)]
        try:  # traced forms are traced at the batch size they are timed at
            dense_forms = [inference_form(dense, args.form, batch, args.fastest_of)
                           for batch in batches]
        except UserError as e:  # e.g. an op the ONNX exporter does not support at this size
            print(f"{name} ({size}px): no {args.form} form: {str(e)[:200]}", flush=True)
            continue
        for label, compress in variants(args.batch_size, latency_form).items():
            if args.only and not any(word in label for word in args.only):
                continue
            start = time.perf_counter()
            # a variant that times while it compresses times with the threads it is measured at
            timing = "aware" in label or "latency:" in label
            with torch_threads(None if timing else args.compress_threads):
                compressed = compress(dense, shape).eval()
            macs_ratio = dense_macs / count_macs(compressed, shape)
            ratios = []
            for batch, dense_form in zip(batches, dense_forms, strict=True):
                forms = {"dense": dense_form,
                         "compressed": inference_form(compressed, args.form, batch,
                                                      args.fastest_of)}
                measured = interleaved(forms, batch, args.rounds, args.block)
                ratios.append(measured["speedup compressed"])
            efficiency = [r / macs_ratio for r in ratios]
            verdict = ("—" if macs_ratio < 2 else
                       "yes" if efficiency[1] >= 0.8 and efficiency[0] >= 0.7 else "no")
            print(row([f"{name} ({size}px)", label, f"{macs_ratio:.2f}×",
                       *(f"{r:.2f}×" for r in ratios), *(f"{e:.2f}" for e in efficiency),
                       verdict], SPEEDUP_WIDTHS), flush=True)
            logging.info("%s %s: %.0f s", name, label, time.perf_counter() - start)


def describe(args: argparse.Namespace) -> str:
    """What ``--form`` runs the models as, in words."""
    if args.form == FASTEST:
        return f"each in the fastest of {', '.join(args.fastest_of)} per batch size"
    return FORMS[args.form]


def inference_form(model: nn.Module, form: str, example: torch.Tensor,
                   among: tuple[str, ...] = tuple(FORMS)) -> Callable[[torch.Tensor], object]:
    """``model`` in an inference form (a key of ``forms.FORMS``, or ``fastest``: the fastest
    of the forms ``among`` that it can be built in), from the model as exported
    (``bench.inference_model``), callable on batches like ``example``. ``inductor``: each
    model with its convs on oneDNN or PyTorch's dispatch, whichever runs ``example`` faster,
    as ``compaware train``'s ``bench.forms=[inductor]`` keeps."""
    if form == FASTEST:
        return faster_of(available_forms(model, among, example), example)
    deployed = inference_model(model)
    if form == "inductor":
        return faster_of({convs: form_forward(form, deployed, example, convs)
                          for convs in inductor_convs()}, example)
    return form_forward(form, deployed, example)


def available_forms(model: nn.Module, forms: tuple[str, ...], example: torch.Tensor,
                    ) -> dict[str, Callable[[torch.Tensor], object]]:
    """``model`` in each of ``forms`` that this process and this model allow (ONNX Runtime
    only where it is installed and the model exports). A UserError where none is left."""
    built = {}
    for form in forms:
        try:
            built[form] = inference_form(model, form, example)
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


# The reference rows of the forms table, besides the forms: the model as trained, and
# TorchScript frozen (an older serving stack's form; not one compaware train times).
AS_TRAINED, TORCHSCRIPT = "eager, BatchNorm (as trained)", "TorchScript frozen (reference)"


def inference_forms(model: nn.Module, example: torch.Tensor) -> dict:
    """The same network as trained, in each inference form it can be built in (ONNX Runtime
    where installed) and frozen by TorchScript."""
    forms = {AS_TRAINED: model.eval()}
    for form in FORMS:
        try:
            forms[form] = inference_form(model, form, example)
        except UserError as e:  # e.g. AlexNet at 112 px has no ONNX form
            logging.warning("no %s form: %s", form, str(e)[:200])
    forms[TORCHSCRIPT] = freeze_torchscript(inference_model(model), example)
    return forms


def forms_table(args: argparse.Namespace) -> None:
    print(f"\nInference forms, CPU, {torch.get_num_threads()} threads: ms (speed-up over eager "
          f"with BatchNorm), median of {args.rounds} interleaved rounds")
    heads = ["model", "form", "b1 ms", "b1 speedup", f"b{args.batch_size} ms",
             f"b{args.batch_size} speedup"]
    label_width = max(len(label) for label in (AS_TRAINED, TORCHSCRIPT, *FORMS))
    widths = [30, label_width, 9, 10, 9, 10]
    print(row(heads, widths))
    for model_name in args.models:
        dense, shape = dense_model(model_name, args.full)
        size = shape[-1]
        with torch_threads(args.compress_threads):
            pruned = Prune(0.5, input_shape=shape)(dense)[0].eval()
        for name, model in (("dense", dense), ("prune ratio=0.5", pruned)):
            cells: dict[str, list[str]] = {}
            for batch_size in (1, args.batch_size):
                batch = torch.randn(batch_size, *shape)
                forms = inference_forms(model, batch)
                measured = interleaved(forms, batch, args.rounds, args.block)
                for form in forms:
                    cells.setdefault(form, []).extend(
                        [f"{measured[form] * 1e3:.2f}", f"{measured[f'speedup {form}']:.2f}×"])
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
    parser.add_argument("--retain-freed-memory", action="store_true",
                        help="let glibc keep freed tensor memory for reuse instead of "
                        "page-faulting it in again (compaware train's "
                        "retain_freed_memory=true; default: off, as a run)")
    parser.add_argument("--compress-threads", type=int, default=1,
                        help="torch threads while compressing (not timed; the "
                        "latency-aware and latency-budget variants time with --threads)")
    parser.add_argument("--form", choices=[*FORMS, FASTEST], default="eager",
                        help="the inference form of both models in the speedup table "
                        "(compaware/deploy/forms.py; fastest: each model in the fastest of "
                        "--fastest-of per batch size)")
    parser.add_argument("--fastest-of", nargs="+", choices=list(FORMS), default=list(FORMS),
                        help="the forms --form fastest chooses among (default: all)")
    parser.add_argument("--latency-form", choices=LAYER_FORMS,
                        help="what the latency-aware variants time their layers in (default: "
                        "the form benchmarked; eager for strided_pools and fastest)")
    parser.add_argument("--tables", nargs="+", choices=("speedup", "forms", "layers"),
                        default=["speedup", "forms", "layers"], help="which tables to print")
    parser.add_argument("--verbose", action="store_true", help="also log each row's time and, "
                        "with --form fastest or inductor, each model's chosen form (convs) per "
                        "batch size and the forms it could not build")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(message)s")
    torch.set_num_threads(args.threads)
    if args.retain_freed_memory:  # as `compaware train retain_freed_memory=true` runs
        retain_freed_memory()
    tables = {"speedup": speedup_table, "forms": forms_table, "layers": layer_kinds_table}
    for name in args.tables:
        tables[name](args)


if __name__ == "__main__":
    main()
