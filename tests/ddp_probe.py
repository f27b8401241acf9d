"""``compaware train`` for torchrun, checking after every proximal step that all ranks hold
bit-identical weights (run by tests/test_distributed.py; not a test module itself)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from compaware import loop
from compaware.train import run_app

checked: list[int] = []
prox = loop._prox


def prox_then_compare(training: loop.Training, step_size: float, step: int) -> None:
    prox(training, step_size, step)
    if dist.is_initialized():
        mine = torch.cat([p.detach().flatten() for p in training.model.parameters()])
        everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(everyone, mine)
        if not all(torch.equal(mine, theirs) for theirs in everyone):
            raise SystemExit(f"rank {dist.get_rank()}: weights differ after the prox at {step}")
        checked.append(step)


loop._prox = prox_then_compare
run_app()
print(f"rank {os.environ['RANK']}: weights identical on every rank after each of "
      f"{len(checked)} proximal steps")
