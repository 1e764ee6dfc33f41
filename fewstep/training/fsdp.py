"""Sharded data parallelism (`train.parallel = "fsdp"`, issue 11): the FSDP2 building blocks
`fewstep.training.fit.fit` calls.

    blocks(net)                    # what to shard (fewstep.networks.blocks; checkpointing uses it too)
    shard(net, precision="bf16")          # fully_shard each block, then the root; in place

FSDP2 (`torch.distributed.fsdp.fully_shard`) replaces every parameter by a `DTensor` sharded on
dim 0 over the processes; a module's forward all-gathers its block's parameters (a collective:
every process must run every forward of a sharded module) and its backward reduce-scatters the
gradients, averaged over processes. With `precision="bf16"` the forward runs in bfloat16 and the
gradients are reduced and kept in float32 (the parameters stay in their own dtype).

Checkpoints hold FULL tensors in one format whatever the number of processes, so that a run
saved by N sharded processes resumes on M, or in one unsharded process:

- `full_state_dict(net)` / `load_full_state_dict(net, state)`: weights (and an EMA net's).
- `full_optimizer_state(net, opt)` / `load_full_optimizer_state(net, opt, tensors, meta)`:
  tensors keyed `"<param FQN>/<state key>"` (`"blocks.0.linear.weight/exp_avg"`) plus a
  JSON-able `meta` (param groups with parameter FQNs, non-tensor state).

Rank behaviour: the getters are collectives (every process calls them); process 0 gets the full
dict, the others an empty one (`cpu_offload=True` gathers to rank 0 only). The loaders take the
full dict on EVERY process (each reads the checkpoint file) and keep their own shards.

The EMA (`fewstep.training.ema.EMA`) works unchanged: copy the net BEFORE sharding it, shard the copy
the same way (`shard(ema.net)`), and its `torch._foreach_lerp_` runs shard by shard on DTensors
with identical placements.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from fewstep.networks.blocks import blocks

PRECISIONS = ("fp32", "bf16")

__all__ = ["PRECISIONS", "clip_grad_norm", "full_optimizer_state", "full_state_dict", "is_sharded",
           "load_full_optimizer_state", "load_full_state_dict", "shard"]


def is_sharded(net: nn.Module) -> bool:
    return isinstance(net, FSDPModule)


def shard(net: nn.Module, precision: str = "fp32", mesh=None,
          called_outside_forward: tuple[str, ...] = ("weight_head",)) -> nn.Module:
    """`fully_shard` each of `blocks(net)`, then the root, over `mesh` (None: all
    processes of the default group). 'bf16': the blocks' forward in bfloat16 (the root's, with the
    time embedding, in float32), gradients reduced in float32;
    'fp32': the parameters' own dtype throughout. Returns `net` itself (sharded in place).

    `called_outside_forward`: submodules (by name) that the methods call directly rather than
    through `net(...)`, each made a unit of its own so that its call gathers its weights and
    casts its inputs: the adaptive-weight head (`net.adaptive_weight(t)`, docs/math.md#adaptive-weighting). Under
    'bf16' the root's weights stay bf16 after the forward, and a float32 `t` would meet them.

    Call on every process, after the replicas hold the same weights (broadcast first) and
    after anything that copies the unsharded net (the EMA)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    kwargs, root = {"mesh": mesh}, {"mesh": mesh}
    if precision == "bf16":
        # The blocks compute in bf16; the root (stem, head, time embedding) in float32, so that t
        # reaches the time embedding unrounded (a bf16 t near pi/2 is off by up to 0.008; rcm).
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                                   output_dtype=torch.float32)
        root["mp_policy"] = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    for block in blocks(net):
        fully_shard(block, **kwargs)
    for name in called_outside_forward:
        module = getattr(net, name, None)
        if isinstance(module, nn.Module) and any(True for _ in module.parameters()):
            fully_shard(module, **root)
    fully_shard(net, **root)
    return net


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The full, unsharded state dict on the CPU. Sharded: a collective (every process calls it);
    process 0 gets the dict, the others `{}`. Unsharded: the module's own state dict on the CPU."""
    if not is_sharded(module):
        return {k: v.detach().cpu() for k, v in module.state_dict().items()}
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dict(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a full state dict (as `full_state_dict` returns on process 0). Sharded: every process
    passes the full dict and keeps its shards (no communication). Unsharded: `load_state_dict`."""
    if not is_sharded(module):
        module.load_state_dict(state)
        return
    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True))


def _full_optimizer_dict(net: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    if is_sharded(net):
        return get_optimizer_state_dict(net, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # One process, plain tensors: the same FQN keys without the distributed machinery.
    names = {p: name for name, p in net.named_parameters(remove_duplicate=False)}
    state = {names[p]: dict(s) for p, s in optimizer.state.items()}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[p] for p in g["params"]]}
              for g in optimizer.param_groups]
    return {"state": state, "param_groups": groups}


def full_optimizer_state(net: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """The optimizer's state with full tensors, the same whether `net` is sharded or not and on any
    number of processes: `(tensors, meta)` with `tensors["<param FQN>/<key>"]` (CPU tensors:
    Adam's `exp_avg`, `exp_avg_sq` and its tensor `step`) and `meta = {"param_groups": [{..., "params":
    [FQN, ...]}], "state": {FQN: {key: number}}}` (JSON-able). Sharded: a collective; process 0
    gets the state, the others `({}, {})`."""
    osd = _full_optimizer_dict(net, optimizer)
    if not osd:
        return {}, {}
    tensors, scalars = {}, {}
    for fqn, s in osd["state"].items():
        for key, value in s.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{fqn}/{key}"] = value.detach().cpu().clone()
            else:
                scalars.setdefault(fqn, {})[key] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in osd["param_groups"]]
    return tensors, {"param_groups": groups, "state": scalars}


def load_full_optimizer_state(net: nn.Module, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                              meta: dict) -> None:
    """Load what `full_optimizer_state` returned on process 0 (every process passes it all; a
    sharded net keeps its shards). Parameters are matched by FQN, so the processes may differ
    in number from the run that saved it."""
    state: dict[str, dict] = {fqn: dict(s) for fqn, s in meta.get("state", {}).items()}
    for name, value in tensors.items():
        fqn, _, key = name.rpartition("/")
        state.setdefault(fqn, {})[key] = value
    groups = []
    for g, live in zip(meta["param_groups"], optimizer.param_groups):
        # JSON turns tuples (Adam's betas) into lists: give back the optimizer's own type.
        groups.append({k: (type(live[k])(v) if isinstance(live.get(k), tuple) else v) for k, v in g.items()})
    if len(meta["param_groups"]) != len(optimizer.param_groups):
        raise ValueError(f"the checkpoint has {len(meta['param_groups'])} parameter groups, "
                         f"the optimizer {len(optimizer.param_groups)}")
    osd = {"state": state, "param_groups": groups}
    if is_sharded(net):
        # strict=False: parameters that never had a gradient (a head the method does not use) have no state
        set_optimizer_state_dict(net, optimizer, osd, options=StateDictOptions(full_state_dict=True, strict=False))
        return
    params = dict(net.named_parameters(remove_duplicate=False))
    ids = {}  # plain `Optimizer.load_state_dict` keys parameters by their index over the groups
    for g in optimizer.param_groups:
        for p in g["params"]:
            ids[p] = len(ids)
    optimizer.load_state_dict({
        "state": {ids[params[fqn]]: s for fqn, s in state.items()},
        "param_groups": [{**g, "params": [ids[params[fqn]] for fqn in g["params"]]} for g in groups],
    })


@torch.no_grad()
def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` for plain or DTensor (FSDP2) gradients; returns the total
    norm over all processes as a plain tensor (a collective when the gradients are sharded)."""
    norm = torch.nn.utils.clip_grad_norm_(list(params), max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


# ----------------------------------------------------------------------------------------------
# Sharded checkpoints: each process writes its own shards (safetensors, never pickles); a run
# resumes on any number of processes by reading, per tensor, only the rows its new shard needs.


def _rows(n: int, world: int, rank: int) -> tuple[int, int]:
    """The dim-0 rows of `rank`'s shard of `n` rows over `world` processes (FSDP2: `torch.chunk`)."""
    size = -(-n // world)
    start = min(rank * size, n)
    return start, min(start + size, n)


def sharded_state(net: nn.Module, ema_net: nn.Module, optimizer: torch.optim.Optimizer
                  ) -> tuple[dict[str, torch.Tensor], dict]:
    """This process's shards of the weights, the EMA and the optimizer state, as CPU tensors keyed
    `net.<FQN>`, `ema.<FQN>`, `optim.<FQN>/<key>`, and the layout (full shapes; which tensors are
    sharded on dim 0) with the optimizer's JSON part. Replicated tensors (buffers, Adam's `step`)
    are kept by process 0 only. No communication."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    tensors, layout = {}, {}

    def put(name, value):
        if isinstance(value, DTensor):
            tensors[name] = value.to_local().detach().cpu().contiguous().clone()
            layout[name] = {"shape": list(value.shape), "sharded": True}
        elif isinstance(value, torch.Tensor):
            if rank == 0:
                tensors[name] = value.detach().cpu().contiguous().clone()
            layout[name] = {"shape": list(value.shape), "sharded": False}

    options = StateDictOptions(full_state_dict=False)
    for prefix, module in (("net", net), ("ema", ema_net)):
        for fqn, value in get_model_state_dict(module, options=options).items():
            put(f"{prefix}.{fqn}", value)
    osd = get_optimizer_state_dict(net, optimizer, options=options)
    scalars = {}
    for fqn, state in osd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                put(f"optim.{fqn}/{key}", value)
            else:
                scalars.setdefault(fqn, {})[key] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in osd["param_groups"]]
    return tensors, {"layout": layout, "optimizer": {"param_groups": groups, "state": scalars}}


def read_rows(files: list[Path], name: str, shape: list[int], rows: tuple[int, int]) -> torch.Tensor:
    """Rows `[a, b)` of the full tensor `name`, sharded on dim 0 over `files` (one per process of
    the run that wrote them), reading only the overlapping slices."""
    from safetensors import safe_open

    a, b = rows
    parts = []
    for j, path in enumerate(files):
        lo, hi = _rows(shape[0], len(files), j)
        start, stop = max(a, lo), min(b, hi)
        if start < stop:
            with safe_open(str(path), framework="pt") as f:
                parts.append(f.get_slice(name)[start - lo:stop - lo])
    if not parts:
        return torch.empty(0, *shape[1:])
    return torch.cat(parts)


def _replicated(files: list[Path], name: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(files[0]), framework="pt") as f:
        return f.get_tensor(name)


def read_full(files: list[Path], layout: dict, prefix: str) -> dict[str, torch.Tensor]:
    """The full tensors under `prefix` (e.g. 'ema') of a sharded checkpoint, unprefixed."""
    out = {}
    for name, info in layout.items():
        if name.startswith(prefix + "."):
            out[name[len(prefix) + 1:]] = (read_rows(files, name, info["shape"], (0, info["shape"][0]))
                                           if info["sharded"] else _replicated(files, name))
    return out


def shard_files(directory: Path, processes: int) -> list[Path]:
    """The per-process files of a sharded checkpoint, in rank order (all must exist)."""
    files = [Path(directory) / f"rank{r:05d}.safetensors" for r in range(processes)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"sharded checkpoint {directory} lacks {', '.join(missing[:3])}")
    return files


def load_sharded_state(files: list[Path], meta: dict, net: nn.Module, ema_net: nn.Module,
                       optimizer: torch.optim.Optimizer) -> None:
    """Load what `sharded_state` wrote (`files`: one per process of that run, in rank order) into
    `net`, `ema_net` and `optimizer`, sharded over any number of processes now, or not sharded."""
    layout = meta["layout"]
    if not is_sharded(net):  # one process: the full tensors
        load_full_state_dict(net, read_full(files, layout, "net"))
        load_full_state_dict(ema_net, read_full(files, layout, "ema"))
        load_full_optimizer_state(net, optimizer, read_full(files, layout, "optim"), meta["optimizer"])
        return
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    options = StateDictOptions(full_state_dict=False)

    def local(name: str, template) -> torch.Tensor:
        info = layout[name]
        if not info["sharded"]:
            return _replicated(files, name).to(template.device if isinstance(template, torch.Tensor) else "cpu")
        rows = read_rows(files, name, info["shape"], _rows(info["shape"][0], world, rank))
        return DTensor.from_local(rows.to(template.device_mesh.device_type), template.device_mesh,
                                  template.placements, shape=template.shape, stride=template.stride())

    for prefix, module in (("net", net), ("ema", ema_net)):
        templates = get_model_state_dict(module, options=options)
        set_model_state_dict(module, {fqn: local(f"{prefix}.{fqn}", t) for fqn, t in templates.items()},
                             options=options)
    params = get_model_state_dict(net, options=options)  # the optimizer state is shaped as its parameter
    state: dict[str, dict] = {fqn: dict(s) for fqn, s in meta["optimizer"].get("state", {}).items()}
    for name in layout:
        if name.startswith("optim."):
            fqn, _, key = name[6:].rpartition("/")
            state.setdefault(fqn, {})[key] = local(name, params[fqn])
    groups = [{k: (type(live[k])(v) if isinstance(live.get(k), tuple) else v) for k, v in g.items()}
              for g, live in zip(meta["optimizer"]["param_groups"], optimizer.param_groups)]
    set_optimizer_state_dict(net, optimizer, {"state": state, "param_groups": groups},
                             options=StateDictOptions(full_state_dict=False, strict=False))
