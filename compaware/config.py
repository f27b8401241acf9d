"""The config schema of a run, and the checks that turn bad input into clear messages.

Hydra composes ``compaware/conf/config.yaml`` on top of :class:`RunConfig` (registered in the
ConfigStore as ``run_schema``), so the nodes the runner reads itself (``data``,
``schedule``, ``bench``, ``paths`` and the top-level keys) are typed: a wrong type or
an unknown key stops at start with OmegaConf's message naming the key. ``model``,
``regularizer`` and ``compress`` are instantiated from ``_target_``; the target's
signature is their schema and :func:`instantiate` reports a bad key with the allowed
ones. Range checks the types cannot express live in :func:`validate` and in the
constructors of the regularizers and compressors (through :func:`check_range` and
:func:`check_choice`).
"""

from __future__ import annotations

import difflib
import inspect
import math
import os
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import hydra.utils
from hydra.core.config_store import ConfigStore
from hydra.errors import CompactHydraException, InstantiationException
from omegaconf import MISSING, DictConfig, OmegaConf

from compaware.deploy.forms import FORMS

# The config tree ships inside the package (package data), so a wheel or `pip install .`
# finds it as an editable install or a plain checkout does. An absolute path, because Hydra
# reads a relative one as a Python package when the app runs from an installed console script.
CONF_DIR = str(Path(__file__).resolve().parent / "conf")
MAX_SEED = 2**32 - 1  # seeds mix with the epoch (seed × 100,003 + epoch) within 64 bits
MAX_EPOCHS = 100_000  # per stage: more is a typo, and would run for years
MAX_RUN_TIME = 60.0  # seconds per latency measurement; a benchmark times dozens


class UserError(CompactHydraException):
    """A mistake the user can fix (bad option, missing file, corrupt checkpoint).

    Hydra prints these as their message alone, without a traceback; the message
    names the option and what it accepts.
    """


class Device(StrEnum):
    cpu = "cpu"
    cuda = "cuda"
    auto = "auto"


class OptimizerName(StrEnum):
    sgd = "sgd"
    adam = "adam"
    adamw = "adamw"  # Adam with decoupled weight decay (Loshchilov & Hutter)


class LrSchedule(StrEnum):
    constant = "constant"
    step = "step"
    cosine = "cosine"


class OnNan(StrEnum):
    """What a non-finite loss does (see compaware/loop.py): stop the run, skip the batch, or
    restore the epoch's starting state and retry it with half the learning rate."""

    stop = "stop"
    skip_batch = "skip_batch"
    restore = "restore"


class Amp(StrEnum):
    """Mixed precision of the forward pass (torch.autocast); fp16 also scales the loss."""

    none = "none"
    bf16 = "bf16"
    fp16 = "fp16"


@dataclass
class DataConfig:
    """Which dataset and how much of it. ``channels``/``num_classes`` are facts of real
    datasets (checked against the files; None: taken from them) and free choices only for
    ``synthetic``; ``imagefolder`` also reads its images as gray or colour at
    ``channels``."""

    name: str = "digits"
    root: str | None = None  # None: the dataset's default search path (see compaware/data.py)
    limit: int | None = None  # use only the first N training samples
    image_size: int = 28
    channels: int | None = 1  # None: the dataset's (imagefolder: from the images' mode)
    num_classes: int | None = 10  # None: the dataset's (imagefolder: its class folders)
    augment: bool = False  # imagefolder: random crop (padding size/8) and flip when training
    download: bool = False  # let torchvision download where a network exists
    num_workers: int = 0
    train_size: int = 2048  # synthetic only
    test_size: int = 512  # synthetic only
    noise: float = 1.0  # synthetic only: std of the noise around each class prototype


@dataclass
class ScheduleConfig:
    """Optimisation of the stages: optional plain pre-training, training with the
    regularizer (``epochs``, ``lr``) and fine-tuning of the compressed model."""

    pretrain_epochs: int = 0  # plain training (no regularizer) before the regularized stage
    pretrain_lr: float | None = None  # None: lr
    epochs: int = 10
    finetune_epochs: int = 3
    lr: float = 0.05
    strength_ramp: float = 0.3  # share of the regularized stage over which the strength rises
    steer: bool = True  # with compress.target: steer lam so training meets it (steering.py)
    steer_ramp: float = 0.7  # share of the stage's epochs over which the steered target falls
    finetune_lr: float | None = None  # None: lr × 0.1
    finetune_mask: bool = False  # keep the trained model's exact zeros at zero while fine-tuning
    batch_size: int = 64
    optimizer: OptimizerName = OptimizerName.sgd
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_schedule: LrSchedule = LrSchedule.cosine
    lr_milestones: list[int] = field(default_factory=list)  # epochs, for lr_schedule=step
    lr_gamma: float = 0.1  # factor at each milestone, for lr_schedule=step
    max_steps_per_epoch: int | None = None  # cut epochs short (debug, smoke tests)
    on_nan: OnNan = OnNan.stop  # reaction to a NaN/Inf loss: stop | skip_batch | restore
    amp: Amp = Amp.none  # mixed precision: none | bf16 | fp16
    channels_last: bool = False  # NHWC inputs/activations (weights stay NCHW for the proxes)


@dataclass
class BenchConfig:
    """What the benchmark stage measures."""

    latency: bool = True
    batch_size: int = 32  # the "batch_N" of latency_ms
    min_run_time: float = 0.3  # seconds per measurement (torch.utils.benchmark)
    threads: int | None = None  # None: torch's default for this machine
    # CPU inference forms timed (compaware/deploy/forms.py): eager | channels_last |
    # strided_pools | inductor | onnxruntime; eager is what the exported model_*.pt2 runs
    forms: list[str] = field(default_factory=lambda: ["eager"])
    fastest: bool = False  # also each model in the fastest of `forms`, per batch size


@dataclass
class ObjectiveConfig:
    """The value ``train()`` returns for sweepers (Optuna) to maximise: the final accuracy
    (%) plus ``weight`` × log2(dense / compressed ``ratio``), so each halving of the model
    is worth ``weight`` accuracy points. weight 0: accuracy alone."""

    ratio: str = "params"  # params | macs | bytes
    weight: float = 0.0


@dataclass
class FinetuneConfig:
    """Fine-tuning the compressed model. ``distill``: knowledge distillation from the dense
    model (the teacher, in eval mode, on the same batch): the loss becomes
    (1 − distill_weight)·CE + distill_weight·T²·KL(softmax(teacher/T) ‖ softmax(student/T))
    with T = ``temperature`` (Hinton et al. 2015)."""

    distill: bool = False  # true: learn the dense model's outputs too (knowledge distillation)
    temperature: float = 4.0  # T, softening both models' outputs (> 0)
    distill_weight: float = 0.5  # w in [0, 1]: the soft term's share of the loss


@dataclass
class PathsConfig:
    run_dir: str = "${hydra:runtime.output_dir}"


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: Any = MISSING
    regularizer: Any = MISSING
    compress: Any = MISSING
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    seed: int = 0
    resume: bool = False
    init_from: str | None = None  # dense weights: a run directory or a state_dict file
    device: Device = Device.cpu
    # Opt-in, for the whole process: glibc keeps freed tensor memory for reuse instead of
    # returning it to the system (compaware/deploy/allocator.py): no page faults per forward
    # pass, but the process keeps its peak memory. Off: the C library's defaults.
    retain_freed_memory: bool = False
    native_kernels: bool = False  # compaware.native's C kernels, built on first use
    compress_time_limit: float | None = 3600.0  # seconds (compaware/time_limit.py); None: none


ConfigStore.instance().store(name="run_schema", node=RunConfig)


def check_range(option: str, value: Any, low: float | None = None,
                high: float | None = None, *, low_open: bool = False,
                integer: bool = False) -> None:
    """Raise a :class:`UserError` unless ``value`` is a number in [low, high] (or (low, high])."""
    kind = "an integer" if integer else "a number"
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if not is_number or not math.isfinite(value) or (integer and not float(value).is_integer()):
        raise UserError(f"{option}={value!r} is not {kind}; {option} takes {kind}"
                        f"{_describe_range(low, high, low_open)}.")
    too_low = low is not None and (value <= low if low_open else value < low)
    if too_low or (high is not None and value > high):
        raise UserError(f"{option}={value} is out of range; {option} takes {kind}"
                        f"{_describe_range(low, high, low_open)}.")


def _describe_range(low: float | None, high: float | None, low_open: bool) -> str:
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{low}, {high}]"
    if low is not None:
        return f" {'>' if low_open else '>='} {low}"
    return f" <= {high}" if high is not None else ""


def check_choice(option: str, value: Any, allowed: list[str] | tuple[str, ...]) -> None:
    """Raise a :class:`UserError` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        close = difflib.get_close_matches(str(value), allowed, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UserError(f"{option}={value!r} is not a valid choice; {option} takes one of: "
                        f"{', '.join(allowed)}.{hint}")


def _check_finite(tree: Any, key: str = "") -> None:
    """Every number in the config is finite: NaN passes every range check (all comparisons
    with it are false) and would surface only steps later, as a divergence."""
    if isinstance(tree, dict):
        for name, value in tree.items():
            _check_finite(value, f"{key}.{name}" if key else str(name))
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            _check_finite(value, f"{key}[{i}]")
    elif isinstance(tree, float) and not math.isfinite(tree):
        raise UserError(f"{key}={tree} is not a finite number; every numeric option takes a "
                        f"finite value.")


def validate(cfg: DictConfig) -> None:
    """Range checks on the typed nodes, run before anything is built or written."""
    _check_no_added_keys(cfg)
    _check_finite(to_container(cfg))
    check_range("seed", cfg.seed, 0, MAX_SEED, integer=True)
    if cfg.compress_time_limit is not None:
        check_range("compress_time_limit", cfg.compress_time_limit, 0, low_open=True)
    s, d, b = cfg.schedule, cfg.data, cfg.bench
    check_range("schedule.pretrain_epochs", s.pretrain_epochs, 0, MAX_EPOCHS, integer=True)
    if s.pretrain_lr is not None:
        check_range("schedule.pretrain_lr", s.pretrain_lr, 0, low_open=True)
    check_range("schedule.epochs", s.epochs, 0, MAX_EPOCHS, integer=True)
    check_range("schedule.finetune_epochs", s.finetune_epochs, 0, MAX_EPOCHS, integer=True)
    check_range("schedule.lr", s.lr, 0, low_open=True)
    check_range("schedule.strength_ramp", s.strength_ramp, 0, 1)
    check_range("schedule.steer_ramp", s.steer_ramp, 0, 1, low_open=True)
    if s.finetune_lr is not None:
        check_range("schedule.finetune_lr", s.finetune_lr, 0, low_open=True)
    check_range("schedule.batch_size", s.batch_size, 1, integer=True)
    check_range("schedule.momentum", s.momentum, 0, 1)
    check_range("schedule.weight_decay", s.weight_decay, 0)
    check_range("schedule.lr_gamma", s.lr_gamma, 0, 1, low_open=True)
    for milestone in s.lr_milestones:
        check_range("schedule.lr_milestones", milestone, 1, integer=True)
    if s.max_steps_per_epoch is not None:
        check_range("schedule.max_steps_per_epoch", s.max_steps_per_epoch, 1, integer=True)
    if d.limit is not None:
        check_range("data.limit", d.limit, 1, integer=True)
    check_range("data.image_size", d.image_size, 8, integer=True)
    if d.channels is not None:
        check_range("data.channels", d.channels, 1, integer=True)
    if d.num_classes is not None:
        check_range("data.num_classes", d.num_classes, 2, integer=True)
    check_range("data.num_workers", d.num_workers, 0, 4 * (os.cpu_count() or 1), integer=True)
    check_range("data.train_size", d.train_size, 1, integer=True)
    check_range("data.test_size", d.test_size, 1, integer=True)
    check_range("data.noise", d.noise, 0)
    check_range("bench.batch_size", b.batch_size, 1, integer=True)
    check_range("bench.min_run_time", b.min_run_time, 0, MAX_RUN_TIME, low_open=True)
    if b.threads is not None:
        check_range("bench.threads", b.threads, 1, integer=True)
    for form in b.forms:
        check_choice("bench.forms", form, list(FORMS))
    if len(set(b.forms)) < len(b.forms):
        raise UserError(f"bench.forms={list(b.forms)} names a form twice; bench.forms takes "
                        f"each of {', '.join(FORMS)} at most once.")
    if b.fastest and len(b.forms) < 2:
        raise UserError(f"bench.fastest=true keeps each model's fastest form among bench.forms, "
                        f"which names {len(b.forms)}: name two or more, e.g. "
                        f"bench.forms=[eager,channels_last].")
    check_range("finetune.temperature", cfg.finetune.temperature, 0, low_open=True)
    check_range("finetune.distill_weight", cfg.finetune.distill_weight, 0, 1)
    check_choice("objective.ratio", cfg.objective.ratio, ("params", "macs", "bytes"))
    check_range("objective.weight", cfg.objective.weight, 0)
    if "max_accuracy_drop" in cfg.compress and "target" not in cfg.compress:
        raise UserError(f"compress.max_accuracy_drop searches budgets (compress.target), which "
                        f"compress ({cfg.compress._target_}) does not take; it takes "
                        f"compress=svd, prune or prune+svd.")
    if cfg.resume and cfg.init_from and (s.epochs or s.pretrain_epochs):
        # A run that trains nothing (compaware compress) keeps no dense checkpoint: resumed,
        # it reads init_from again.
        raise UserError("resume=true and init_from are exclusive: resume continues the run in "
                        "hydra.run.dir from its own checkpoint, init_from starts a new run from "
                        "another run's weights. Drop one of them.")


COMPRESS_RUN = "compress_run"  # the config of `compaware compress` (conf/compress_run.yaml)


def check_compress_run(cfg: DictConfig) -> None:
    """``compaware compress`` compresses trained weights as they are: it needs some, and
    trains nothing before compressing them."""
    s = cfg.schedule
    if s.epochs or s.pretrain_epochs:
        raise UserError(f"compaware compress does not train (schedule.epochs={s.epochs}, "
                        f"schedule.pretrain_epochs={s.pretrain_epochs}): both stay 0, and "
                        f"schedule.finetune_epochs sets the fine-tuning after compression. To "
                        f"train from these weights first, run compaware train init_from=….")
    if not cfg.init_from and cfg.model.get("weights") is None:
        raise UserError("compaware compress compresses trained weights, and none were given: "
                        "set init_from=<weights file or run directory> (a state_dict, plain or "
                        "as Lightning, DDP or compaware save it), or, with model=torchvision, "
                        "model.weights=DEFAULT (torchvision's, read from the torch hub cache). "
                        "To train a model and compress it, run compaware train.")


def _check_no_added_keys(cfg: DictConfig) -> None:
    """The schema refuses an unknown key, but Hydra's ``+key=value`` adds it anyway: a typo
    (``+schedule.warmup=3``) would be silently ignored."""
    hints = typing.get_type_hints(RunConfig)
    nodes = [("", cfg, RunConfig)] + [(f"{f.name}.", cfg[f.name], hints[f.name])
                                       for f in fields(RunConfig) if is_dataclass(hints[f.name])]
    for prefix, node, schema in nodes:
        known = [f.name for f in fields(schema)]
        added = [key for key in node if key not in known]
        if added:
            where = prefix.rstrip(".") or "the top level"
            raise UserError(f"{prefix}{added[0]} is not an option; {where} takes: "
                            f"{', '.join(known)}.")


def instantiate(node: DictConfig, option: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` with the target's signature as the schema.

    A key the target does not accept, or a value its constructor rejects, becomes a
    :class:`UserError` naming ``option`` (the config group) and the accepted keys.
    """
    target = node.get("_target_")
    try:
        cls = hydra.utils.get_object(target)
    except Exception as e:
        raise UserError(f"{option}._target_={target!r} cannot be imported: {e}") from None
    accepted = [p for p in inspect.signature(cls).parameters if p not in kwargs and p != "self"]
    unknown = [k for k in node if k != "_target_" and k not in accepted]
    if unknown and not any(p.kind is p.VAR_KEYWORD
                           for p in inspect.signature(cls).parameters.values()):
        raise UserError(f"{option} has no option {', '.join(unknown)}; {option} "
                        f"({target}) accepts: {', '.join(accepted) or 'no options'}.")
    _check_booleans(node, cls, option)
    try:
        return hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, UserError):
            raise cause from None
        raise UserError(f"{option} could not be built from {target}: {cause or e}") from None


def _check_booleans(node: DictConfig, target: Any, option: str) -> None:
    """A value for a ``bool`` parameter must be true or false: Python would take any
    non-empty string (``skip_last=no``) for true."""
    try:
        hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    except Exception:  # annotations that do not resolve: nothing to check against
        return
    for key, value in node.items():
        if hints.get(key) is bool and not isinstance(value, bool):
            raise UserError(f"{option}.{key}={value!r} is not a boolean; {option}.{key} takes "
                            f"true or false.")


def to_container(cfg: DictConfig) -> dict:
    """The resolved config as plain JSON-able data (enums as their names)."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
