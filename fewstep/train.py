"""The training loop, `fit`: built objects in, a run folder out (EDM2's shape: the loop builds
nothing and knows no method).

    from fewstep import fit
    fit(net, method, loader, "runs/mine", steps=2000, optimizer=torch.optim.Adam(net.parameters(), 1e-3))

Per step: a batch, the method's per-sample loss, a NaN/Inf guard, backward, gradient clipping,
an optimizer step, EMA, the method's after-step hook. Periodically: JSONL stats, callbacks (sample
grids), checkpoints (atomic safetensors + JSON; a run resumes exactly from its latest good one,
data order included). At the end: loss curves and `metrics.json`. `fewstep.build.train(cfg)` is
`fit` over the objects `build(cfg)` makes from a config.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from tqdm.auto import tqdm

from fewstep import checkpoint as ckpt
from fewstep.devices import autocast_context, resolve_device
from fewstep.distributed import (average_gradients, barrier, broadcast_parameters, gather_objects, init_distributed,
                                 shutdown_distributed)
from fewstep.ema import EMA
from fewstep.methods.base import as_method


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses or gradients in a row."""


# ----------------------------------------------------------------------------------------------
# Callbacks: what the loop lets other code do (previews, extra logging)


@dataclass
class Run:
    """What callbacks see of a run in progress."""

    out_dir: Path
    net: torch.nn.Module
    ema_net: torch.nn.Module
    method: object
    data_info: dict  # kind, shape, num_classes
    total_steps: int
    step: int = 0
    config: dict = field(default_factory=dict)


class Callback:
    """Hooks of `fit`, called on the main process only. Override what you need."""

    def on_log(self, run: Run, record: dict) -> None:
        """After each JSONL record (every `log_every` steps)."""

    def on_step(self, run: Run) -> None:
        """After each optimizer step (`run.step` counts the steps done)."""

    def on_end(self, run: Run) -> dict | None:
        """At the end; a returned dict is merged into `metrics.json`."""


# ----------------------------------------------------------------------------------------------
# RNG states in checkpoints


def rng_tensors(device: torch.device, rank: int = 0) -> dict[str, torch.Tensor]:
    """This process's RNG states, keyed by rank (process 0: 'rng.cpu', others 'rng.cpu.rank<r>')."""
    suffix = f".rank{rank}" if rank else ""
    out = {f"rng.cpu{suffix}": torch.get_rng_state()}
    if device.type == "cuda":
        out[f"rng.cuda{suffix}"] = torch.cuda.get_rng_state(device)
    return out


def restore_rng(tensors: dict[str, torch.Tensor], device: torch.device, rank: int = 0) -> None:
    """Restore this process's RNG states if the checkpoint has them (a run resumed on more
    processes than it was saved with keeps the fresh seeds of the new ones)."""
    suffix = f".rank{rank}" if rank else ""
    if f"rng.cpu{suffix}" in tensors:
        torch.set_rng_state(tensors[f"rng.cpu{suffix}"].cpu())
    if device.type == "cuda" and f"rng.cuda{suffix}" in tensors:
        torch.cuda.set_rng_state(tensors[f"rng.cuda{suffix}"].cpu(), device)


# ----------------------------------------------------------------------------------------------
# Batches, with a position that checkpoints keep


def split_batch(batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A batch is `x0`, `(x0,)` or `(x0, labels)`."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) in (1, 2) and isinstance(batch[0], torch.Tensor):
        return batch[0], (batch[1] if len(batch) == 2 else None)
    raise TypeError(f"a batch must be a tensor x0, (x0,) or (x0, labels); got {type(batch).__name__}"
                    + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""))


class BatchStream:
    """Endless batches from an iterable, epoch after epoch, with a resumable position.

    A loader whose batch sampler has `set_position(epoch, batch)` (`fewstep.data.make_loader`)
    is positioned directly. Any other re-iterable (a DataLoader with `shuffle=True`, say) is
    replayed: its iterator is created again from the CPU RNG state of the epoch's start, and the
    batches already consumed are skipped, so the order is the same as without the interruption.
    """

    def __init__(self, data: Iterable):
        self.data = data
        sampler = getattr(data, "batch_sampler", None)
        self.positioned = callable(getattr(sampler, "set_position", None))
        self.epoch, self.batch = 0, 0
        self.epoch_rng: torch.Tensor | None = None
        self._it = None

    def state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        tensors = {} if self.epoch_rng is None else {"data.epoch_rng": self.epoch_rng}
        return {"epoch": self.epoch, "batch": self.batch}, tensors

    def load_state(self, position: dict | None, tensors: dict[str, torch.Tensor]) -> None:
        if position:
            self.epoch, self.batch = int(position["epoch"]), int(position["batch"])
        self.epoch_rng = tensors.get("data.epoch_rng")

    def _start_epoch(self, skip: int) -> None:
        if self.positioned:
            self.data.batch_sampler.set_position(self.epoch, skip)
            self._it = iter(self.data)
            return
        if skip and self.epoch_rng is not None:  # replay the epoch's shuffle and worker seeds, then skip
            now = torch.get_rng_state()
            torch.set_rng_state(self.epoch_rng)
            self._it = iter(self.data)
            for _ in range(skip):
                next(self._it)
            torch.set_rng_state(now)  # the checkpoint's state already includes what iter() drew
            return
        self.epoch_rng = torch.get_rng_state()
        self._it = iter(self.data)
        for _ in range(skip):
            next(self._it)

    def __next__(self):
        if self._it is None:
            self._start_epoch(self.batch)
        try:
            batch = next(self._it)
        except StopIteration:
            if self.batch == 0:
                raise ValueError("the training data yielded no batches") from None
            self.epoch, self.batch = self.epoch + 1, 0
            self._start_epoch(0)
            try:
                batch = next(self._it)
            except StopIteration:
                raise ValueError("the training data yielded no batches") from None
        self.batch += 1
        return batch


# ----------------------------------------------------------------------------------------------
# The loop


def _data_info(data, x0: torch.Tensor, net) -> dict:
    info = {"kind": getattr(data, "kind", None), "shape": list(getattr(data, "shape", x0.shape[1:])),
            "num_classes": int(getattr(data, "num_classes", getattr(net, "num_classes", 0)) or 0)}
    if info["kind"] is None:
        info["kind"] = "image" if x0.ndim == 4 else "vector"
    return info


def _record_of(net, method) -> tuple[dict | None, dict]:
    """What a checkpoint needs to rebuild the network and the method (None: an unregistered net)."""
    from fewstep.methods.base import method_config
    from fewstep.networks.registry import UnknownNetworkError, network_spec

    try:
        spec = network_spec(net)
    except UnknownNetworkError as e:
        warnings.warn(f"{e}; training continues, but `fewstep sample` will not be able to load its checkpoints",
                      stacklevel=3)
        spec = None
    try:
        method_cfg = method_config(method)
    except ValueError as e:
        warnings.warn(f"{e}; training continues, but `fewstep sample` will not know how to sample it", stacklevel=3)
        method_cfg = {"name": getattr(method, "name", type(method).__name__)}
    return spec, method_cfg


def fit(net: torch.nn.Module, method, data: Iterable, out_dir: str | Path, *, steps: int,
        optimizer: torch.optim.Optimizer | None = None, lr_schedule: Callable[[int], float] | None = None,
        batch_size: int | None = None, workers: int = 0, ema_decay: float = 0.999,
        ema_sigma_rel: float | None = None, device: str | torch.device | None = "auto", precision: str = "fp32",
        grad_clip: float | None = 1.0, seed: int = 0, log_every: int = 50, ckpt_every: int = 500,
        keep_ckpts: int = 2, resume: bool = True, max_nonfinite: int = 10, progress: bool = True,
        callbacks: Iterable[Callback] = (), config: dict | None = None, data_info: dict | None = None) -> dict:
    """Train `net` with `method` on `data` for `steps` optimizer steps, writing `out_dir`.

    net:       any `nn.Module` under the network contract `F(x_t / sigma_d, t, labels=None, **cond)`
               (see `fewstep.networks`); register its class (`register_network`) so that
               `fewstep sample` can rebuild it from the checkpoints.
    method:    a training objective, `loss, stats = method(net, x0, labels, step)` (`fewstep.methods`).
    data:      any iterable of batches `x0`, `(x0,)` or `(x0, labels)` -- a `torch.utils.data.DataLoader`
               included -- or a `fewstep.data.Dataset` (then batched by `make_loader` with `batch_size`,
               `workers`, shuffled per epoch and split across torchrun processes).
    optimizer: default Adam(lr=1e-3, betas=(0.9, 0.99)); `lr_schedule(step) -> lr` sets the rate each step.
    callbacks: `Callback`s, e.g. `fewstep.callbacks.SamplePreviews`.
    config:    a dict recorded in checkpoints and `config.json` (the CLI's whole run config).

    Resumes from the latest good checkpoint in `out_dir` when `resume`. Returns the summary that
    `metrics.json` holds.
    """
    from fewstep.data import Dataset, make_loader

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    for name, value in (("log_every", log_every), ("keep_ckpts", keep_ckpts), ("max_nonfinite", max_nonfinite)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out_dir / "checkpoints"
    dist_info, device = init_distributed(resolve_device(device))
    main_process = dist_info.is_main
    net.to(device)
    broadcast_parameters(net, dist_info)
    torch.manual_seed(seed + 1_000_003 * dist_info.rank)  # each process draws its own noise
    if isinstance(data, Dataset):
        if batch_size is None:
            raise ValueError("fit needs batch_size= to batch a fewstep Dataset")
        data_info = data_info or {"kind": data.kind, "shape": list(data.shape), "num_classes": data.num_classes}
        data = make_loader(data, batch_size, seed=seed, rank=dist_info.rank, world_size=dist_info.world_size,
                           workers=workers, pin_memory=device.type == "cuda")
    stream = BatchStream(data)
    if optimizer is None:
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-3, betas=(0.9, 0.99))
    method = as_method(method)
    method.setup(net, steps)
    ema = EMA(net, ema_decay, ema_sigma_rel)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    spec, method_cfg = _record_of(net, method)
    config = dict(config) if config else {"method": method_cfg, "train": {"steps": steps, "seed": seed}}
    if main_process and "data" in config:
        (out_dir / "config.json").write_text(json.dumps(config, indent=1))

    step, nonfinite_total = 0, 0
    found = ckpt.load_latest_good(ckpt_dir, device=device) if resume else None
    if found is not None:
        path, tensors, state = found
        net.load_state_dict(ckpt.unprefixed("net", tensors))
        ema.load_state_dict(ckpt.unprefixed("ema", tensors))
        ckpt.optimizer_from_flat(optimizer, ckpt.unprefixed("optim", tensors), state["optimizer"])
        if state.get("grad_scaler") and scaler.is_enabled():
            scaler.load_state_dict(state["grad_scaler"])
        method.load_state_tensors(net, ckpt.unprefixed("target", tensors))
        restore_rng(tensors, device, dist_info.rank)
        stream.load_state(state.get("data_position"), {k: v.cpu() for k, v in tensors.items()
                                                       if k.startswith("data.")})
        step, nonfinite_total = state["step"], state.get("nonfinite_total", 0)
        data_info = data_info or state.get("data")
        if main_process:
            print(f"resumed from {path} at step {step}")

    def last_good() -> str:
        good = ckpt.list_checkpoints(ckpt_dir)
        return f"the last good checkpoint is {good[-1]}" if good else "no checkpoint was written yet"

    def save(at_step: int, gather: bool = True) -> None:
        """All processes call this (their RNG states are gathered); process 0 writes."""
        rngs = (gather_objects({k: v.cpu() for k, v in rng_tensors(device, dist_info.rank).items()}, dist_info)
                if gather else [rng_tensors(device, dist_info.rank)])
        if not main_process:
            return
        opt_tensors, opt_meta = ckpt.optimizer_to_flat(optimizer)
        position, data_tensors = stream.state()
        tensors = {**ckpt.prefixed("net", net.state_dict()), **ckpt.prefixed("ema", ema.state_dict()),
                   **ckpt.prefixed("optim", opt_tensors), **{k: v for r in rngs for k, v in r.items()},
                   **data_tensors}
        tensors.update(ckpt.prefixed("target", method.state_tensors()))  # e.g. an EMA target (CD, CT)
        ckpt.save_checkpoint(ckpt_dir, at_step, tensors,
                             {"config": config, "network": spec, "method": method_cfg, "data": data_info,
                              "optimizer": opt_meta, "nonfinite_total": nonfinite_total,
                              "grad_scaler": scaler.state_dict() if scaler.is_enabled() else None,
                              "data_position": position})
        ckpt.prune_checkpoints(ckpt_dir, keep_ckpts)

    run = Run(out_dir, net, ema.net, method, data_info or {}, steps, step, config)
    callbacks = list(callbacks)
    log_path = out_dir / "log.jsonl"
    if step == 0 and log_path.exists() and main_process:
        log_path.unlink()  # a fresh run: no stale records
    nonfinite_run, acc, acc_n, t_last, step_last = 0, {}, 0, time.perf_counter(), step
    bar = tqdm(total=steps, initial=step, disable=not (progress and main_process), dynamic_ncols=True, unit="step")
    net.train()
    try:
        while step < steps:
            if lr_schedule is not None:
                for group in optimizer.param_groups:
                    group["lr"] = lr_schedule(step)
            x0, labels = split_batch(next(stream))
            if data_info is None:
                data_info = run.data_info = _data_info(data, x0, net)
            x0 = x0.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True) if labels is not None and getattr(net, "num_classes", 0) \
                else None
            with autocast_context(device, precision):
                per_sample, stats = method(net, x0, labels, step)
            loss = per_sample.mean()
            optimizer.zero_grad(set_to_none=True)
            ok = bool(torch.isfinite(loss))
            if ok:
                scaler.scale(loss).backward()
            ok = average_gradients(net.parameters(), dist_info, ok)  # several processes: all or none step
            if ok:
                scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip or math.inf)
                ok = bool(torch.isfinite(grad_norm)) or scaler.is_enabled()
            if ok:
                scaler.step(optimizer)  # skips the step itself when fp16 gradients overflowed
                scaler.update()
                ema.update(net, step)
                if method.after_step(net, step):
                    ema.net.load_state_dict(net.state_dict())  # e.g. a new progressive-distillation round
                nonfinite_run = 0
                for key, value in {"loss": loss.detach(), "grad_norm": grad_norm, **stats}.items():
                    acc[key] = acc.get(key, 0.0) + value.detach().float()  # no sync until logged
                acc_n += 1
            else:
                optimizer.zero_grad(set_to_none=True)
                nonfinite_run += 1
                nonfinite_total += 1
                if nonfinite_run >= max_nonfinite:
                    raise NonFiniteLossError(
                        f"{nonfinite_run} non-finite losses/gradients in a row at step {step}; stopping. "
                        f"Try a lower learning rate, precision 'fp32'/'bf16', or a smaller method.p_std; "
                        f"{last_good()}.")
            step += 1
            run.step = step
            bar.update(1)

            if (step % log_every == 0 or step == steps) and main_process:  # process 0's stats
                now = time.perf_counter()
                record = {"step": step, **{k: float(v) / max(acc_n, 1) for k, v in acc.items()},
                          "lr": optimizer.param_groups[0]["lr"],
                          "steps_per_s": (step - step_last) / max(now - t_last, 1e-9),
                          "nonfinite_total": nonfinite_total}
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}", skipped=nonfinite_total)
                for cb in callbacks:
                    cb.on_log(run, record)
                acc, acc_n, t_last, step_last = {}, 0, now, step
            if main_process:
                for cb in callbacks:
                    cb.on_step(run)
            if ckpt_every and step % ckpt_every == 0 and step < steps:
                save(step)
    except KeyboardInterrupt:
        bar.close()
        save(step, gather=False)  # no collectives while the other processes are being stopped too
        if main_process:
            print(f"\ninterrupted: checkpoint saved at step {step} in {ckpt_dir}")
        raise
    bar.close()
    save(step)
    if not main_process:
        barrier(dist_info)  # process 0 writes samples and plots, then releases everyone
        shutdown_distributed(dist_info)
        return {"steps": step, "rank": dist_info.rank}

    summary = {"steps": step, "nonfinite_total": nonfinite_total}
    for cb in callbacks:
        summary.update(cb.on_end(run) or {})
    from fewstep.plot import plot_log, read_log

    records = read_log(log_path) if log_path.exists() else []
    if records:
        plot_log(records, out_dir / "loss.png", title=f"{method_cfg['name']} training")
    summary["final"] = records[-1] if records else {}
    (out_dir / "metrics.json").write_text(json.dumps(summary, indent=1))
    barrier(dist_info)
    shutdown_distributed(dist_info)
    return summary
