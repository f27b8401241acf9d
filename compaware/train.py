"""One compaware run, top to bottom: train → compress → fine-tune → benchmark → results.json.

    compaware train regularizer=lowrank model=lenet5     # this Hydra app
    python -m compaware.train regularizer=lowrank        # the same app

Each stage reads its own config group and hands the next a model. Training and
fine-tuning checkpoint every epoch, so ``resume=true`` (with ``hydra.run.dir`` set to
the interrupted run) picks up where it stopped: compression is deterministic, so the
compressed architecture is rebuilt from the final dense weights and fine-tuning
continues from its own checkpoint.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from torch.utils.tensorboard import SummaryWriter

from compaware import bench, checkpoint
from compaware.config import CONF_DIR, Device, UserError, instantiate, to_container, validate
from compaware.data import build_data
from compaware.export import check_exportable
from compaware.loop import Stage, evaluate, fit
from compaware.models import build_model
from compaware.regularizers import Regularizer
from compaware.summary import format_summary

log = logging.getLogger(__name__)

# What must not change when a run is resumed: the run would silently become another one.
RUN_IDENTITY = ("data", "model", "regularizer", "compress", "seed")


def train(cfg: DictConfig) -> dict:
    """The whole run; returns the results written to ``<run_dir>/results.json``."""
    validate(cfg)
    run_dir = Path(cfg.paths.run_dir)
    config = to_container(cfg)
    identity = {key: config[key] for key in RUN_IDENTITY}
    check_run_dir(run_dir, cfg.resume, identity)
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)

    data = build_data(cfg.data)
    model = build_model(cfg.model, data.info).to(device)
    regularizer = instantiate(cfg.regularizer, "regularizer")
    compressor = instantiate(cfg.compress, "compress")
    if cfg.init_from:
        checkpoint.load_weights(model, cfg.init_from)
    info = data.info
    input_shape = (info.channels, info.image_size, info.image_size)
    check_exportable(model, input_shape)  # now, not after training: the results need the file
    s = cfg.schedule
    writer = SummaryWriter(str(run_dir / "tb"))
    common = {"seed": cfg.seed, "device": device, "writer": writer, "resume": cfg.resume,
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
        fit(model, data, Stage("train", s.epochs, s.lr, regularizer), s,
            checkpoint_path=run_dir / "checkpoints" / "train.pt", **common)
    accuracy = {"pretrained": pretrained, "dense": evaluate(model, data, device)}

    # 2. Compress: a new, physically smaller module; the trained model stays as it is.
    with timed(seconds, "compress"):
        compressed, report = compressor(model)
    accuracy["compressed"] = evaluate(compressed, data, device)

    # 3. Fine-tune the compressed model, without the regularizer.
    with timed(seconds, "finetune"):
        finetune = Stage("finetune", s.finetune_epochs, s.finetune_lr or s.lr * 0.1,
                         Regularizer())
        fit(compressed, data, finetune, s,
            checkpoint_path=run_dir / "checkpoints" / "finetune.pt", **common)
    accuracy["finetuned"] = evaluate(compressed, data, device) if s.finetune_epochs else None

    # 4. Benchmark dense against compressed: parameters, MACs, bytes, latency.
    with timed(seconds, "bench"):
        costs = bench.measure({"dense": model, "compressed": compressed}, input_shape,
                              cfg.bench, run_dir)
    writer.close()

    results = {"accuracy": accuracy, **costs, "compression": report,
               "regularizer": regularizer.stats(model), "seconds": seconds,
               "status": "completed", "config": config}
    checkpoint.save_json(results, run_dir / "results.json")
    print(format_summary(results))
    return results


def check_run_dir(run_dir: Path, resume: bool, identity: dict) -> None:
    """Never overwrite another run; on resume, refuse a run that would be a different one."""
    saved = sorted((run_dir / "checkpoints").glob("*.pt"))
    if not resume:
        if saved or (run_dir / "results.json").exists():
            raise UserError(f"{run_dir} already holds a run. Pass resume=true to continue it, "
                            f"or choose a new directory (hydra.run.dir).")
        return
    if not saved:
        raise UserError(f"resume=true but {run_dir} has no checkpoint (checkpoints/*.pt). "
                        f"Set hydra.run.dir to the directory of the interrupted run.")
    now, before = _flatten(identity), _flatten(checkpoint.load(saved[0]).get("identity", {}))
    changed = [k for k in now.keys() | before.keys() if now.get(k) != before.get(k)]
    if changed:
        raise UserError(f"resume=true but the config differs from the interrupted run in "
                        f"{', '.join(sorted(changed))}: resuming would mix two experiments. "
                        f"Use the original values or start a new run.")


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def pick_device(choice: Device) -> torch.device:
    if choice == Device.cuda and not torch.cuda.is_available():
        raise UserError("device=cuda but no CUDA device is available here. device takes one "
                        "of: cpu, cuda, auto (cuda when available).")
    if choice == Device.auto:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice.value)


@contextmanager
def timed(seconds: dict[str, float], key: str):
    start = time.perf_counter()
    yield
    seconds[key] = round(time.perf_counter() - start, 3)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float:
    """The Hydra app. Returns the final accuracy, which sweepers can optimise."""
    accuracy = train(cfg)["accuracy"]
    return accuracy["finetuned"] if accuracy["finetuned"] is not None else accuracy["compressed"]


if __name__ == "__main__":
    main()
