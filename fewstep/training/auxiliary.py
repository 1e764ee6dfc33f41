"""Networks a method trains beside the main one (`Method.auxiliaries`, e.g. DMD2's fake score):
the one object `fit` calls for them, knowing no method.

    aux = Auxiliaries(method.auxiliaries(net), parallel, precision, device,   # before the loop
                      "radam", lr_schedule, base_lr)
    stats, skipped = aux.train(net, batches, step)                            # each step, before net's
    tensors, meta = aux.state(); aux.load(tensors, meta)                      # in checkpoints

Each auxiliary has its own optimizer (the run's kind, `optim.name`) at its own rate `lr`, which
follows the run's schedule when there is one: `lr * lr_schedule(step) / base_lr`, the run's warmup
and decay scaled to it. It has its own gradient clipping, optional EMA and pace (`updates_per_step`:
by the end of step s it has had `floor(updates_per_step * (s + 1))` updates, so that a cycle of the
two time scales may span several steps and a checkpoint may fall inside one). An update runs the
step's micro-batches (gradient accumulation), skips together on every process when its loss or
gradient is not finite, and counts as done either way: the schedule depends on the step alone.
"""

from __future__ import annotations

import torch

from fewstep.devices import autocast_context
from fewstep.training.checkpoint import prefixed, unprefixed
from fewstep.training.distributed import broadcast_parameters
from fewstep.training.ema import EMA
from fewstep.training.optimizers import new_optimizer


class _Trained:
    """One auxiliary network with what trains it."""

    def __init__(self, name, spec, parallel, precision, device, optimizer, eps):
        self.name, self.spec, self.updates = name, spec, 0
        module = spec.net.to(device).train()
        broadcast_parameters(module, parallel.info)  # e.g. a freshly drawn head: the same everywhere
        self.module = module
        self.ema = EMA(module, spec.ema_decay) if spec.ema_decay is not None else None
        self.model = parallel.prepare_auxiliary(module, None if self.ema is None else self.ema.net, precision)
        # Built after sharding: the optimizer holds the (sharded) parameters that train.
        params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = new_optimizer(optimizer, params, spec.lr, spec.betas, spec.weight_decay, eps)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")


class Auxiliaries:
    """The auxiliary networks of a run (none: every call does nothing)."""

    def __init__(self, specs: dict, parallel, precision: str = "fp32", device: torch.device | None = None,
                 optimizer: str = "adam", lr_schedule=None, base_lr: float | None = None, eps: float = 1e-8):
        if specs and lr_schedule is not None and not (base_lr or 0) > 0:
            raise ValueError(f"auxiliary networks follow the lr schedule relative to the run's base rate, "
                             f"which must be > 0; got {base_lr}")
        self.parallel, self.precision = parallel, precision
        self.device = device or parallel.device
        self.lr_schedule, self.base_lr = lr_schedule, None if base_lr is None else float(base_lr)
        self.nets = [_Trained(name, spec, parallel, precision, self.device, optimizer, eps)
                     for name, spec in specs.items()]

    def __bool__(self) -> bool:
        return bool(self.nets)

    def train(self, net: torch.nn.Module, batches: list, step: int) -> tuple[dict, int]:
        """The updates step `step` owes each auxiliary, over the step's micro-batches `[(x0, labels)]`
        (on the device). Returns their mean stats (keys `<name>.<stat>`) and how many were skipped."""
        stats, skipped = {}, 0
        for aux in self.nets:
            owed = aux.spec.updates_by(step) - aux.updates
            if self.lr_schedule is not None and owed > 0:  # a function of the step: resumes exactly
                lr = aux.spec.lr * self.lr_schedule(step) / self.base_lr
                for group in aux.optimizer.param_groups:
                    group["lr"] = lr
                stats[f"{aux.name}.lr"] = lr
            for _ in range(max(owed, 0)):
                done = self._update(aux, net, batches, step)
                aux.updates += 1
                if done is None:
                    skipped += 1
                    continue
                for key, value in done.items():
                    name = f"{aux.name}.{key}"
                    stats[name] = stats.get(name, 0.0) + value / owed
        return stats, skipped

    def _update(self, aux: _Trained, net, batches, step) -> dict | None:
        p, k = self.parallel, len(batches)
        aux.optimizer.zero_grad(set_to_none=True)
        totals = {}
        for micro, (x0, labels) in enumerate(batches):
            with p.micro_batch(aux.model, last=micro == k - 1):
                with autocast_context(self.device, self.precision):
                    per_sample, stats = aux.spec.loss(aux.model, net, x0, labels, step)
                loss = per_sample.mean()
                if not p.all_true(bool(torch.isfinite(loss.detach()))):  # all skip, before any backward
                    aux.optimizer.zero_grad(set_to_none=True)
                    return None
                aux.scaler.scale(loss / k).backward()
            for key, value in {"loss": loss, **stats}.items():
                totals[key] = totals.get(key, 0.0) + value.detach().float() / k
        aux.scaler.unscale_(aux.optimizer)
        totals["grad_norm"] = p.clip(aux.module, aux.spec.grad_clip)
        if not (bool(torch.isfinite(totals["grad_norm"])) or aux.scaler.is_enabled()):
            aux.optimizer.zero_grad(set_to_none=True)
            return None
        scale = aux.scaler.get_scale() if aux.scaler.is_enabled() else None
        aux.scaler.step(aux.optimizer)
        aux.scaler.update()
        if scale is not None and aux.scaler.get_scale() < scale:  # fp16 overflow: skipped, the scale drops
            return {}  # (as for the main network, not counted as a non-finite step)
        if aux.ema is not None:
            aux.ema.update(aux.module, aux.updates)
        return totals

    # -- checkpoints: full tensors keyed `aux.<name>.{net,ema,optim}.*`, counters in the JSON -----

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Every process calls it (a collective under fsdp); process 0 gets the tensors."""
        p, tensors, meta = self.parallel, {}, {}
        for aux in self.nets:
            prefix = f"aux.{aux.name}"
            tensors.update(prefixed(prefix + ".net", p.full_state(aux.module)))
            if aux.ema is not None:
                tensors.update(prefixed(prefix + ".ema", p.full_state(aux.ema.net)))
            opt_tensors, opt_meta = p.full_optimizer_state(aux.module, aux.optimizer)
            tensors.update(prefixed(prefix + ".optim", opt_tensors))
            meta[aux.name] = {"updates": aux.updates, "optimizer": opt_meta,
                              "grad_scaler": aux.scaler.state_dict() if aux.scaler.is_enabled() else None}
        return tensors, meta

    def load(self, tensors: dict[str, torch.Tensor], meta: dict | None) -> None:
        meta = meta or {}
        missing = [aux.name for aux in self.nets if aux.name not in meta]
        if missing:
            raise ValueError(f"the checkpoint holds no state for the auxiliary network(s) {missing} this method "
                             f"trains; it was written by another method")
        p = self.parallel
        for aux in self.nets:
            prefix, own = f"aux.{aux.name}", meta[aux.name]
            p.load_full_state(aux.module, unprefixed(prefix + ".net", tensors))
            if aux.ema is not None:
                ema = unprefixed(prefix + ".ema", tensors)
                p.load_full_state(aux.ema.net, ema or unprefixed(prefix + ".net", tensors))
            p.load_full_optimizer_state(aux.module, aux.optimizer, unprefixed(prefix + ".optim", tensors),
                                        own["optimizer"])
            if own.get("grad_scaler") and aux.scaler.is_enabled():
                aux.scaler.load_state_dict(own["grad_scaler"])
            aux.updates = int(own["updates"])
