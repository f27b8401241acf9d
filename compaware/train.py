"""One compaware run, top to bottom: train → compress → fine-tune → benchmark → results.json.

    compaware train regularizer=lowrank model=lenet5     # this Hydra app
    python -m compaware.train regularizer=lowrank        # the same app

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
from contextlib import contextmanager
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from torch.utils.tensorboard import SummaryWriter

from compaware import checkpoint, distributed, native, preemption, rundir
from compaware.compress import replay
from compaware.config import (
    CONF_DIR,
    Device,
    ObjectiveConfig,
    UserError,
    instantiate,
    to_container,
    validate,
)
from compaware.data import build_data
from compaware.deploy import bench
from compaware.deploy.allocator import retain_freed_memory
from compaware.deploy.export import check_exportable
from compaware.deploy.timing import LayerTimer
from compaware.layers import dead_layers
from compaware.loop import Stage, evaluate, fit
from compaware.models import build_model
from compaware.regularizers import Regularizer
from compaware.resources import check_batches
from compaware.summary import collapse_verdict, final_accuracy, format_summary
from compaware.sweep_check import check_sweep
from compaware.time_limit import time_limit

log = logging.getLogger(__name__)

# What must not change when a run is resumed: the run would silently become another one.
RUN_IDENTITY = ("data", "model", "regularizer", "compress", "seed")
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
        fit(model, data, Stage("train", s.epochs, s.lr, regularizer, s.strength_ramp), s,
            checkpoint_path=run_dir / "checkpoints" / "train.pt", **common)
    accuracy = {"pretrained": pretrained, "dense": evaluate(model, data, device)}
    # Compression, fine-tuning and the benchmark run once, on rank 0; other ranks stop here.
    if not distributed.leave():
        writer.close()
        return {}

    # 2. Compress: a new, physically smaller module; the trained model stays as it is.
    #    A latency-aware compressor's timings are recorded, and replayed on resume, so that
    #    a resumed run rebuilds the architecture it fine-tuned (compaware/compress/replay.py).
    #    A signal stops it at once (a rerun repeats it), and so does compress_time_limit.
    timings = run_dir / "checkpoints" / "compression.json"
    with (timed(seconds, "compress"),
          preemption.stop_at_once("compression", run_dir / "checkpoints" / "train.pt"),
          time_limit(cfg.compress_time_limit, "compression", "compress_time_limit", TOO_LONG)):
        timer = replay.timer_for(compressor, timings, resume, LayerTimer)
        compressed, report = compressor(model, regularizer.artifacts(model), timer)
        replay.keep(timer, timings)
    accuracy["compressed"] = evaluate(compressed, data, device)
    if resume:
        checkpoint.check_fits(compressed, run_dir / "checkpoints" / "finetune.pt")

    # 3. Fine-tune the compressed model, without the regularizer, keeping what compression
    #    made (pruned weights stay zero, shared weights shared).
    with timed(seconds, "finetune"):
        finetune = Stage("finetune", s.finetune_epochs, s.finetune_lr or s.lr * 0.1,
                         Regularizer(), keep=compressor.finetune_constraint(
                             compressed, keep_zeros=s.finetune_mask))
        fit(compressed, data, finetune, s,
            checkpoint_path=run_dir / "checkpoints" / "finetune.pt", **common)
    accuracy["finetuned"] = evaluate(compressed, data, device) if s.finetune_epochs else None

    # 4. Benchmark dense against compressed: parameters, MACs, bytes, latency, as the
    #    results.json sections. A compressor with a storage format of its own writes its file
    #    first; that file's size is bytes.compressed.
    last = run_dir / "checkpoints" / ("finetune.pt" if s.finetune_epochs else "train.pt")
    with timed(seconds, "bench"), preemption.stop_at_once("benchmark", last):
        stored = compressor.save(compressed, run_dir)
        costs = bench.measure({"dense": model, "compressed": compressed}, input_shape,
                              cfg.bench, run_dir, stored=stored, details=report)
    writer.close()

    results = {"accuracy": accuracy, **costs,
               "regularizer": regularizer.stats(model), "seconds": seconds,
               "status": "completed", "choices": config_choices(), "config": config}
    results |= collapse_verdict(results, dead_layers(compressed))  # warns when collapsed
    results["objective"] = objective(results, cfg.objective)
    checkpoint.save_json(results, run_dir / "results.json")
    summary = f"{format_summary(results)}\nrun directory: {run_dir}"
    print(summary)
    rundir.log_to_file(summary)  # train.log keeps what the console showed
    return results


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
    seconds[key] = round(time.perf_counter() - start, 3)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    """The Hydra app. Returns the run's objective (``objective.*``) for sweepers.

    A run that fails leaves ``results.json`` with status ``failed`` and the error, so a
    sweep keeps a trace of it. SIGTERM/SIGUSR1/SIGUSR2 stop the run at the next step
    boundary with a checkpoint and status ``preempted``; the same command in the same run
    directory (a requeued job) then resumes it (compaware/preemption.py).
    """
    run_dir = Path(cfg.paths.run_dir)
    try:
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


def run_app() -> None:
    """``compaware train`` and ``python -m compaware.train``. Under torchrun, ranks > 0 add
    overrides that leave the run directory and Hydra's files to rank 0."""
    sys.argv += distributed.hydra_overrides()
    try:
        check_sweep(sys.argv[1:])
    except UserError as error:
        sys.exit(f"{error}")
    main()


if __name__ == "__main__":
    run_app()
