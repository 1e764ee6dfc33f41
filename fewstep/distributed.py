"""Data-parallel training across processes (`torchrun`), SPEC 5.

    torchrun --standalone --nproc_per_node=8 -m fewstep train --preset digits

Every process holds the whole model and draws its own batch (`train.batch_size` per process, so
the global batch is `world_size x batch_size`); after each backward the gradients are averaged
over processes in one flattened all-reduce, so every process takes the same optimizer step and
the replicas stay identical. Process 0 alone logs, samples and writes checkpoints.

One all-reduce per step is what DDP does too, minus the overlap of communication with the
backward pass. Since the tangent engine runs the network through its ordinary `__call__`, a
DDP or FSDP2 wrapper would see every forward (issue 11). Backend: NCCL on CUDA, Gloo on CPU.
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


@torch.no_grad()
def average_gradients(params, info: DistInfo, local_ok: bool) -> bool:
    """Average `.grad` over processes in one all-reduce; returns whether every process had a
    finite loss (if one did not, all of them skip the step together). A parameter that no
    process gave a gradient keeps `grad = None` (as in one process: the optimizer skips it);
    one that only some processes did counts the others' as 0."""
    if not info.enabled:
        return local_ok
    params = [p for p in params if p.requires_grad]
    ref = params[0]
    wide = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32  # fp16/bf16: sum in fp32
    flags = [0.0 if local_ok else 1.0] + [float(p.grad is not None) for p in params]
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(wide)
                      for p in params] + [torch.tensor(flags, device=ref.device, dtype=wide)])
    dist.all_reduce(flat)
    flags = flat[-len(flags):].tolist()
    if flags[0] > 0:
        return False
    flat /= info.world_size
    offset = 0
    for p, has_grad in zip(params, flags[1:]):
        n = p.numel()
        if has_grad == 0:
            p.grad = None
        else:
            value = flat[offset:offset + n].view_as(p).to(p.dtype)
            if p.grad is None:
                p.grad = value.clone()
            else:
                p.grad.copy_(value)
        offset += n
    return True


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
    """Every process's `parts` (its batches rank, rank + world_size, ... as `fewstep.generate.generate`
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
