"""The training loop: one readable function, whatever the method.

Per step: a batch, the method's per-sample loss, a NaN/Inf guard, backward, gradient
clipping, an optimizer step, EMA. Periodically: JSONL stats, sample grids, checkpoints
(atomic; the run resumes from the latest one). At the end: loss curves and `metrics.json`.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fewstep import checkpoint as ckpt
from fewstep.config import Config, ConfigError, build_method, config_from_dict
from fewstep.data import load_dataset
from fewstep.distributed import (average_gradients, barrier, broadcast_parameters, gather_objects,
                                 init_distributed, shutdown_distributed)
from fewstep.ema import EMA
from fewstep.image import save_image_grid, save_scatter
from fewstep.plot import plot_log, read_log
from fewstep.networks import build_network
from fewstep.networks.convert import student_from_teacher


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses or gradients in a row."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device is {name!r} but CUDA is not available; use 'cpu' or 'auto'")
    return device


def make_optimizer(cfg, params) -> torch.optim.Optimizer:
    cls = {"adam": torch.optim.Adam, "radam": torch.optim.RAdam}[cfg.name]
    return cls(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)


def learning_rate(cfg, step: int, total_steps: int) -> float:
    """Linear warmup, then constant, cosine or linear decay to 0 at `total_steps`, or EDM2's
    inverse square-root decay."""
    lr = cfg.lr
    if cfg.warmup_steps > 0:
        lr *= min(1.0, (step + 1) / cfg.warmup_steps)
    progress = min(1.0, max(0, step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    if cfg.schedule == "cosine":
        lr *= 0.5 * (1 + math.cos(math.pi * progress))
    elif cfg.schedule == "linear":
        lr *= 1 - progress
    elif cfg.schedule == "inv_sqrt":
        lr /= math.sqrt(max(step / cfg.decay_start, 1.0))
    return lr


def load_data(cfg: Config):
    return load_dataset(cfg.data.name, resolution=cfg.data.resolution, channels=cfg.data.channels)


def autocast_context(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


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


def preview_schedules(cfg: Config, step: int | None = None):
    """What the training loop samples: consistency models at 1 step and at `train.sample_times`;
    diffusion models with the default ODE solver (Heun, 35 NFE)."""
    from fewstep.generate import CONSISTENCY_METHODS, Schedule, schedules

    if cfg.method["name"] not in CONSISTENCY_METHODS:
        from fewstep.generate import PD_METHODS, pd_steps

        at = cfg.train.steps if step is None else step
        default = pd_steps(cfg.to_dict(), at) if cfg.method["name"] in PD_METHODS else None
        return schedules(cfg.method["name"], default_steps=default)
    times = tuple(cfg.train.sample_times)
    plan = [Schedule("multistep", 1, times[:1])]
    return plan + ([Schedule("multistep", len(times), times)] if len(times) > 1 else [])


def write_samples(net, dataset, cfg: Config, path: Path, step: int | None = None) -> dict[str, tuple[torch.Tensor, int]]:
    """Sample grids (images) or scatter plots beside the data (vectors), one per preview schedule.
    Returns `{name: (samples, NFE)}`."""
    from fewstep.generate import Model, generate

    model = Model.from_net(net, cfg.to_dict(), dataset.kind, dataset.shape)
    n = cfg.train.num_samples if dataset.kind == "image" else max(cfg.train.num_samples, 2000)
    samples = {}
    for schedule in preview_schedules(cfg, step):
        x, nfe, _ = generate(model, schedule, n, progress=False)
        samples[f"{schedule.steps}-step" if schedule.sampler == "multistep" else f"{schedule.sampler}-nfe{nfe}"] = (x, nfe)
    if dataset.kind == "image":
        for name, (x, _) in samples.items():
            save_image_grid(x, path.with_name(f"{path.stem}-{name}.png"))
    else:
        data = dataset.all()[0][:n]
        save_scatter({"data": data, **{f"{k} (NFE {nfe})": x for k, (x, nfe) in samples.items()}},
                     path.with_suffix(".png"), title=path.stem)
    return samples


def sample_metrics(samples: dict[str, tuple[torch.Tensor, int]], dataset) -> dict:
    """Quick quality numbers for `metrics.json`, each with its NFE: exact sample-based distances
    to held-out data for vectors; pixel-space precision/recall and class coverage for the digits.
    (Image FID/KID: `fewstep eval`.)"""
    from fewstep.metrics.digits import digits_score
    from fewstep.metrics.toy import energy_distance, sliced_wasserstein

    out = {}
    for name, (x, nfe) in samples.items():
        if dataset.kind == "vector":
            ref = dataset.all()[0][: len(x)]
            out[name] = {"nfe": nfe, "num": len(x), "sliced_wasserstein": float(sliced_wasserstein(x, ref)),
                         "energy_distance": float(energy_distance(x, ref))}
        elif tuple(dataset.shape) == (1, 8, 8) and dataset.name == "digits":
            out[name] = {"nfe": nfe, "num": len(x), **digits_score(x)}
    return out


def load_teacher(cfg: Config, method, dataset, device):
    """sCD: load the diffusion teacher of `train.teacher` and give `method` its velocity.

    Returns the teacher's checkpoint state (its network config and weights are the student's
    starting point when `train.init_from_teacher`)."""
    from fewstep.generate import load_model, method_sigma_d
    from fewstep.methods.cm import CD, make_teacher_denoiser
    from fewstep.methods.pd import ProgressiveDistillation
    from fewstep.methods.scd import make_teacher_velocity

    teacher = load_model(cfg.train.teacher, device)
    if teacher.method not in ("flow", "edm"):
        raise ConfigError(f"the sCD teacher must be a diffusion model (method 'flow' or 'edm'); "
                          f"{teacher.checkpoint} was trained with {teacher.method!r}")
    if tuple(teacher.shape) != tuple(dataset.shape):
        raise ConfigError(f"the teacher was trained on data of shape {tuple(teacher.shape)}, "
                          f"this run's data has shape {tuple(dataset.shape)}")
    sigma_d = method_sigma_d(cfg.method)
    if abs(teacher.sigma_d - sigma_d) > 1e-12:
        raise ConfigError(f"teacher sigma_d {teacher.sigma_d} != this method's sigma_d {sigma_d}")
    formulation = "trigflow" if teacher.method == "flow" else "edm"
    if isinstance(method, ProgressiveDistillation):  # the teacher network itself: students replace it
        if formulation != "trigflow":
            raise ConfigError("progressive distillation distils a TrigFlow ('flow') teacher; "
                              f"{teacher.checkpoint} is an {teacher.method!r} model")
        method.set_teacher(teacher.net)
    elif isinstance(method, CD):  # discrete-time distillation steps the teacher's ODE in sigma
        method.teacher = make_teacher_denoiser(teacher.net.requires_grad_(False), formulation, sigma_d)
    else:
        method.teacher = make_teacher_velocity(teacher.net.requires_grad_(False), formulation, sigma_d)
    return teacher


def train(cfg: Config, out_dir: str | Path) -> dict:
    """Train `cfg` into `out_dir`; resumes from its latest checkpoint when `train.resume`."""
    cfg.validate()
    tc = cfg.train
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dist_info, device = init_distributed(resolve_device(tc.device))
    main_process = dist_info.is_main
    torch.manual_seed(tc.seed)  # the same initial weights on every process

    dataset = load_data(cfg)
    method = build_method(cfg.method)
    teacher = load_teacher(cfg, method, dataset, device) if cfg.train.teacher else None
    init_from_teacher = teacher is not None and cfg.train.init_from_teacher
    if init_from_teacher:
        # Diffusion fine-tuning (SPEC 2.4): the student is the teacher's network, weights and all
        # (plus the student's own guidance input, if asked for).
        student_cfg = dict(teacher.config["network"], guidance_input=cfg.network.guidance_input)
        cfg.network = config_from_dict({"network": student_cfg}).network
    net = build_network(cfg.network, dataset.kind, dataset.shape, dataset.num_classes).to(device)
    latest = ckpt.list_checkpoints(out_dir / "checkpoints") if tc.resume else []
    if init_from_teacher and not latest:
        from fewstep.generate import VE_CONSISTENCY_METHODS, method_sigma_d

        done = student_from_teacher(net, teacher.net, "trigflow" if teacher.method == "flow" else "edm",
                                    method_sigma_d(cfg.method), student_formulation="edm"
                                    if cfg.method["name"] in VE_CONSISTENCY_METHODS else "trigflow")
        if done and main_process:
            print(f"student initialized from the {teacher.method} teacher: {done}")
    broadcast_parameters(net, dist_info)
    if getattr(method, "total_steps", None) == 0:
        method.total_steps = tc.steps  # curricula (CT, iCT) are laid out over the whole run
    if dist_info.enabled and dist_info.rank > 0:
        torch.manual_seed(tc.seed + 1_000_003 * dist_info.rank)  # each process draws its own batches and noise
    optimizer = make_optimizer(cfg.optim, net.parameters())
    ema = EMA(net, tc.ema_decay, tc.ema_sigma_rel)
    scaler = torch.amp.GradScaler(device.type, enabled=tc.precision == "fp16")
    if main_process:
        (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))

    step, nonfinite_total = 0, 0
    if latest:
        tensors, state = ckpt.load_checkpoint(latest[-1], device=device)
        net.load_state_dict(ckpt.unprefixed("net", tensors))
        ema.load_state_dict(ckpt.unprefixed("ema", tensors))
        ckpt.optimizer_from_flat(optimizer, ckpt.unprefixed("optim", tensors), state["optimizer"])
        if state.get("grad_scaler") and scaler.is_enabled():
            scaler.load_state_dict(state["grad_scaler"])
        if hasattr(method, "load_state_tensors"):
            method.load_state_tensors(net, ckpt.unprefixed("target", tensors))
        restore_rng(tensors, device, dist_info.rank)
        step, nonfinite_total = state["step"], state.get("nonfinite_total", 0)
        if main_process:
            print(f"resumed from {latest[-1]} at step {step}")

    def save(at_step: int, gather: bool = True) -> None:
        """All processes call this (their RNG states are gathered); process 0 writes."""
        rngs = (gather_objects({k: v.cpu() for k, v in rng_tensors(device, dist_info.rank).items()}, dist_info)
                if gather else [rng_tensors(device, dist_info.rank)])
        if not main_process:
            return
        opt_tensors, opt_meta = ckpt.optimizer_to_flat(optimizer)
        tensors = {**ckpt.prefixed("net", net.state_dict()), **ckpt.prefixed("ema", ema.state_dict()),
                   **ckpt.prefixed("optim", opt_tensors), **{k: v for r in rngs for k, v in r.items()}}
        if hasattr(method, "state_tensors"):  # an EMA target network (CD, CT)
            tensors.update(ckpt.prefixed("target", method.state_tensors()))
        ckpt.save_checkpoint(out_dir / "checkpoints", at_step, tensors,
                             {"config": cfg.to_dict(), "optimizer": opt_meta, "nonfinite_total": nonfinite_total,
                              "grad_scaler": scaler.state_dict() if scaler.is_enabled() else None,
                              "data": {"kind": dataset.kind, "shape": list(dataset.shape),
                                       "num_classes": dataset.num_classes}})
        ckpt.prune_checkpoints(out_dir / "checkpoints", tc.keep_ckpts)

    log_path = out_dir / "log.jsonl"
    if step == 0 and log_path.exists() and main_process:
        log_path.unlink()  # a fresh run: no stale records
    nonfinite_run, acc, acc_n, t_last, step_last = 0, {}, 0, time.perf_counter(), step
    bar = tqdm(total=tc.steps, initial=step, disable=not (tc.progress and main_process), dynamic_ncols=True,
               unit="step")
    net.train()
    try:
        while step < tc.steps:
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(cfg.optim, step, tc.steps)
            x0, labels = dataset.sample(tc.batch_size, device=device)
            if not getattr(net, "num_classes", 0):
                labels = None
            with autocast_context(device, tc.precision):
                per_sample, stats = method(net, x0, labels, step)
            if getattr(method, "restart_ema", False):  # a new progressive-distillation round
                ema.net.load_state_dict(net.state_dict())
                method.restart_ema = False
            loss = per_sample.mean()
            optimizer.zero_grad(set_to_none=True)
            ok = bool(torch.isfinite(loss))
            if ok:
                scaler.scale(loss).backward()
            ok = average_gradients(net.parameters(), dist_info, ok)  # several processes: all or none step
            if ok:
                scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.optim.grad_clip or math.inf)
                ok = bool(torch.isfinite(grad_norm)) or scaler.is_enabled()
            if ok:
                scaler.step(optimizer)  # skips the step itself when fp16 gradients overflowed
                scaler.update()
                ema.update(net, step)
                if hasattr(method, "after_step"):
                    method.after_step(net, step)  # e.g. the EMA target of CD / CT
                nonfinite_run = 0
                for key, value in {"loss": loss.detach(), "grad_norm": grad_norm, **stats}.items():
                    acc[key] = acc.get(key, 0.0) + value.detach().float()  # no sync until logged
                acc_n += 1
            else:
                optimizer.zero_grad(set_to_none=True)
                nonfinite_run += 1
                nonfinite_total += 1
                if nonfinite_run >= tc.max_nonfinite:
                    raise NonFiniteLossError(
                        f"{nonfinite_run} non-finite losses/gradients in a row at step {step}; stopping. "
                        f"Try a lower optim.lr, train.precision='fp32'/'bf16', or a smaller method.p_std. "
                        f"The last good checkpoint is in {out_dir / 'checkpoints'}.")
            step += 1
            bar.update(1)

            if (step % tc.log_every == 0 or step == tc.steps) and main_process:  # process 0's stats
                now = time.perf_counter()
                record = {"step": step, **{k: float(v) / max(acc_n, 1) for k, v in acc.items()},
                          "lr": optimizer.param_groups[0]["lr"],
                          "steps_per_s": (step - step_last) / max(now - t_last, 1e-9),
                          "nonfinite_total": nonfinite_total}
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}", skipped=nonfinite_total)
                acc, acc_n, t_last, step_last = {}, 0, now, step
            if tc.sample_every and step % tc.sample_every == 0 and step < tc.steps and main_process:
                write_samples(ema.net, dataset, cfg, out_dir / "samples" / f"step-{step:07d}", step)
            if tc.ckpt_every and step % tc.ckpt_every == 0 and step < tc.steps:
                save(step)
    except KeyboardInterrupt:
        bar.close()
        save(step, gather=False)  # no collectives while the other processes are being stopped too
        if main_process:
            print(f"\ninterrupted: checkpoint saved at step {step} in {out_dir / 'checkpoints'}")
        raise
    bar.close()
    save(step)
    if not main_process:
        barrier(dist_info)  # process 0 writes samples and plots, then releases everyone
        shutdown_distributed(dist_info)
        return {"steps": step, "rank": dist_info.rank}

    samples = write_samples(ema.net, dataset, cfg, out_dir / "samples" / "final")
    records = read_log(log_path) if log_path.exists() else []
    if records:
        plot_log(records, out_dir / "loss.png", title=f"{cfg.method['name']} on {cfg.data.name}")
    summary = {"steps": step, "nonfinite_total": nonfinite_total, "final": records[-1] if records else {},
               "samples": sorted(str(p.relative_to(out_dir)) for p in (out_dir / "samples").glob("final*"))}
    metrics = sample_metrics(samples, dataset)
    if metrics:
        summary["metrics"] = metrics
    (out_dir / "metrics.json").write_text(json.dumps(summary, indent=1))
    barrier(dist_info)
    shutdown_distributed(dist_info)
    return summary
