"""Data-parallel training with torchrun (PyTorch DDP): process group, global batches, gathers,
BatchNorm over the global batch, and the agreement that keeps every rank in step.

`torchrun --nproc_per_node N train.py ...` sets WORLD_SIZE/RANK/LOCAL_RANK; without them
everything here is a no-op and training runs in one process. `core.ranks` reads the same
environment without torch.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc
from timm.layers import BatchNormAct2d, convert_sync_batchnorm
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import Sampler

from core.ranks import DistInfo, rank_info


def init_distributed() -> DistInfo:
    """Join the process group torchrun describes (NCCL on GPUs, gloo on CPUs)."""
    info = rank_info()
    if not info.enabled:
        return info
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


def world_size() -> int:
    """Processes in the default group; 1 without one (a criterion has no DistInfo to ask)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_ranks_agree(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True only if `flag` is true on every rank. Every rank must call it at the same point:
    a collective (a DDP backward, a SyncBatchNorm forward) that one rank skips hangs the others."""
    if not info.enabled:
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def average_across_ranks(tensors: list[torch.Tensor], info: DistInfo) -> None:
    """Replace each tensor, in place, by its mean over ranks."""
    if not info.enabled:
        return
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(info.world)


def sum_over_processes(x: torch.Tensor) -> torch.Tensor:
    """`x` summed over the processes of the default group (a new tensor); a copy without one."""
    out = x.detach().clone()
    if world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def average_gradients(parameters: list[torch.nn.Parameter]) -> None:
    """Each parameter's gradient replaced, in place, by its mean over the processes of the default
    group: what DDP does for the model, for a part trained outside it. A parameter without a
    gradient counts as zero (every rank must send the same tensors). No-op without a group."""
    world = world_size()
    if world == 1 or not parameters:
        return
    for p in parameters:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in parameters])  # one collective, not one per tensor
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat.div_(world)
    start = 0
    for p in parameters:
        n = p.grad.numel()
        p.grad.copy_(flat[start : start + n].view_as(p.grad))
        start += n


def broadcast_from_first(tensors: list[torch.Tensor]) -> None:
    """Every tensor, in place, set to rank 0's value (a part built on each rank starts equal)."""
    if world_size() == 1:
        return
    for t in tensors:
        dist.broadcast(t.data if isinstance(t, torch.nn.Parameter) else t, src=0)


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every rank's rows of `x` in rank order, and the row where this rank's own begin.

    Ranks may hold different numbers of rows (a batch that lost unreadable files): rows
    are padded to the largest count for the collective and the padding is cut off again.
    Gradients flow back to each rank's rows, summed over the ranks that used them.
    Without a process group this is `(x, 0)`.
    """
    world = world_size()
    if world == 1:
        return x, 0
    counts = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([len(x)], device=x.device))
    sizes = [int(c.item()) for c in counts]
    longest = max(sizes)
    padded = torch.cat([x, x.new_zeros(longest - len(x), *x.shape[1:])])
    everyone = fc.all_gather_single(padded.contiguous(), 0, dist.group.WORLD)
    rows = torch.cat([everyone[r * longest : r * longest + n] for r, n in enumerate(sizes)])
    return rows, sum(sizes[: dist.get_rank()])


def sync_batchnorm(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Every BatchNorm of `module` computing its statistics over the global batch.

    On GPUs, timm's converter: torch BatchNorm becomes torch's SyncBatchNorm and timm's
    BatchNormAct2d (EfficientNet) becomes SyncBatchNormAct, keeping the activation that
    torch's own converter would drop. torch's SyncBatchNorm runs on GPUs only (and DDP
    refuses it on CPU modules), so on CPU processes (gloo) each BatchNorm layer keeps its
    class's state and gains a forward that computes the same statistics with an all_reduce
    carrying gradients.
    """
    if device.type != "cpu":
        return convert_sync_batchnorm(module)
    for m in module.modules():
        if isinstance(m, _BatchNorm):
            if type(m) not in _ON_CPU:
                raise ValueError(f"train.sync_bn: no CPU version of {type(m).__name__}; set train.sync_bn=false")
            m.__class__ = _ON_CPU[type(m)]  # same parameters and buffers, a forward that syncs
    return module


def _synced_batch_norm(bn: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """Training-mode BatchNorm of `x` with mean and variance over every rank's batch."""
    c, dims = x.shape[1], [0, *range(2, x.ndim)]
    x64 = x.double()  # sums of squares in float64: E[x^2] - E[x]^2 cancels badly in float32
    local = torch.cat([x64.sum(dims), (x64 * x64).sum(dims), x64.new_tensor([x.numel() // c])])
    total = fc.all_reduce(local, "sum", dist.group.WORLD)
    count = total[2 * c]
    mean = total[:c] / count
    var = total[c : 2 * c] / count - mean * mean
    if bn.track_running_stats:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            factor = 1.0 / bn.num_batches_tracked.item() if bn.momentum is None else bn.momentum
            bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), factor)
            bn.running_var.lerp_((var * count / (count - 1)).to(bn.running_var.dtype), factor)
    shape = (1, c) + (1,) * (x.ndim - 2)
    y = ((x64 - mean.view(shape)) * torch.rsqrt(var.view(shape) + bn.eps)).to(x.dtype)
    return y * bn.weight.view(shape) + bn.bias.view(shape) if bn.affine else y


class _SyncedOnCpu:
    """Mixed into a BatchNorm class: in training under a process group, statistics over every
    process; otherwise the class's own forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and world_size() > 1:
            return self.after_norm(_synced_batch_norm(self, x))
        return super().forward(x)

    def after_norm(self, x: torch.Tensor) -> torch.Tensor:
        return x


class _SyncedBatchNorm1d(_SyncedOnCpu, torch.nn.BatchNorm1d):
    pass


class _SyncedBatchNorm2d(_SyncedOnCpu, torch.nn.BatchNorm2d):
    pass


class _SyncedBatchNorm3d(_SyncedOnCpu, torch.nn.BatchNorm3d):
    pass


class _SyncedBatchNormAct2d(_SyncedOnCpu, BatchNormAct2d):
    def after_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))  # what BatchNormAct2d.forward does after its batch_norm


_ON_CPU = {
    torch.nn.BatchNorm1d: _SyncedBatchNorm1d,
    torch.nn.BatchNorm2d: _SyncedBatchNorm2d,
    torch.nn.BatchNorm3d: _SyncedBatchNorm3d,
    BatchNormAct2d: _SyncedBatchNormAct2d,
}
