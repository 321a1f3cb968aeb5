"""Data-parallel training with torchrun (PyTorch DDP): process group, global batches, gathers.

`torchrun --nproc_per_node N train.py ...` sets WORLD_SIZE/RANK/LOCAL_RANK; without them
everything here is a no-op and training runs in one process.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Join the process group torchrun describes (NCCL on GPUs, gloo on CPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend)
    return info


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


class GlobalBatchSampler(Sampler[list[int]]):
    """This rank's share of each global batch, from one permutation seeded by (seed, epoch).

    Every rank draws the same permutation and cuts the same global batches; rank r takes
    the r-th slice of each. Averaged over ranks, the gradients equal those of one process
    on the global batch, so N processes train the same model as one (up to float sums).
    """

    def __init__(self, n: int, global_batch: int, info: DistInfo, seed: int):
        if global_batch % info.world:
            raise ValueError(f"batch_size {global_batch} must be divisible by the {info.world} processes")
        self.n, self.global_batch, self.info, self.seed = n, global_batch, info, seed
        self.per_rank = global_batch // info.world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n // self.global_batch  # whole global batches only (drop_last)

    def __iter__(self) -> Iterator[list[int]]:
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        start = self.info.rank * self.per_rank
        for b in range(len(self)):
            batch = perm[b * self.global_batch : (b + 1) * self.global_batch]
            yield batch[start : start + self.per_rank].tolist()


def shard(n: int, info: DistInfo) -> np.ndarray:
    """Indices this rank scores during evaluation: every world-th item."""
    return np.arange(info.rank, n, info.world)


def gather_rows(values: np.ndarray, indices: np.ndarray, n: int, info: DistInfo) -> np.ndarray:
    """Reassemble per-rank rows into the full (n, ...) array, on every rank."""
    if not info.enabled:
        return values
    parts: list = [None] * info.world
    dist.all_gather_object(parts, (indices, values))
    full = np.full((n, *values.shape[1:]), np.nan)
    for idx, vals in parts:
        full[idx] = vals
    return full
