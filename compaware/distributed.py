"""Data-parallel training over several processes: torchrun, or one SLURM task per rank.

One process is the default and needs none of this: every helper here is a no-op
without a process group, so the loop reads the same for one process or many.

    torchrun --nproc_per_node=4 -m compaware.train ...   # RANK, WORLD_SIZE... from torchrun
    compaware train -m hydra/launcher=submitit_slurm hydra.launcher.tasks_per_node=4 ...

:func:`setup` joins the process group (NCCL on GPU, gloo on CPU); under a submitit job
with several tasks it first exports submitit's view of the job (each task is a rank,
exactly as torchrun would number it). The rules that keep N processes one run:

- ``schedule.batch_size`` is the global batch: each rank takes its share of every
  batch of the seeded order (``DistributedSampler``), and DDP averages the gradients,
  so N processes compute what one would.
- every rank holds identical weights and runs the regularizer's prox on them, which
  keeps them identical without communication (tested);
- rank 0 decides the run directory and is the only one to write (checkpoints,
  TensorBoard, results, Hydra's files and log); compression, fine-tuning and the
  benchmark run once, on rank 0, after the others have left.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from compaware.config import UserError

log = logging.getLogger(__name__)


def launched_world_size() -> int:
    """How many processes the launcher started (before :func:`setup`)."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    if os.environ.get("SUBMITIT_EXECUTOR"):
        import submitit

        return submitit.JobEnvironment().num_tasks
    return 1


def hydra_overrides() -> list[str]:
    """Extra Hydra overrides for the ranks > 0 of a torchrun launch, appended to the command
    line before Hydra reads it: each rank would otherwise resolve ``${now:...}`` itself, make
    its own run directory and write ``.hydra/`` and a log there. These ranks write nothing
    (the run directory comes from rank 0 in :func:`broadcast`) and log warnings only."""
    if int(os.environ.get("RANK", 0)) == 0:
        return []
    return ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=stdout",
            "hydra.job_logging.root.level=WARNING"]


def setup(device: torch.device, batch_size: int) -> torch.device:
    """Join the process group when the launcher started several processes, once the
    global ``batch_size`` is known to split over them; return this rank's device
    (``cuda:<local rank>`` on GPUs)."""
    n = launched_world_size()
    if batch_size % n:
        raise UserError(f"schedule.batch_size={batch_size} does not split over {n} processes; "
                        f"schedule.batch_size is the global batch and takes a multiple of the "
                        f"number of processes.")
    if n == 1 or dist.is_initialized():
        return device
    if "RANK" not in os.environ:  # a submitit task: export its rank as torchrun would
        import submitit.helpers

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if not is_main():  # only rank 0 writes the log file; the others keep the console
        root = logging.getLogger()
        for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
            root.removeHandler(handler)
        root.setLevel(logging.WARNING)
    log.info("rank %d of %d on %s", rank(), world_size(), device)
    return device


def rank() -> int:
    if dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0))


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def broadcast(value):
    """Rank 0's ``value`` on every rank (any picklable object)."""
    if not dist.is_initialized():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def sum_across_ranks(*values: float) -> list[float]:
    """Each value summed over the ranks (metrics of a rank's share of the data)."""
    if not dist.is_initialized():
        return list(values)
    total = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(total)
    return total.tolist()


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` holds on some rank: decisions that all ranks must take together
    (stop for a preemption, skip a non-finite batch) or the collectives would hang."""
    if not dist.is_initialized():
        return flag
    return sum_across_ranks(float(flag))[0] > 0


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in DistributedDataParallel when there are several ranks (the forward of the
    wrapper synchronises the gradients); ``model`` itself otherwise."""
    if not dist.is_initialized():
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                   else None)


def leave() -> bool:
    """End data parallelism: wait for every rank, leave the process group, and return
    whether this process is rank 0, which goes on alone."""
    if not dist.is_initialized():
        return True
    main = is_main()
    dist.barrier()
    dist.destroy_process_group()
    return main


class NoWriter:
    """The TensorBoard writer of ranks > 0: only rank 0 writes events."""

    def add_scalar(self, *args, **kwargs) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass
