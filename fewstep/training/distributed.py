"""Data-parallel training across processes (`torchrun`), docs/math.md#training-loop-facts.

    torchrun --standalone --nproc_per_node=8 -m fewstep train --preset digits --set train.parallel=ddp

Every process draws its own batch (`train.batch_size` per process, so the global batch is
`world_size x batch_size`). `train.parallel`:
- `ddp`: every process holds the whole model; `DistributedDataParallel` averages the gradients
  in buckets, overlapped with the backward, so every process takes the same optimizer step;
- `fsdp`: `fully_shard` per block (`fewstep.training.fsdp`): parameters, gradients and optimizer state
  are sharded over the processes.
The tangent engine runs the network through its ordinary `__call__`, so both wrappers see every
forward: the sCM JVP is exact under either. Process 0 alone logs, samples and writes
checkpoints. Backend: NCCL on CUDA, Gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    created_group: bool = False  # this process group was created by `init_distributed` (and is ours to end)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def main_process() -> bool:
    """Whether this process prints the run's messages: process 0 under torchrun, read from the
    environment (it holds before the process group exists)."""
    return int(os.environ.get("RANK", "0")) == 0


def init_distributed(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join the process group `torchrun` describes (env WORLD_SIZE > 1); a single process otherwise.
    Returns the process's place and its device (CUDA: the GPU of its local rank)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world, local_rank, created), device


def shutdown_distributed(info: DistInfo) -> None:
    if info.created_group and dist.is_initialized():
        dist.destroy_process_group()


@torch.no_grad()
def broadcast_parameters(module: torch.nn.Module, info: DistInfo) -> None:
    """Make every replica start from process 0's weights and buffers."""
    if not info.enabled:
        return
    for tensor in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(tensor.data, src=0)


def all_finite(loss: torch.Tensor, info: DistInfo) -> bool:
    """Whether the loss is finite on EVERY process (one MIN all-reduce): a non-finite loss on one
    process makes all of them skip the step together, before any backward (DDP's and FSDP's
    backward are collective: a process that skipped it alone would hang the others)."""
    ok = torch.isfinite(loss.detach()).all()
    if not info.enabled:
        return bool(ok)
    flag = ok.to(torch.float32).reshape(1)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0)


def any_process(flag: bool, info: DistInfo, device: torch.device | str = "cpu") -> bool:
    """Whether `flag` holds on ANY process (one MAX all-reduce): e.g. a stop signal that reached
    one process stops all of them at the same step."""
    if not info.enabled:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)  # NCCL reduces CUDA tensors only
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


class ContractDDP(torch.nn.parallel.DistributedDataParallel):
    """DDP that still answers the network contract's optional attributes (`num_classes`,
    `adaptive_weight`, `guidance_input`, ...) from the module it wraps."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def wrap_ddp(net: torch.nn.Module, device: torch.device) -> ContractDDP:
    """DistributedDataParallel: bucketed gradient all-reduce overlapped with the backward."""
    # static_graph: the same parameters take part in every step, and some may take none (a head a
    # method does not use): DDP learns that at the first step instead of searching every step.
    return ContractDDP(net, device_ids=[device.index] if device.type == "cuda" else None, static_graph=True)


def gather_objects(obj, info: DistInfo) -> list:
    """Every process's `obj`, in rank order (a list of one without distribution)."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def gather_batches(parts: list, info: DistInfo, main_only: bool = False) -> list | None:
    """Every process's `parts` (its batches rank, rank + world_size, ... as `fewstep.apps.generate.generate`
    splits them), interleaved back into batch order. `main_only`: gathered to process 0 alone
    (the others get None), for payloads such as Inception features that only process 0 scores."""
    if not info.enabled:
        return list(parts)
    if main_only:
        per_rank = [None] * info.world_size if info.is_main else None
        dist.gather_object(parts, per_rank, dst=0)
        if not info.is_main:
            return None
    else:
        per_rank = gather_objects(parts, info)
    total = sum(len(p) for p in per_rank)
    return [per_rank[k % info.world_size][k // info.world_size] for k in range(total)]


def broadcast_object(obj, info: DistInfo):
    """Process 0's `obj` on every process."""
    if not info.enabled:
        return obj
    box = [obj if info.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
