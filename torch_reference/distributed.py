"""Data-parallel PyTorch under `torchrun`: the process group, DDP, and BatchNorm over the global batch.

torchrun starts one process per device and describes the run in RANK, WORLD_SIZE and LOCAL_RANK;
without them the `World` is a single process and the rest of this module is not used. Gradients are averaged by
DistributedDataParallel. BatchNorm statistics cover the global batch: on GPUs with
torch.nn.SyncBatchNorm; on the CPU with `CpuSyncBatchNorm` below, because SyncBatchNorm refuses the
CPU in torch 2.14.1 (see its docstring).
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as functional_collectives
from torch import nn


@dataclass(frozen=True)
class World:
    """Where this process sits in a torchrun job: rank `rank` of `size`, device `local_rank` of its host."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    def part(self, global_batch: int) -> slice:
        """This process's contiguous share of a global batch (the driver hands every process the same one)."""
        share = global_batch // self.size
        return slice(self.rank * share, (self.rank + 1) * share)


def world_from_env() -> World:
    return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                 int(os.environ.get("LOCAL_RANK", 0)))


def join_process_group(device: torch.device) -> None:
    """NCCL between GPUs, Gloo between CPU processes; torchrun's env:// variables say where to meet."""
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL's communicators bind to the current device
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(dist.destroy_process_group)


def data_parallel(model: nn.Module, device: torch.device) -> nn.parallel.DistributedDataParallel:
    """`model` wrapped in DDP for training, its BatchNorm layers made to use the global batch.

    Evaluate and save `wrapped.module`: its names carry no `module.` prefix, so checkpoints move
    freely between single- and multi-process runs.
    """
    if device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    else:
        for layer in model.modules():
            if type(layer) is nn.BatchNorm2d:
                layer.__class__ = CpuSyncBatchNorm  # adds behaviour, no state: same parameters, same names
    return nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


class CpuSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch of all processes, on the CPU.

    torch.nn.SyncBatchNorm refuses the CPU in torch 2.14.1 three ways: DDP raises "SyncBatchNorm
    layers only work with GPU modules" for a CPU module, its forward raises for a CPU tensor, and
    its kernels (batch_norm_stats, batch_norm_gather_stats_with_counts, ...) have no CPU
    implementation. So the same statistics are computed here from per-process sums added up by
    torch's own differentiable all_reduce (the functional collective that the deprecated
    torch.distributed.nn.functional.all_reduce names as its successor); its backward all-reduces the
    statistics' gradients, as SyncBatchNorm's backward does, and DDP averages the parameter gradients.
    Eval mode is plain BatchNorm2d. Same parameters and buffers, same names.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        count = x.numel() // x.shape[1] * dist.get_world_size()
        mean = _all_reduce_sum(x.sum((0, 2, 3))) / count
        centred = x - mean.view(1, -1, 1, 1)
        variance = _all_reduce_sum(centred.square().sum((0, 2, 3))) / count  # biased, as BatchNorm normalises
        with torch.no_grad():  # PyTorch's running statistics: momentum update, unbiased variance
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(variance * count / (count - 1), self.momentum)
            self.num_batches_tracked.add_(1)
        scale = self.weight * torch.rsqrt(variance + self.eps)
        return centred * scale.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


def _all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    return functional_collectives.all_reduce(values, "sum", dist.group.WORLD)
