"""How `fit` spreads one optimizer step over processes (`train.parallel`): a strategy object.

    parallel = make_parallel("ddp", dist_info, device)
    model, optimizer = parallel.prepare(net, ema.net, method, optimizer, precision)

- `Parallel` ('none'): one process, the network itself.
- `DDP`: every process holds the whole model; gradients are averaged in buckets (`wrap_ddp`).
- `FSDP`: parameters, gradients and optimizer state sharded per block (`fewstep.training.fsdp`);
  the EMA and the method's extra networks (an EMA target, a teacher) are sharded the same way.

A strategy wraps or shards, rebuilds the optimizer over sharded parameters, clips, gathers the
full state for checkpoints and loads it back, and decides how micro-batches synchronise. The
collectives (`all_true`, `any_true`, `gather`, `barrier`) are answered locally with one process.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from fewstep.training import fsdp
from fewstep.training.distributed import DistInfo, any_process, barrier, gather_objects, wrap_ddp

MODES = ("auto", "none", "ddp", "fsdp")


def make_parallel(mode: str, info: DistInfo, device: torch.device) -> "Parallel":
    """The strategy of `mode` ('auto': ddp with several processes, none with one)."""
    if mode not in MODES:
        raise ValueError(f"parallel must be one of {list(MODES)}, got {mode!r}")
    if mode == "auto":
        mode = "ddp" if info.enabled else "none"
    if mode == "none" and info.enabled:
        raise ValueError(f"parallel 'none' with {info.world_size} processes would train {info.world_size} "
                         f"separate models; use 'ddp' or 'fsdp'")
    return {"none": Parallel, "ddp": DDP, "fsdp": FSDP}[mode](info, device)


class Parallel:
    """One process: the network as it is. The base of the other strategies."""

    name = "none"

    def __init__(self, info: DistInfo, device: torch.device):
        self.info, self.device = info, device

    @property
    def is_main(self) -> bool:
        return self.info.is_main

    def prepare(self, net: nn.Module, ema_net: nn.Module, method, optimizer: torch.optim.Optimizer,
                precision: str) -> tuple[nn.Module, torch.optim.Optimizer]:
        """(what the method calls, the optimizer over the parameters that train)."""
        return net, optimizer

    def prepare_auxiliary(self, module: nn.Module, ema_net: nn.Module | None, precision: str) -> nn.Module:
        """A network a method trains beside `net` with its own optimizer (`fewstep.training.auxiliary`):
        what its loss calls. Its parameters (sharded in place under fsdp) are the ones to optimize."""
        return module

    def micro_batch(self, model: nn.Module, last: bool):
        """The context of one micro-batch's forward and backward (`last`: the step's last one)."""
        return contextlib.nullcontext()

    def clip(self, net: nn.Module, max_norm: float | None) -> torch.Tensor:
        """Clip the gradients to `max_norm` (None or 0: only measure); the total norm."""
        return fsdp.clip_grad_norm(net.parameters(), max_norm or float("inf"))

    def ema_view(self, ema_net: nn.Module) -> nn.Module:
        """The EMA network callbacks sample (process 0)."""
        return ema_net

    def refresh_ema_view(self, ema_net: nn.Module, needed: bool) -> None:
        """Bring `ema_view` up to date when `needed` (decided the same way on every process)."""

    # -- state for checkpoints: full tensors keyed by name, whatever the strategy ---------------

    def full_state(self, module: nn.Module) -> dict[str, torch.Tensor]:
        return fsdp.full_state_dict(module)

    def full_optimizer_state(self, net: nn.Module, optimizer) -> tuple[dict[str, torch.Tensor], dict]:
        return fsdp.full_optimizer_state(net, optimizer)

    def load_full_state(self, module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        fsdp.load_full_state_dict(module, tensors)

    def load_full_optimizer_state(self, net: nn.Module, optimizer, tensors: dict[str, torch.Tensor],
                                  meta: dict) -> None:
        fsdp.load_full_optimizer_state(net, optimizer, tensors, meta)

    def method_state(self, method) -> dict[str, torch.Tensor]:
        """The method's state tensors (an EMA target, a teacher), full, on the CPU."""
        return {k: v.detach().cpu() for k, v in method.state_tensors().items()}

    def load_method_state(self, method, net: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        method.load_state_tensors(net, tensors)

    # -- collectives ------------------------------------------------------------------------

    def all_true(self, flag: bool) -> bool:
        return not any_process(not flag, self.info, self._comm_device())

    def any_true(self, flag: bool) -> bool:
        return any_process(flag, self.info, self._comm_device())

    def gather(self, obj) -> list:
        return gather_objects(obj, self.info)

    def barrier(self) -> None:
        barrier(self.info)

    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")  # NCCL: CUDA tensors


class DDP(Parallel):
    """DistributedDataParallel: the whole model on every process, gradients averaged."""

    name = "ddp"

    def prepare(self, net, ema_net, method, optimizer, precision):
        return wrap_ddp(net, self.device), optimizer

    def prepare_auxiliary(self, module, ema_net, precision):
        return wrap_ddp(module, self.device)

    def micro_batch(self, model, last):
        # Not `model.no_sync()`: under DDP(static_graph=True), which the methods' several forwards per
        # step need, it crashes at the first backward ("expect_autograd_hooks_ INTERNAL ASSERT FAILED")
        # and once past that stops all-reducing (pytorch#143580, #187732). Every micro-batch all-reduces
        # instead, which is exact: the mean of (g_prev + g_local) over processes is g_prev + mean(g_local).
        return contextlib.nullcontext()


class FSDP(Parallel):
    """FSDP2 (`fewstep.training.fsdp.shard`): every parameter a DTensor shard. The EMA network and
    the method's extra networks are sharded like the network, so that the EMA update and the
    target's update run shard by shard."""

    name = "fsdp"

    def prepare(self, net, ema_net, method, optimizer, precision):
        param_names = {id(p): n for n, p in net.named_parameters()}
        names = [[param_names[id(p)] for p in group["params"]] for group in optimizer.param_groups]
        # Created before sharding (a target copies the unsharded net), then sharded the same way.
        extra = method.extra_networks(net) if hasattr(method, "extra_networks") else {}
        self.preview = copy.deepcopy(ema_net) if self.is_main else None  # unsharded, for callbacks
        for module in (net, ema_net, *extra.values()):
            fsdp.shard(module, precision)  # in place: every parameter becomes a DTensor shard
        for module in extra.values():
            # FSDP2 keeps a root's weights gathered after its forward, for the backward; these run
            # without one, and their weights must be shards again for the update (a lerp on shards).
            module.register_forward_hook(lambda module, args, output: module.reshard())
        params = dict(net.named_parameters())
        groups = [{**{k: v for k, v in group.items() if k != "params"}, "params": [params[n] for n in group_names]}
                  for group, group_names in zip(optimizer.param_groups, names)]
        return net, type(optimizer)(groups, **optimizer.defaults)

    def prepare_auxiliary(self, module, ema_net, precision):
        for m in (module, ema_net):
            if m is not None:
                fsdp.shard(m, precision)
        if ema_net is not None:
            ema_net.register_forward_hook(lambda m, args, output: m.reshard())
        # The method also reads the auxiliary without gradients (DMD2: the fake score in the generator's
        # loss); the root would keep its weights gathered after such a forward, stale once its optimizer steps.
        module.register_forward_hook(lambda m, args, output: None if torch.is_grad_enabled() else m.reshard())
        return module

    def ema_view(self, ema_net):
        return self.preview if self.is_main else ema_net

    def refresh_ema_view(self, ema_net, needed):
        if needed:
            full = fsdp.full_state_dict(ema_net)  # a collective
            if self.is_main:
                self.preview.load_state_dict(full)

    def method_state(self, method):
        from torch.distributed.tensor import DTensor

        out = {}
        for key, value in method.state_tensors().items():  # the same keys, in order, everywhere
            value = value.full_tensor() if isinstance(value, DTensor) else value
            out[key] = value.detach().cpu()
        return out

    def load_method_state(self, method, net, tensors):
        from torch.distributed.tensor import DTensor, distribute_tensor

        live = method.state_tensors()
        local = {}
        for key, value in tensors.items():
            template = live.get(key)
            if isinstance(template, DTensor):  # every process holds the full tensor: keep its own rows
                value = distribute_tensor(value.to(template.device_mesh.device_type), template.device_mesh,
                                          template.placements, src_data_rank=None)
            local[key] = value
        method.load_state_tensors(net, local)
