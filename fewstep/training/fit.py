"""The training loop, `fit`: built objects in, a run folder out (EDM2's shape: the loop builds
nothing and knows no method).

    from fewstep import fit
    fit(net, method, loader, "runs/mine", steps=2000, optimizer=torch.optim.Adam(net.parameters(), 1e-3))

Per step: a batch, the method's per-sample loss, a NaN/Inf guard, backward, gradient clipping,
an optimizer step, EMA, the method's after-step hook. Periodically: JSONL stats, callbacks (sample
grids), checkpoints (atomic safetensors + JSON; a run resumes exactly from its latest good one,
data order included). At the end: loss curves and `metrics.json`. `fewstep.training.build.train(cfg)` is
`fit` over the objects `build(cfg)` makes from a config.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import math
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from fewstep.training import checkpoint as ckpt
from fewstep.devices import autocast_context, resolve_device
from fewstep.training.distributed import (all_finite, any_process, barrier, broadcast_parameters, gather_objects, init_distributed,
                                 shutdown_distributed, wrap_ddp)
from fewstep.training import fsdp
from fewstep.training.ema import EMA
from fewstep.methods.base import Method, as_method
from fewstep.networks.contract import network_info


PARALLEL_MODES = ("auto", "none", "ddp", "fsdp")


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses or gradients in a row."""


class RunStoppedError(RuntimeError):
    """Another process of a distributed run failed: this one stops too (one line, with the last
    good checkpoint to resume from)."""


class _StopRequests:
    """SIGINT / SIGTERM while `fit` runs: the first asks for a stop at the end of the current step,
    where the state is consistent and a checkpoint can be written; a second stops at once."""

    def __init__(self):
        self.signal: str | None = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _peer_failure(err: BaseException) -> bool:
    """A collective that failed because another process is gone."""
    text = str(err).lower()
    return isinstance(err, getattr(dist, "DistError", ())) or any(
        word in text for word in ("gloo", "nccl", "connection closed", "connection reset", "broken pipe"))


def method_cfg_name(method) -> str:
    return getattr(method, "name", "") or type(method).__name__


def _rebuild_optimizer(optimizer: torch.optim.Optimizer, net: torch.nn.Module, names: list[list[str]]):
    """The same optimizer (class, hyper-parameters, parameter groups) over `net`'s new parameters
    after sharding replaced them (matched by name)."""
    params = dict(net.named_parameters())
    groups = [{**{k: v for k, v in group.items() if k != "params"}, "params": [params[n] for n in group_names]}
              for group, group_names in zip(optimizer.param_groups, names)]
    return type(optimizer)(groups, **optimizer.defaults)


def _compile_failed(err: Exception, eager: torch.nn.Module, main_process: bool) -> torch.nn.Module:
    """`torch.compile` could not compile this network (or its tangent pass): say so in one line
    and train eagerly."""
    if main_process:
        print(f"fewstep: torch.compile failed ({type(err).__name__}: {' '.join(str(err).split())[:200]}); "
              f"training continues without compiling")
    return eager


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

    def needs_ema(self, run: Run) -> bool:
        """Called on EVERY process before `on_step`: whether `run.ema_net` will be used at this
        step (under fsdp its full weights are then gathered, a collective)."""
        return False


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


def _data_info(data, x0: torch.Tensor | None, net) -> dict:
    """kind, shape, num_classes; and `latents` (the VAE that decodes them) for latent data."""
    info = {"kind": getattr(data, "kind", None), "shape": list(getattr(data, "shape", None) or x0.shape[1:]),
            "num_classes": int(getattr(data, "num_classes", network_info(net).num_classes) or 0)}
    if info["kind"] is None:
        info["kind"] = "image" if x0.ndim == 4 else "vector"
    if getattr(data, "latents", None):
        info["latents"] = data.latents
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
        callbacks: Iterable[Callback] = (), config: dict | None = None, data_info: dict | None = None,
        parallel: str = "auto", grad_accum: int = 1, compile: bool | str = False,
        sharded_checkpoints: bool = False) -> dict:
    """Train `net` with `method` on `data` for `steps` optimizer steps, writing `out_dir`.

    net:       any `nn.Module` under the network contract `F(x_t / sigma_d, t, labels=None, **cond)`
               (see `fewstep.networks`); register its class (`register_network`) so that
               `fewstep sample` can rebuild it from the checkpoints.
    method:    a training objective, `loss, stats = method(net, x0, labels, step)` (`fewstep.methods`).
    data:      any iterable of batches `x0`, `(x0,)` or `(x0, labels)` -- a `torch.utils.data.DataLoader`
               included -- or a `fewstep.data.Dataset` (then batched by `make_loader` with `batch_size`,
               `workers`, shuffled per epoch and split across torchrun processes).
    optimizer: default Adam(lr=1e-3, betas=(0.9, 0.99)); `lr_schedule(step) -> lr` sets the rate each step.
    callbacks: `Callback`s, e.g. `fewstep.training.callbacks.SamplePreviews`.
    config:    a dict recorded in checkpoints and `config.json` (the CLI's whole run config).
    parallel:  under torchrun, "ddp" (DistributedDataParallel) or "fsdp" (FSDP2, `fewstep.training.fsdp`);
               "auto": ddp with several processes, none with one.
    grad_accum: K micro-batches per optimizer step (the same step as one batch K times larger).
    sharded_checkpoints: with fsdp, each process writes its own shards (safetensors) instead of
               gathering the full model on process 0: for models larger than one process's memory.
               Either kind resumes on any number of processes.
    compile:   `torch.compile` the network (True: inductor; or a backend name); if compiling fails,
               one line says why and training continues eagerly. The tangent engine's pass runs
               eagerly: traced op by op it recompiled at every step and was slower (docs/results.md).

    Resumes from the latest good checkpoint in `out_dir` when `resume`. Returns the summary that
    `metrics.json` holds.
    """
    from fewstep.data import Dataset, make_loader, unpack_batch

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if grad_accum < 1:
        raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"parallel must be one of {list(PARALLEL_MODES)}, got {parallel!r}")
    for name, value in (("log_every", log_every), ("keep_ckpts", keep_ckpts), ("max_nonfinite", max_nonfinite)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out_dir / "checkpoints"
    dist_info, device = init_distributed(resolve_device(device))
    main_process = dist_info.is_main
    net.to(device)
    broadcast_parameters(net, dist_info)  # the same initial weights everywhere (ddp, fsdp)
    if parallel == "auto":
        parallel = "ddp" if dist_info.enabled else "none"
    if sharded_checkpoints and parallel != "fsdp":
        raise ValueError("sharded_checkpoints needs parallel 'fsdp' (there is nothing sharded to write otherwise)")
    if parallel == "none" and dist_info.enabled:
        raise ValueError(f"parallel 'none' with {dist_info.world_size} processes would train {dist_info.world_size} "
                         f"separate models; use 'ddp' or 'fsdp'")
    torch.manual_seed(seed + 1_000_003 * dist_info.rank)  # each process draws its own noise
    if isinstance(data, Dataset):
        if batch_size is None:
            raise ValueError("fit needs batch_size= to batch a fewstep Dataset")
        data_info = data_info or _data_info(data, None, net)
        data = make_loader(data, batch_size, seed=seed, rank=dist_info.rank, world_size=dist_info.world_size,
                           workers=workers, pin_memory=device.type == "cuda")
    stream = BatchStream(data)
    if optimizer is None:
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-3, betas=(0.9, 0.99))
    method = as_method(method)
    method.setup(net, steps)
    ema = EMA(net, ema_decay, ema_sigma_rel)
    preview_ema = None  # fsdp: an unsharded copy of the EMA network on process 0, for callbacks
    if parallel == "fsdp":
        if type(method).state_tensors is not Method.state_tensors:
            raise ValueError(f"parallel 'fsdp' does not shard the extra networks of method {method_cfg_name(method)!r} "
                             f"(an EMA target, a teacher) yet; use 'ddp'")
        param_names = {id(p): n for n, p in net.named_parameters()}
        names = [[param_names[id(p)] for p in group["params"]] for group in optimizer.param_groups]
        preview_ema = copy.deepcopy(ema.net) if main_process else None
        fsdp.shard(net, precision)  # in place: every parameter becomes a DTensor shard
        fsdp.shard(ema.net, precision)
        optimizer = _rebuild_optimizer(optimizer, net, names)
    model = wrap_ddp(net, device) if parallel == "ddp" else net  # what the method calls
    eager_model = model
    if compile:
        try:
            model = torch.compile(model, backend=compile if isinstance(compile, str) else "inductor")
        except Exception as err:  # noqa: BLE001 - e.g. an unknown backend: train eagerly
            model = _compile_failed(err, eager_model, main_process)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    spec, method_cfg = _record_of(net, method)
    config = dict(config) if config else {"method": method_cfg, "train": {"steps": steps, "seed": seed}}
    if main_process and "data" in config:
        (out_dir / "config.json").write_text(json.dumps(config, indent=1))

    step, nonfinite_total = 0, 0
    if not resume and ckpt.list_checkpoints(ckpt_dir):
        raise ValueError(f"resume is off but {ckpt_dir} already holds checkpoints (a new run would mix with them "
                         f"and prune its own); choose another out_dir or delete them")
    found = ckpt.load_latest_good(ckpt_dir, device=device) if resume else None
    if found is not None:
        path, tensors, state = found
        if state.get("shards"):  # written shard by shard: read only the rows this process needs
            shards = state["shards"]
            files = fsdp.shard_files(ckpt_dir / shards["dir"], shards["processes"])
            fsdp.load_sharded_state(files, {**shards, "optimizer": state["optimizer"]}, net, ema.net, optimizer)
        elif state.get("optimizer_format") == "fqn":  # full tensors: sharded or not, any process count
            fsdp.load_full_state_dict(net, ckpt.unprefixed("net", tensors))
            fsdp.load_full_state_dict(ema.net, ckpt.unprefixed("ema", tensors))
            fsdp.load_full_optimizer_state(net, optimizer, ckpt.unprefixed("optim", tensors), state["optimizer"])
        else:  # fewstep 0.1: the optimizer keyed by parameter index
            net.load_state_dict(ckpt.unprefixed("net", tensors))
            ema.load_state_dict(ckpt.unprefixed("ema", tensors))
            ckpt.optimizer_from_flat(optimizer, ckpt.unprefixed("optim", tensors), state["optimizer"])
        if state.get("grad_scaler") and scaler.is_enabled():
            scaler.load_state_dict(state["grad_scaler"])
        method.load_state_tensors(net, ckpt.unprefixed("target", tensors))
        restore_rng(tensors, device, dist_info.rank)
        epoch_rng = "data.epoch_rng" + (f".rank{dist_info.rank}" if dist_info.rank else "")
        stream.load_state(state.get("data_position"),
                          {"data.epoch_rng": tensors[epoch_rng].cpu()} if epoch_rng in tensors else {})
        step, nonfinite_total = state["step"], state.get("nonfinite_total", 0)
        data_info = data_info or state.get("data")
        if main_process:
            print(f"resumed from {path} at step {step}")

    def last_good() -> str:
        good = ckpt.list_checkpoints(ckpt_dir)
        return f"the last good checkpoint is {good[-1]}" if good else "no checkpoint was written yet"

    def own_state() -> dict[str, torch.Tensor]:
        """This process's RNG states and its data stream's epoch RNG, keyed by rank."""
        out = {k: v.cpu() for k, v in rng_tensors(device, dist_info.rank).items()}
        suffix = f".rank{dist_info.rank}" if dist_info.rank else ""
        out.update({k + suffix: v for k, v in stream.state()[1].items()})
        return out

    def save(at_step: int) -> None:
        """All processes call this (their RNG states are gathered); process 0 writes."""
        rngs = gather_objects(own_state(), dist_info)
        shards = None
        if sharded_checkpoints:  # every process writes its own part; process 0 the rest, last
            shard_tensors, shards = fsdp.sharded_state(net, ema.net, optimizer)
            shards.update(dir=f"ckpt-{at_step:07d}.shards", processes=dist_info.world_size)
            ckpt.write_shard(ckpt_dir / shards["dir"], dist_info.rank, shard_tensors)
            barrier(dist_info)
            net_state, ema_state, opt_tensors, opt_meta = {}, {}, {}, shards.pop("optimizer")
        else:
            # Full (unsharded) weights and optimizer state keyed by parameter name: the same file
            # whatever the parallelism, so a run resumes on any number of processes.
            net_state, ema_state = fsdp.full_state_dict(net), fsdp.full_state_dict(ema.net)
            opt_tensors, opt_meta = fsdp.full_optimizer_state(net, optimizer)
        if not main_process:
            return
        position = stream.state()[0]
        tensors = {**ckpt.prefixed("net", net_state), **ckpt.prefixed("ema", ema_state),
                   **ckpt.prefixed("optim", opt_tensors), **{k: v for r in rngs for k, v in r.items()}}
        tensors.update(ckpt.prefixed("target", method.state_tensors()))  # e.g. an EMA target (CD, CT)
        ckpt.save_checkpoint(ckpt_dir, at_step, tensors,
                             {"config": config, "network": spec, "method": method_cfg, "data": data_info,
                              "optimizer": opt_meta, "optimizer_format": "fqn", "nonfinite_total": nonfinite_total,
                              "shards": shards,
                              "grad_scaler": scaler.state_dict() if scaler.is_enabled() else None,
                              "data_position": position})
        ckpt.prune_checkpoints(ckpt_dir, keep_ckpts)

    run = Run(out_dir, net, preview_ema if parallel == "fsdp" else ema.net, method, data_info or {}, steps, step,
              config)

    def gather_ema(force: bool = False) -> None:
        """fsdp: the full EMA weights into process 0's unsharded copy, when a callback needs them
        (a collective: every process decides the same way)."""
        if parallel == "fsdp" and (force or any(cb.needs_ema(run) for cb in callbacks)):
            full = fsdp.full_state_dict(ema.net)
            if main_process:
                preview_ema.load_state_dict(full)
    callbacks = list(callbacks)
    log_path = out_dir / "log.jsonl"
    if step == 0 and log_path.exists() and main_process:
        log_path.unlink()  # a fresh run: no stale records
    nonfinite_run, acc, acc_n, t_last, step_last = 0, {}, 0, time.perf_counter(), step
    bar = tqdm(total=steps, initial=step, disable=not (progress and main_process), dynamic_ncols=True, unit="step")
    net.train()
    stops = _StopRequests()
    try:
        stops.__enter__()
        while step < steps:
            if lr_schedule is not None:
                for group in optimizer.param_groups:
                    group["lr"] = lr_schedule(step)
            optimizer.zero_grad(set_to_none=True)
            ok, loss_sum, stats_sum = True, 0.0, {}
            for micro in range(grad_accum):  # K micro-batches = one batch K times larger
                x0, labels = unpack_batch(next(stream))
                if data_info is None:
                    data_info = run.data_info = _data_info(data, x0, net)
                x0 = x0.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True) if labels is not None and \
                    network_info(net).num_classes else None
                last = micro == grad_accum - 1
                # DDP all-reduces in the last micro-batch's backward only
                with (eager_model.no_sync() if parallel == "ddp" and not last else contextlib.nullcontext()):
                    with autocast_context(device, precision):
                        try:
                            per_sample, stats = method(model, x0, labels, step)
                        except Exception as err:  # noqa: BLE001 - only a failed compile is caught
                            if model is eager_model:
                                raise
                            model = _compile_failed(err, eager_model, main_process)
                            per_sample, stats = method(model, x0, labels, step)
                    loss = per_sample.mean()
                    if not all_finite(loss, dist_info):  # all processes skip together, before any backward
                        ok = False
                        break
                    scaler.scale(loss / grad_accum).backward()
                loss_sum += loss.detach() / grad_accum
                for key, value in stats.items():
                    stats_sum[key] = stats_sum.get(key, 0.0) + value.detach().float() / grad_accum
            if ok:
                scaler.unscale_(optimizer)
                grad_norm = fsdp.clip_grad_norm(net.parameters(), grad_clip or math.inf)
                ok = bool(torch.isfinite(grad_norm)) or scaler.is_enabled()
            if ok:
                scaler.step(optimizer)  # skips the step itself when fp16 gradients overflowed
                scaler.update()
                ema.update(net, step)
                if method.after_step(net, step):
                    ema.net.load_state_dict(net.state_dict())  # e.g. a new progressive-distillation round
                nonfinite_run = 0
                for key, value in {"loss": loss_sum, "grad_norm": grad_norm, **stats_sum}.items():
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
            gather_ema()
            if main_process:
                for cb in callbacks:
                    cb.on_step(run)
            if ckpt_every and step % ckpt_every == 0 and step < steps:
                save(step)
            if any_process(stops.signal is not None, dist_info, device):  # at a step's end, all processes together
                bar.close()
                save(step)
                if main_process:
                    print(f"\nstopped by {stops.signal or 'a signal to another process'}: checkpoint saved at "
                          f"step {step} in {ckpt_dir}")
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        bar.close()
        raise
    except Exception as err:
        if dist_info.enabled and _peer_failure(err):
            bar.close()
            raise RunStoppedError(f"process {dist_info.rank} stops: another process of the run failed "
                                  f"({' '.join(str(err).split())[:120]}); {last_good()}; run the same command "
                                  f"to resume") from None
        raise
    finally:
        stops.__exit__()
    bar.close()
    save(step)
    gather_ema(force=True)
    # Drop the DDP wrapper while the process group lives: freed later, its reducer would take the
    # group down from a Python destructor, which deadlocks Gloo's worker thread on the GIL.
    model = eager_model = None
    gc.collect()
    if not main_process:
        barrier(dist_info)  # process 0 writes samples and plots, then releases everyone
        shutdown_distributed(dist_info)
        return {"steps": step, "rank": dist_info.rank}

    summary = {"steps": step, "nonfinite_total": nonfinite_total}
    for cb in callbacks:
        summary.update(cb.on_end(run) or {})
    from fewstep.apps.plot import plot_log, read_log

    records = read_log(log_path) if log_path.exists() else []
    if records:
        plot_log(records, out_dir / "loss.png", title=f"{method_cfg['name']} training")
    summary["final"] = records[-1] if records else {}
    (out_dir / "metrics.json").write_text(json.dumps(summary, indent=1))
    barrier(dist_info)
    shutdown_distributed(dist_info)
    return summary
