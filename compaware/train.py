"""One compaware run, top to bottom: train → compress → fine-tune → benchmark → results.json.

    compaware train regularizer=lowrank model=lenet5     # this Hydra app
    python -m compaware.train regularizer=lowrank        # the same app
    compaware compress init_from=lenet5.pt compress=prune  # the same run on trained weights,
                                                         # training skipped (conf/compress_run.yaml)

Each stage reads its own config group and hands the next a model. Training and
fine-tuning checkpoint every epoch, so ``resume=true`` (with ``hydra.run.dir`` set to
the interrupted run) picks up where it stopped: the compressed architecture is rebuilt
from the final dense weights and fine-tuning continues from its own checkpoint.
Compression is deterministic given the weights, except for the wall-clock timings of
latency-aware compression: those are recorded (``checkpoints/compression.json``) and
replayed on resume (compaware/compress/replay.py), and a rebuilt model that does not fit
the fine-tuning checkpoint stops the run. A preemption signal stops the run at the next step
with a checkpoint, and the requeued job resumes by itself (compaware/preemption.py).

Under torchrun (or a SLURM job with several tasks) every rank runs this same function:
training is data-parallel (compaware/distributed.py), then rank 0 alone compresses,
fine-tunes and benchmarks.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from compaware import checkpoint, distributed, native, preemption, rundir, tolerance
from compaware.compress import Compressor, replay
from compaware.config import (
    COMPRESS_RUN,
    CONF_DIR,
    Device,
    ObjectiveConfig,
    ScheduleConfig,
    UserError,
    check_compress_run,
    instantiate,
    to_container,
    validate,
)
from compaware.data import Data, build_data
from compaware.deploy import bench
from compaware.deploy.allocator import retain_freed_memory
from compaware.deploy.export import check_exportable
from compaware.deploy.timing import LayerTimer
from compaware.distill import Distillation
from compaware.layers import dead_layers
from compaware.loop import Stage, evaluate, fit
from compaware.models import build_model
from compaware.regularizers import Regularizer
from compaware.resources import check_batches
from compaware.steering import steering_for
from compaware.summary import collapse_verdict, final_accuracy, format_summary
from compaware.sweep_check import check_names, check_sweep
from compaware.time_limit import time_limit
from compaware.tolerance import Attempt
from compaware.train_help import describe, wants_help

log = logging.getLogger(__name__)

# What must not change when a run is resumed: the run would silently become another one.
RUN_IDENTITY = ("data", "model", "init_from", "regularizer", "compress", "seed")
TOO_LONG = ("Compress fewer layers (compress.layers, compress.skip_first) or a smaller model, use "
            "another compressor (compress=svd traces nothing), or raise compress_time_limit.")


def train(cfg: DictConfig) -> dict:
    """The whole run; returns the results written to ``<run_dir>/results.json`` (by rank 0:
    the other ranks of a distributed run return ``{}`` once training is done)."""
    rundir.hold_back_log()  # for train.log, opened once the run directory is this run's
    validate(cfg)
    native.use(cfg.native_kernels)
    if cfg.retain_freed_memory:  # opt-in: for the whole process (compaware/deploy/allocator.py)
        retain_freed_memory()
    regularizer = instantiate(cfg.regularizer, "regularizer")
    compressor = instantiate(cfg.compress, "compress")
    compressor.check_requires(regularizer.publishes,  # before training, not after it
                              f"this run's regularizer, {type(regularizer).__name__}")
    device = distributed.setup(pick_device(cfg.device), cfg.schedule.batch_size)  # N processes
    run_dir = Path(distributed.broadcast(cfg.paths.run_dir))  # rank 0's, on every rank
    config = to_container(cfg)
    identity = {key: config[key] for key in RUN_IDENTITY}
    resume = rundir.check(run_dir, cfg.resume, identity)  # also true for a preempted run
    rundir.open_record(run_dir, cfg)  # .hydra/ and train.log, now that the directory is ours
    torch.manual_seed(cfg.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)

    data = build_data(cfg.data)
    model = build_model(cfg.model, data.info).to(device)
    if cfg.init_from:
        checkpoint.load_weights(model, cfg.init_from)
    elif regularizer.needs_pretrained and not cfg.schedule.pretrain_epochs:
        log.warning("%s retrains a trained network, but this run starts from random weights: "
                    "set schedule.pretrain_epochs or init_from.", cfg.regularizer._target_)
    info = data.info
    input_shape = (info.channels, info.image_size, info.image_size)
    check_exportable(model, input_shape)  # now, not after training: the results need the file
    compressor.check_input(input_shape)
    check_batches(model, input_shape, cfg.schedule.batch_size,
                  cfg.bench.batch_size if cfg.bench.latency else None, device)
    s = cfg.schedule
    writer = SummaryWriter(str(run_dir / "tb")) if distributed.is_main() else distributed.NoWriter()
    common = {"seed": cfg.seed, "device": device, "writer": writer, "resume": resume,
              "meta": {"identity": identity}, "num_workers": cfg.data.num_workers}
    seconds: dict[str, float] = {}
    log.info("%s on %s (%d training samples), regularizer %s, compress %s, device %s",
             cfg.model._target_, info.name, info.train_size, cfg.regularizer._target_,
             cfg.compress._target_, device)

    # 1. Train: optionally plain pre-training first (the papers that retrain a trained
    #    network), then with the compression-aware regularizer (penalty and proximal steps).
    with timed(seconds, "train"):
        fit(model, data, Stage("pretrain", s.pretrain_epochs, s.pretrain_lr or s.lr,
                               Regularizer()), s,
            checkpoint_path=run_dir / "checkpoints" / "pretrain.pt", **common)
        pretrained = evaluate(model, data, device) if s.pretrain_epochs else None
        steering = steering_for(regularizer, compressor, model, epochs=s.epochs,
                                ramp=s.steer_ramp, enabled=s.steer)  # toward compress.target
        fit(model, data, Stage("train", s.epochs, s.lr, regularizer, s.strength_ramp,
                               steering=steering), s,
            checkpoint_path=run_dir / "checkpoints" / "train.pt", **common)
    accuracy = {"pretrained": pretrained, "dense": evaluate(model, data, device)}
    # Compression, fine-tuning and the benchmark run once, on rank 0; other ranks stop here.
    if not distributed.leave():
        writer.close()
        return {}

    # 2–3. Compress, then fine-tune the compressed model (compress_and_finetune, below; its
    #    files in checkpoints/). With compress.max_accuracy_drop, a search does both for a
    #    series of budgets, each from these same trained weights, and keeps the strongest
    #    whose accuracy stays within that drop of the dense model's (compaware/tolerance.py).
    attempt = partial(compress_and_finetune, model=model, artifacts=regularizer.artifacts(model),
                      data=data, schedule=s, seconds=seconds, common=common,
                      distill=Distillation(model, cfg.finetune) if cfg.finetune.distill else None,
                      limit=cfg.compress_time_limit)
    search = None
    if compressor.search is None:
        chosen = attempt(compressor, run_dir / "checkpoints", "finetune")
    else:
        chosen, search = tolerance.search(
            cfg.compress, compressor.search, attempt, dense=model,
            dense_accuracy=accuracy["dense"], folder=run_dir / "checkpoints" / "search",
            resume=resume)
    compressor, compressed, report = chosen.compressor, chosen.model, chosen.report
    accuracy |= chosen.accuracy

    # 4. Benchmark dense against compressed: parameters, MACs, bytes, latency, as the
    #    results.json sections. A compressor with a storage format of its own writes its file
    #    first; that file's size is bytes.compressed.
    with timed(seconds, "bench"), preemption.stop_at_once("benchmark"):
        stored = compressor.save(compressed, run_dir)
        costs = bench.measure({"dense": model, "compressed": compressed}, input_shape,
                              cfg.bench, run_dir, stored=stored, details=report)
    writer.close()

    results = {"accuracy": accuracy, **costs,
               "regularizer": regularizer.stats(model), "seconds": seconds,
               **({"steering": steering.summary()} if steering else {}),
               "status": "completed", "choices": config_choices(), "config": config}
    if search:
        results["search"] = search  # every candidate budget tried, and the one kept
    results |= collapse_verdict(results, dead_layers(compressed))  # warns when collapsed
    results["objective"] = objective(results, cfg.objective)
    checkpoint.save_json(results, run_dir / "results.json")
    summary = f"{format_summary(results)}\nrun directory: {run_dir}"
    print(summary)
    rundir.log_to_file(summary)  # train.log keeps what the console showed
    return results


def compress_and_finetune(compressor: Compressor, files: Path, stage: str, *, model: nn.Module,
                          artifacts: dict, data: Data, schedule: ScheduleConfig,
                          seconds: dict[str, float], common: dict,
                          distill: Distillation | None, limit: float | None) -> Attempt:
    """Stages 2 and 3 of a run for ``compressor``, from the trained ``model``, with the
    files of both in the folder ``files`` and ``stage`` naming the fine-tuning (log,
    TensorBoard). ``common``: :func:`~compaware.loop.fit`'s keyword arguments; ``limit``:
    compress_time_limit."""
    resume, device = common["resume"], common["device"]
    # 2. Compress: a new, physically smaller module; the trained model stays as it is.
    #    A latency-aware compressor's timings are recorded, and replayed on resume, so that
    #    a resumed run rebuilds the architecture it fine-tuned (compaware/compress/replay.py).
    #    A signal stops it at once (a rerun repeats it), and so does compress_time_limit.
    timings = files / "compression.json"
    with (timed(seconds, "compress"), preemption.stop_at_once("compression"),
          time_limit(limit, "compression", "compress_time_limit", TOO_LONG)):
        timer = replay.timer_for(compressor, timings, resume, LayerTimer)
        compressed, report = compressor(model, artifacts, timer)
        replay.keep(timer, timings)
    accuracy = {"compressed": evaluate(compressed, data, device)}
    if resume:
        checkpoint.check_fits(compressed, files / "finetune.pt")

    # 3. Fine-tune the compressed model, without the regularizer, keeping what compression
    #    made (pruned weights stay zero, shared weights shared), optionally learning the
    #    dense model's outputs too (finetune.distill: the dense model is the teacher).
    s = schedule
    with timed(seconds, "finetune"):
        finetune = Stage(stage, s.finetune_epochs, s.finetune_lr or s.lr * 0.1,
                         Regularizer(), keep=compressor.finetune_constraint(
                             compressed, keep_zeros=s.finetune_mask), distill=distill)
        fit(compressed, data, finetune, s, checkpoint_path=files / "finetune.pt", **common)
    accuracy["finetuned"] = evaluate(compressed, data, device) if s.finetune_epochs else None
    return Attempt(compressor, compressed, report, accuracy)


def pick_device(choice: Device) -> torch.device:
    if choice == Device.cuda and not torch.cuda.is_available():
        raise UserError("device=cuda but no CUDA device is available here. device takes one "
                        "of: cpu, cuda, auto (cuda when available).")
    if choice == Device.auto:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice.value)


def objective(results: dict, spec: ObjectiveConfig) -> float:
    """Final accuracy + weight × log2(compression ratio): what sweepers maximise. A collapsed
    run scores its accuracy alone: its ratio measures no trade-off and must not win."""
    accuracy = final_accuracy(results["accuracy"])
    if results["collapsed"]:
        return accuracy
    section = results[spec.ratio]
    return accuracy + spec.weight * math.log2(section["dense"] / section["compressed"])


def config_choices() -> dict[str, str]:
    """The option picked in each config group (``regularizer: lowrank``), for labels in
    reports; empty when the config was composed without Hydra's app (tests, scripts)."""
    if not HydraConfig.initialized():
        return {}
    choices = HydraConfig.get().runtime.choices
    return {group: str(choices[group]) for group in choices if not group.startswith("hydra")}


@contextmanager
def timed(seconds: dict[str, float], key: str):
    start = time.perf_counter()
    yield
    seconds[key] = round(seconds.get(key, 0.0) + time.perf_counter() - start, 3)  # summed


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    """The Hydra app of ``compaware train``; see :func:`run`."""
    return run(cfg)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name=COMPRESS_RUN)
def compress_main(cfg: DictConfig) -> float | None:
    """``compaware compress``: :func:`run` on trained weights, without training
    (compaware/conf/compress_run.yaml)."""
    return run(cfg, check_compress_run)


def run(cfg: DictConfig, check: Callable[[DictConfig], None] | None = None) -> float | None:
    """One run of a Hydra app, after its own ``check`` of the config. Returns the run's
    objective (``objective.*``) for sweepers.

    A run that fails, or is refused at its start, leaves ``results.json`` with status
    ``failed`` and the error, so a sweep keeps a trace of it. SIGTERM/SIGUSR1/SIGUSR2 stop
    the run at the next step boundary with a checkpoint and status ``preempted``; the same
    command in the same run directory (a requeued job) then resumes it
    (compaware/preemption.py).
    """
    run_dir = Path(cfg.paths.run_dir)
    try:
        if check is not None:
            check(cfg)
        with preemption.stop_at_next_step():
            results = train(cfg)
    except preemption.Preempted as stop:
        rundir.record_preemption(run_dir, cfg, str(stop))
        log.warning("%s", stop)
        stop.pass_on()  # to a handler that was there before, e.g. submitit's requeue
        return None
    except Exception as error:
        rundir.record_failure(run_dir, cfg, error)
        raise
    finally:
        rundir.close_log()
    return results.get("objective")  # None on ranks > 0 of a distributed run


def run_app(app=main) -> None:
    """``compaware train`` and ``python -m compaware.train`` (``app=compress_main``:
    ``compaware compress``). Under torchrun, ranks > 0 add overrides that leave the run
    directory and Hydra's files to rank 0."""
    if app is main and wants_help(sys.argv[1:]):  # ours, not Hydra's: groups and keys described
        print(describe(sys.argv[1:]))
        return
    sys.argv += distributed.hydra_overrides()
    try:
        check_names(sys.argv[1:])
        check_sweep(sys.argv[1:], COMPRESS_RUN if app is compress_main else "config")
    except UserError as error:
        sys.exit(f"{error}")
    app()


if __name__ == "__main__":
    run_app()
