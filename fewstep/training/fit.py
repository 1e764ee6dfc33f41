"""The training loop, `fit`: built objects in, a run folder out (EDM2's shape: the loop builds
nothing and knows no method).

    from fewstep import fit
    fit(net, method, loader, "runs/mine", steps=2000, optimizer=torch.optim.Adam(net.parameters(), 1e-3))

Per step: the updates the method's auxiliary networks are owed (`fewstep.training.auxiliary`,
e.g. DMD2's fake score), then K micro-batches of the method's per-sample loss, a NaN/Inf guard, backward, gradient
clipping, an optimizer step, EMA, the method's after-step hook. Periodically: JSONL stats,
callbacks, checkpoints. The loop reads top to bottom over collaborators that each own one thing:
a parallel strategy (`fewstep.training.parallel`: wrapping, sharding, clipping, collectives), a
`Checkpointer` (`fewstep.training.checkpoint`: the files; exact resume, data order included) and
`Callback`s (`fewstep.training.callbacks`; sample grids and loss curves: `fewstep.apps.callbacks`).
`fewstep.apps.train.train(cfg)` is `fit` over the objects `build(cfg)` makes from a config.
"""

from __future__ import annotations

import gc
import json
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from fewstep.devices import autocast_context, resolve_device
from fewstep.jvp.traced import repeated_calls
from fewstep.methods.base import as_method
from fewstep.training.auxiliary import Auxiliaries
from fewstep.training.callbacks import Callback, Run  # noqa: F401 - `fewstep.Callback`
from fewstep.training.checkpoint import Checkpointer, TrainState
from fewstep.training.distributed import broadcast_parameters, init_distributed, shutdown_distributed
from fewstep.training.ema import EMA
from fewstep.networks.contract import network_info
from fewstep.training.optimizers import optimizer_name
from fewstep.training.parallel import make_parallel


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


def _compiled(model: torch.nn.Module, compile: bool | str, main_process: bool) -> torch.nn.Module:
    if not compile:
        return model
    try:
        return torch.compile(model, backend=compile if isinstance(compile, str) else "inductor")
    except Exception as err:  # noqa: BLE001 - e.g. an unknown backend: train eagerly
        return _compile_failed(err, model, main_process)


def _compile_failed(err: Exception, eager: torch.nn.Module, main_process: bool) -> torch.nn.Module:
    """`torch.compile` could not compile this network (or its tangent pass): say so in one line
    and train eagerly."""
    if main_process:
        print(f"fewstep: torch.compile failed ({type(err).__name__}: {' '.join(str(err).split())[:200]}); "
              f"training continues without compiling")
    return eager


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


def _record_of(net, method, config: dict | None, data_info: dict | None, steps: int, seed: int) -> dict:
    """What a checkpoint needs to rebuild the run: config, network spec (None: an unregistered
    net), method config, data info."""
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
    config = dict(config) if config else {"method": method_cfg, "train": {"steps": steps, "seed": seed}}
    return {"config": config, "network": spec, "method": method_cfg, "data": data_info}


def _batches(data, data_info, net, batch_size, workers, seed, dist_info, device):
    """A fewstep `Dataset` batched by `make_loader` (shuffled per epoch, split across processes), with
    its info; any other iterable as it is."""
    from fewstep.data import Dataset, make_loader

    if not isinstance(data, Dataset):
        return data, data_info
    if batch_size is None:
        raise ValueError("fit needs batch_size= to batch a fewstep Dataset")
    return make_loader(data, batch_size, seed=seed, rank=dist_info.rank, world_size=dist_info.world_size,
                       workers=workers, pin_memory=device.type == "cuda"), data_info or _data_info(data, None, net)


def _to_device(x0, labels, net, device):
    info = network_info(net)  # a text-to-image network's labels are prompt indices (fewstep.data.prompts)
    labels = labels.to(device, non_blocking=True) if labels is not None and (info.num_classes or info.text_input) \
        else None
    return x0.to(device, non_blocking=True), labels


def _check_positive(**values) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


class StatsLog:
    """`log.jsonl`: per-step statistics summed without a device sync until a record is written.
    A resumed run keeps the records up to its checkpoint's step and drops the later ones (written
    after that checkpoint, they are written again)."""

    def __init__(self, path: Path, step: int, write: bool):
        self.path, self.write_records, self.last = path, write, {}
        self.sums, self.count, self.t0, self.step0 = {}, 0, time.perf_counter(), step
        if write and path.exists():
            lines = [line for line in path.read_text().splitlines() if line.strip()]
            kept = [line for line in lines if step and json.loads(line).get("step", 0) <= step]
            path.write_text("".join(line + "\n" for line in kept))
            self.last = json.loads(kept[-1]) if kept else {}

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + torch.as_tensor(value).detach().float()
        self.count += 1

    def write(self, step: int, **extra) -> dict:
        now = time.perf_counter()
        record = {"step": step, **{k: float(v) / max(self.count, 1) for k, v in self.sums.items()}, **extra,
                  "steps_per_s": (step - self.step0) / max(now - self.t0, 1e-9)}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.sums, self.count, self.t0, self.step0, self.last = {}, 0, now, step, record
        return record


def _micro_batch_loss(method, model, eager, x0, labels, step, device, precision, main):
    """The method's mean loss over one micro-batch, and the model to use from now on: a compiled
    one that fails here is replaced by the eager network."""
    # repeated_calls: the JVP of every step runs the same traced graph, resumed or not
    with autocast_context(device, precision), repeated_calls():
        try:
            per_sample, stats = method(model, x0, labels, step)
        except Exception as err:  # noqa: BLE001 - only a failed compile is caught
            if model is eager:
                raise
            model = _compile_failed(err, eager, main)
            per_sample, stats = method(model, x0, labels, step)
    return per_sample.mean(), stats, model


def _optimizer_step(scaler: torch.amp.GradScaler, optimizer) -> bool:
    """Step; False when fp16 gradients overflowed and the scaler skipped the step (it then lowers
    its scale), so that nothing else treats the step as taken."""
    if not scaler.is_enabled():
        optimizer.step()
        return True
    scale = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    return scaler.get_scale() >= scale


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
               A method's auxiliary networks (`Method.auxiliaries`) get the same kind (Adam for a class
               other than Adam or RAdam) and `eps`, and the schedule scaled to their own rate: `aux_lr *
               lr_schedule(step) / optimizer.defaults["lr"]`.
    callbacks: `Callback`s, e.g. `fewstep.apps.callbacks.SamplePreviews` and `LossCurves` (loss.png).
    config:    a dict recorded in checkpoints and `config.json` (the CLI's whole run config).
    parallel:  under torchrun, "ddp" (DistributedDataParallel) or "fsdp" (FSDP2, `fewstep.training.fsdp`);
               "auto": ddp with several processes, none with one (`fewstep.training.parallel`).
    grad_accum: K micro-batches per optimizer step (the same step as one batch K times larger).
    sharded_checkpoints: with fsdp, each process writes its own shards (safetensors) instead of
               gathering the full model on process 0: for models larger than one process's memory.
               Either kind resumes on any number of processes.
    compile:   `torch.compile` the network (True: inductor; or a backend name); if compiling fails,
               one line says why and training continues eagerly. sCT/sCD/MeanFlow's traced JVP
               (`jvp_mode="traced"`) compiles its joint primal+tangent graph with inductor, once per
               input signature; the eager engine (`"tangent"`) stays eager.

    Resumes from the latest good checkpoint in `out_dir` when `resume`. Returns the summary that
    `metrics.json` holds.
    """
    from fewstep.data import unpack_batch

    _check_positive(steps=steps, grad_accum=grad_accum, log_every=log_every, max_nonfinite=max_nonfinite)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dist_info, device = init_distributed(resolve_device(device))
    par = make_parallel(parallel, dist_info, device)
    checkpoints = Checkpointer(out_dir / "checkpoints", par, keep_ckpts, sharded_checkpoints)
    if not resume:
        checkpoints.refuse_existing()
    net.to(device)
    broadcast_parameters(net, dist_info)  # the same initial weights everywhere (ddp, fsdp)
    torch.manual_seed(seed + 1_000_003 * dist_info.rank)  # each process draws its own noise
    data, data_info = _batches(data, data_info, net, batch_size, workers, seed, dist_info, device)
    method = as_method(method)
    method.setup(net, steps)
    optimizer = optimizer or torch.optim.Adam(net.parameters(), lr=1e-3, betas=(0.9, 0.99))
    ema = EMA(net, ema_decay, ema_sigma_rel)
    # made from the unsharded net; of the optimizer's kind and eps, on the run's schedule relative to its base rate
    aux = Auxiliaries(method.auxiliaries(net), par, precision, device, optimizer_name(optimizer), lr_schedule,
                      optimizer.defaults.get("lr"), optimizer.defaults.get("eps", 1e-8))
    eager, optimizer = par.prepare(net, ema.net, method, optimizer, precision)
    model = _compiled(eager, compile, par.is_main)
    record = _record_of(net, method, config, data_info, steps, seed)
    if par.is_main and "data" in record["config"]:
        (out_dir / "config.json").write_text(json.dumps(record["config"], indent=1))
    state = TrainState(net, ema, optimizer, method, torch.amp.GradScaler(device.type, enabled=precision == "fp16"),
                       BatchStream(data), record, aux=aux)
    found = checkpoints.load_latest(state) if resume else None
    if found and par.is_main:
        print(f"resumed from {found} at step {state.step}")
    run = Run(out_dir, net, par.ema_view(ema.net), method, record["data"] or {}, steps, state.step, record["config"])
    callbacks, log = list(callbacks), StatsLog(out_dir / "log.jsonl", state.step, par.is_main)
    bar = tqdm(total=steps, initial=state.step, disable=not (progress and par.is_main), dynamic_ncols=True)
    nonfinite_run = 0
    net.train()
    with _StopRequests() as stops:  # still installed while a failure is reported: see below
        try:
            while state.step < steps:
                step = state.step
                if lr_schedule is not None:
                    for group in optimizer.param_groups:
                        group["lr"] = lr_schedule(step)
                batches = []
                for _ in range(grad_accum):  # K micro-batches = one batch K times larger
                    x0, labels = unpack_batch(next(state.stream))
                    if not run.data_info:
                        run.data_info = record["data"] = _data_info(data, x0, net)
                    batches.append(_to_device(x0, labels, net, device))
                aux_stats, aux_skipped = aux.train(net, batches, step)  # e.g. DMD2's fake score, before net
                state.nonfinite_total += aux_skipped
                optimizer.zero_grad(set_to_none=True)
                ok, totals = True, {}
                for micro, (x0, labels) in enumerate(batches):
                    with par.micro_batch(eager, last=micro == grad_accum - 1):
                        loss, stats, model = _micro_batch_loss(method, model, eager, x0, labels, step, device,
                                                               precision, par.is_main)
                        if not par.all_true(bool(torch.isfinite(loss.detach()))):  # all skip, before any backward
                            ok = False
                            break
                        state.scaler.scale(loss / grad_accum).backward()
                    for key, value in {"loss": loss, **stats}.items():
                        totals[key] = totals.get(key, 0.0) + value.detach().float() / grad_accum
                if ok:
                    state.scaler.unscale_(optimizer)
                    totals["grad_norm"] = par.clip(net, grad_clip)
                    ok = bool(torch.isfinite(totals["grad_norm"])) or state.scaler.is_enabled()
                if ok and _optimizer_step(state.scaler, optimizer):
                    ema.update(net, step)
                    if method.after_step(net, step):
                        ema.net.load_state_dict(net.state_dict())  # e.g. a new progressive-distillation round
                    log.add({**totals, **aux_stats})
                    nonfinite_run = nonfinite_run + aux_skipped if aux_skipped else 0  # an auxiliary's count too
                else:  # a non-finite loss or gradient; or fp16 gradients that overflowed (the scale drops)
                    optimizer.zero_grad(set_to_none=True)
                    state.nonfinite_total += 1
                    nonfinite_run += (0 if ok else 1) + aux_skipped
                if nonfinite_run >= max_nonfinite:
                    raise NonFiniteLossError(
                        f"{nonfinite_run} non-finite losses/gradients in a row at step {step}; stopping. "
                        f"Try a lower learning rate, precision 'fp32'/'bf16', or a smaller method.p_std; "
                        f"{checkpoints.last_good()}.")
                state.step = run.step = step + 1
                bar.update(1)
                if (state.step % log_every == 0 or state.step == steps) and par.is_main:  # process 0's stats
                    entry = log.write(state.step, lr=optimizer.param_groups[0]["lr"],
                                      nonfinite_total=state.nonfinite_total)
                    bar.set_postfix(loss=f"{entry.get('loss', float('nan')):.4f}", skipped=state.nonfinite_total)
                    for cb in callbacks:
                        cb.on_log(run, entry)
                par.refresh_ema_view(ema.net, any(cb.needs_ema(run) for cb in callbacks))
                for cb in callbacks if par.is_main else ():
                    cb.on_step(run)
                if ckpt_every and state.step % ckpt_every == 0 and state.step < steps:
                    checkpoints.save(state.step, state)
                if par.any_true(stops.signal is not None):  # at a step's end, all processes together
                    bar.close()
                    checkpoints.save(state.step, state)
                    if par.is_main:
                        print(f"\nstopped by {stops.signal or 'a signal to another process'}: checkpoint saved at "
                              f"step {state.step} in {checkpoints.directory}")
                    raise KeyboardInterrupt
        except BaseException as err:
            bar.close()
            if dist_info.enabled and isinstance(err, Exception) and _peer_failure(err):
                # torchrun sends SIGTERM to the survivors as soon as one process dies: say why and where
                # to resume now, while that signal only sets a flag, not once the handler is gone.
                stopped = RunStoppedError(f"process {dist_info.rank} stops: another process of the run failed "
                                          f"({' '.join(str(err).split())[:120]}); {checkpoints.last_good()}; "
                                          f"run the same command to resume")
                print(f"fewstep: error: {stopped}", file=sys.stderr, flush=True)
                stopped.reported = True
                raise stopped from None
            raise
    bar.close()
    checkpoints.save(state.step, state)
    par.refresh_ema_view(ema.net, True)
    # Drop the DDP wrapper while the process group lives: freed later, its reducer would take the
    # group down from a Python destructor, which deadlocks Gloo's worker thread on the GIL.
    model = eager = None
    gc.collect()
    summary = {"steps": state.step, "nonfinite_total": state.nonfinite_total}
    if par.is_main:
        for cb in callbacks:
            summary.update(cb.on_end(run) or {})
        summary["final"] = log.last
        (out_dir / "metrics.json").write_text(json.dumps(summary, indent=1))
    par.barrier()  # process 0 writes samples and plots, then releases everyone
    shutdown_distributed(dist_info)
    return summary if par.is_main else {"steps": state.step, "rank": dist_info.rank}
