"""Distributed data parallel plumbing for training (``torchrun --nproc-per-node N -m taemi train``).

gloo on CPU, NCCL on CUDA, one GPU per process. Outside torchrun every helper is a no-op
for a world of one process, so the trainer calls them unconditionally.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from taemi.train.state import rng_snapshot


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a distributed run (world 1 = not distributed)."""

    world: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> DistInfo:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR);
    gloo on CPU, NCCL on CUDA. Outside torchrun: world 1, nothing initialised."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    import torch.distributed as dist

    if not dist.is_initialized():
        cuda = device != "cpu" and torch.cuda.is_available()
        dist.init_process_group("nccl" if cuda else "gloo")
    return DistInfo(dist.get_world_size(), dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0")))


def all_reduce_sum(x: torch.Tensor, dist_info: DistInfo) -> torch.Tensor:
    """``x`` summed over the ranks (in place); ``x`` itself in a world of one."""
    if dist_info.world > 1:
        import torch.distributed as dist

        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def barrier(dist_info: DistInfo) -> None:
    if dist_info.world > 1:
        import torch.distributed as dist

        dist.barrier()


def gather_rng_states(dist_info: DistInfo) -> list[dict] | None:
    """Every rank's random states (rank order), for an exact distributed resume."""
    if dist_info.world == 1:
        return None
    import torch.distributed as dist

    states: list = [None] * dist_info.world
    dist.all_gather_object(states, rng_snapshot())
    return states
