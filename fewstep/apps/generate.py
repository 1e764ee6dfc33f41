"""Sampling a trained network, whatever its method: one place for `fewstep sample`,
`fewstep eval` and the training loop's previews.

Consistency models (sCT, sCD) sample with multistep consistency sampling (`fewstep.core.samplers`);
diffusion models (TrigFlow flow matching, EDM) with a probability-flow ODE solver
(`fewstep.core.ode`). A `Schedule` names the sampler and its steps; `generate` returns samples and
the number of function evaluations (NFE).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from fewstep.networks.contract import network_info
from fewstep.core.trigflow import SIGMA_D

CM_SAMPLER = "multistep"
DEFAULT_ODE_STEPS = 18  # EDM's CIFAR-10 setting: 35 NFE with Heun


def cm_times(steps: int) -> list[float]:
    """Multistep consistency times: 1 -> [pi/2], 2 -> [pi/2, 1.1] (the sCM paper), k > 2 ->
    pi/2 then k - 1 times evenly spaced from 1.1 down to 0.2 (as `fewstep sample --steps k`)."""
    from fewstep.core.samplers import TWO_STEP_TIMES

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if steps <= 2:
        return list(TWO_STEP_TIMES[:steps])
    return [math.pi / 2] + [float(t) for t in np.linspace(TWO_STEP_TIMES[1], 0.2, steps - 1)]


# ----------------------------------------------------------------------------------------------
# A model from a checkpoint, and the schedules it samples with


@dataclass(frozen=True)
class Schedule:
    """One table row's sampler: `sampler` 'multistep' with `times`, or an ODE solver with `steps`."""

    sampler: str
    steps: int
    times: tuple[float, ...] = ()

    def to_dict(self) -> dict:
        return {"sampler": self.sampler, "steps": self.steps, **({"times": list(self.times)} if self.times else {})}


@dataclass
class Model:
    """A network rebuilt from a checkpoint (EMA weights by default), its method (which says how it
    samples: `fewstep.methods.base`), and what sampling needs."""

    net: torch.nn.Module
    method: object  # the training method, rebuilt from the checkpoint (without its teacher)
    kind: str  # "image" or "vector"
    shape: tuple[int, ...]
    num_classes: int
    config: dict  # the run's config, as a dict
    checkpoint: Path | None = None
    step: int = 0
    weights: str = "ema"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    latents: dict | None = None  # latent data: the VAE that decodes samples to pixels (`fewstep.interop.diffusers.latents`)
    _decoder: object = field(default=None, repr=False)

    @property
    def output_shape(self) -> tuple[int, ...]:
        """The shape of a sample as `generate` returns it: pixels for a latent model."""
        return tuple(self.latents["pixel_shape"]) if self.latents else tuple(self.shape)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Model-space samples -> what `generate` returns (VAE-decoded pixels for latent models)."""
        return self._codec()(x) if self.latents else x

    def _codec(self):
        if self._decoder is None:
            from fewstep.interop.diffusers.latents import VAECodec

            self._decoder = VAECodec(self.latents, self.device)
        return self._decoder

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels -> model space (the VAE posterior's mean for latent models; identity otherwise)."""
        return self._codec().encode(pixels) if self.latents else pixels

    @property
    def method_name(self) -> str:
        return self.method.name

    @property
    def sigma_d(self) -> float:
        return float(self.method.sigma_d)

    @property
    def is_consistency(self) -> bool:
        return self.method.sampling == "consistency"

    @property
    def default_steps(self) -> int | None:
        """The steps this checkpoint samples with by default (a PD student: its own; else None)."""
        return self.method.default_sample_steps(self.step)

    @property
    def run_dir(self) -> Path | None:
        """The run folder of the checkpoint (None for a network in hand)."""
        return None if self.checkpoint is None else run_dir_of(self.checkpoint)

    @classmethod
    def from_net(cls, net: torch.nn.Module, method, kind: str, shape, config: dict | None = None,
                 step: int = 0, latents: dict | None = None) -> "Model":
        """Wrap a network in hand (e.g. the EMA network during training)."""
        return cls(net, method, kind, tuple(shape), network_info(net).num_classes, config or {}, step=step,
                   device=next(net.parameters()).device, latents=latents)


def run_dir_of(checkpoint: str | Path) -> Path:
    """The run folder a checkpoint file belongs to (`<run>/checkpoints/ckpt-*.json` -> `<run>`)."""
    parent = Path(checkpoint).parent
    return parent.parent if parent.name == "checkpoints" else parent


def write_result(result: dict, out: str | None, default_name: str) -> Path:
    """Write a command's JSON result to `out`, by default beside the checkpoint's run folder."""
    import json

    path = Path(out) if out else run_dir_of(result["checkpoint"]) / default_name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return path


def consistency_sampler_fn(model: "Model", labels: torch.Tensor | None = None, guidance=None):
    """The consistency function of a consistency checkpoint as a TrigFlow sampler callable
    `fn(x_t, t) -> x0` (the method converts other parameterizations)."""
    return model.method.consistency_fn(model.net, labels, guidance)


def load_model(checkpoint: str | Path, device: str | torch.device = "cpu", ema: bool = True) -> Model:
    """Rebuild the network and method of a checkpoint (a run folder, its checkpoints/ folder, or a
    ckpt-*.json). The network class must be registered (`fewstep.networks.register_network`);
    nothing is imported on the checkpoint's say-so."""
    from fewstep.training.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint, unprefixed
    from fewstep.config import ConfigError, build_method
    from fewstep.networks import build_network, build_registered

    device = torch.device(device)
    from fewstep.interop.diffusers.pretrained import is_diffusers_folder, is_hub_id

    if is_diffusers_folder(checkpoint) or is_hub_id(str(checkpoint)):
        return load_diffusers_model(checkpoint, device)
    json_path = resolve_checkpoint(checkpoint)
    tensors, state = load_checkpoint(json_path, device=device)
    config = state.get("config") or {}
    info = state.get("data")
    method_cfg = state.get("method") or config.get("method")
    if not info or not method_cfg:
        raise CheckpointError(f"{json_path} records no data shape or method; it was not written by fewstep.fit")
    try:
        method = build_method(method_cfg)
    except ConfigError as e:
        raise CheckpointError(f"{json_path}: {e}; a user's method must be registered "
                              f"(@fewstep.methods.register_method) and imported (--import MODULE)") from None
    if state.get("network"):
        net = build_registered(state["network"])
    elif not config.get("network"):
        raise CheckpointError(f"{json_path} names no network: its class was not registered when it was trained "
                              f"(decorate it with @fewstep.networks.register_network('some-name'))")
    else:  # fewstep 0.1 checkpoints: the network from the run's config
        net = build_network(_legacy_network_config(config["network"], info["kind"]), info["kind"],
                            tuple(info["shape"]), info["num_classes"])
    if state.get("step") and getattr(method, "total_steps", None) == 0:
        method.setup(net, int(config.get("train", {}).get("steps", state["step"])))
    prefix = "ema" if ema else "net"
    if state.get("shards"):  # a sharded (fsdp) checkpoint: the full weights from every process's file
        from fewstep.training.fsdp import read_full, shard_files

        shards = state["shards"]
        weights = read_full(shard_files(json_path.parent / shards["dir"], shards["processes"]), shards["layout"],
                            prefix)
    else:
        weights = unprefixed(prefix, tensors)
    try:
        net.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(f"{json_path}: the weights do not fit network {type(net).__name__}: "
                              f"{' '.join(str(e).split())[:300]}") from None
    return Model(net.to(device).eval(), method, info["kind"], tuple(info["shape"]),
                 network_info(net).num_classes, config, json_path, int(state["step"]), prefix, device,
                 info.get("latents"))


def load_diffusers_model(source, device: str | torch.device = "cpu", sigma_d: float | None = None,
                         scheduler=None) -> Model:
    """A diffusers pipeline or model folder (or Hub id) as a fewstep model. A folder that fewstep
    exported (`fewstep.json` beside it) is the consistency model it was trained as; any other is a
    diffusion model, sampled with fewstep's ODE solvers through the exact TrigFlow conversion
    (`fewstep.interop.diffusers.schedules`)."""
    from fewstep.config import build_method
    from fewstep.interop.diffusers.pretrained import load_diffusers_network, read_diffusers_source

    record = read_diffusers_source(source, scheduler).fewstep or {}
    if sigma_d is None:
        sigma_d = float(record.get("method", {}).get("sigma_d", SIGMA_D))
    net, src = load_diffusers_network(source, sigma_d, scheduler, device=device)
    method = build_method(record.get("method") or {"name": "flow", "sigma_d": sigma_d})
    size = src.config.get("sample_size")
    size = (size, size) if isinstance(size, int) else tuple(size)
    shape = (int(src.config.get("in_channels", 3)), *size)
    config = {k: record[k] for k in ("data", "network") if k in record}
    return Model(net, method, "image", shape, int(net.num_classes), config, Path(source), int(record.get("step", 0)),
                 "ema", torch.device(device))


def _legacy_network_config(cfg: dict, kind: str) -> dict:
    """A fewstep 0.1 `network` section mixed every architecture's fields: keep the arch's own."""
    from fewstep.networks import BUILD_KEYS, constructor_arguments, network_class, resolve_arch

    arch = resolve_arch(cfg.get("arch", "auto"), kind)
    params = constructor_arguments(network_class(arch))
    return {k: v for k, v in cfg.items() if k in params or k in BUILD_KEYS}


def parse_times(text: str, option: str = "--times") -> list[float]:
    """Comma-separated multistep times, strictly decreasing in (0, pi/2]; a value that rounds pi/2
    (e.g. 1.5708) is read as pi/2."""
    from fewstep.config import validate_times

    try:
        times = [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"{option} must be comma-separated numbers, got {text!r}") from None
    times = [math.pi / 2 if math.pi / 2 < t < math.pi / 2 + 1e-3 else t for t in times]
    validate_times(option, times)
    return times


def schedules(method, steps: list[int] | None = None, nfe: list[int] | None = None,
              samplers: list[str] | None = None, default_steps: int | None = None) -> list[Schedule]:
    """The rows to evaluate: consistency models sample at each step count (NFE = steps);
    diffusion models run each ODE sampler at each step count (default `default_steps`, else
    18), or at the steps that give each requested NFE (Heun: NFE = 2 steps - 1, so NFE must be
    odd; Euler, DPM-Solver++(2M), DDIM: NFE = steps). Progressive-distillation students default
    to DDIM. `method`: a method object (`fewstep.methods.base`): its `sampling` and
    `default_ode_sampler` decide."""
    if steps is not None and nfe is not None:
        raise ValueError("give --steps or --nfe, not both")
    name = method.name
    if method.sampling == "consistency":
        if samplers and set(samplers) != {CM_SAMPLER}:
            raise ValueError(f"method {name!r} is a consistency model: its sampler is {CM_SAMPLER!r} "
                             f"(--sampler applies to diffusion checkpoints)")
        return [Schedule(CM_SAMPLER, k, tuple(cm_times(k))) for k in (steps or nfe or [1, 2])]
    from fewstep.core.ode import SAMPLERS

    samplers = samplers or [method.default_ode_sampler]
    for s in samplers:
        if s not in SAMPLERS:
            raise ValueError(f"--sampler must be among {', '.join(SAMPLERS)} for method {name!r}, got {s!r}")
    rows = []
    for s in samplers:
        if nfe is None:
            rows += [Schedule(s, k) for k in (steps or [default_steps or DEFAULT_ODE_STEPS])]
            continue
        for n in nfe:
            if s == "heun" and n % 2 == 0:
                raise ValueError(f"heun takes 2 steps - 1 NFE, so --nfe must be odd for it, got {n}")
            rows.append(Schedule(s, (n + 1) // 2 if s == "heun" else n))
    return rows


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batch_seed(seed: int, index: int) -> int:
    """The seed of sampling batch `index`: each batch draws its noise (and multistep re-noising)
    from a generator of its own, so a sample depends on (seed, batch_size, its index) alone, not
    on which process draws it (EDM draws per-sample seeds the same way)."""
    return (seed * 1_000_003 + index) % 2**63


def _sample_batch(model: Model, noise: torch.Tensor, labels: torch.Tensor | None, schedule: Schedule,
                  generator: torch.Generator, guidance: float) -> tuple[torch.Tensor, int]:
    """One batch from unit Gaussian `noise`; returns (samples, NFE)."""
    if model.is_consistency:
        return model.method.sample(model.net, noise, schedule.times, generator, labels, guidance), len(schedule.times)
    from fewstep.core.ode import solve

    ode = model.method.ode(model.net, labels, guidance)
    return solve(ode, noise, schedule.steps, schedule.sampler, times=model.method.ode_times(schedule.steps))


@torch.no_grad()
def generate(model: Model, schedule: Schedule, num: int, batch_size: int = 256, seed: int = 0,
             guidance: float = 1.0, progress: bool = True, labels: torch.Tensor | None = None, *,
             rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, int, float]:
    """`num` samples (on the CPU; pixels for a latent model) in batches of `batch_size`; batch k draws from a generator seeded
    by `batch_seed(seed, k)` (the global RNG is untouched). Class-conditional models get `labels`,
    by default balanced 0, 1, ..., K-1, 0, ... Returns (samples, NFE, seconds of sampling).

    Split over processes, process `rank` of `world_size` draws batches rank, rank + world_size, ...
    and returns them in that order; interleaved in batch order, the processes' samples equal
    those of `world_size=1`, bit for bit (`fewstep.training.distributed.gather_batches`)."""
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank {rank} of {world_size}")
    if guidance != 1.0 and not model.num_classes:
        raise ValueError("guidance applies to class-conditional checkpoints only")
    if guidance != 1.0 and model.is_consistency and not network_info(model.net).guidance_input:
        raise ValueError("this consistency model's guidance was fixed when it was distilled (method.guidance); "
                         "a student distilled with method.guidance_range takes --guidance")
    if not model.num_classes:
        labels = None
    elif labels is None:
        labels = torch.arange(num) % model.num_classes
    starts = list(range(0, num, batch_size))[rank::world_size]
    out, nfe = [], 0
    _sync(model.device)
    start_time = time.perf_counter()
    desc = f"{model.method_name} {schedule.sampler} {schedule.steps} step{'s' * (schedule.steps > 1)}"
    for start in tqdm(starts, desc=desc, unit="batch", disable=not progress, leave=False):
        n = min(batch_size, num - start)
        gen = torch.Generator(device=model.device).manual_seed(batch_seed(seed, start // batch_size))
        noise = torch.randn((n, *model.shape), device=model.device, generator=gen)
        lab = None if labels is None else labels[start:start + n].to(model.device)
        x, nfe = _sample_batch(model, noise, lab, schedule, gen, guidance)
        out.append(model.decode(x).float().cpu())
    _sync(model.device)
    samples = torch.cat(out) if out else torch.empty(0, *model.output_shape)
    return samples, nfe, time.perf_counter() - start_time


def sample(net: torch.nn.Module, method, shape, num: int, *, steps: int | None = None, times=None,
           sampler: str | None = None, seed: int = 0, guidance: float = 1.0, labels: torch.Tensor | None = None,
           batch_size: int = 256) -> torch.Tensor:
    """`num` samples of shape `shape` from a network in hand, the way its `method` samples:
    consistency models at `steps` (default 2; or at the multistep `times`), diffusion models with
    their ODE solver (`sampler`, default Heun, 18 steps). The network's mode is left as it was.

        x = sample(net, SCT(), (2,), 1000, steps=1)     # one-step samples
    """
    kind = "image" if len(shape) == 3 else "vector"
    model = Model.from_net(net, method, kind, shape)
    if method.sampling == "consistency":
        if sampler not in (None, CM_SAMPLER):
            raise ValueError(f"a consistency model samples with {CM_SAMPLER!r}, not {sampler!r}")
        times = tuple(parse_times(",".join(map(str, times)), "times") if times is not None else cm_times(steps or 2))
        schedule = Schedule(CM_SAMPLER, len(times), times)
    else:
        if times is not None:
            raise ValueError("times= is for consistency models; give steps= and sampler= for diffusion models")
        schedule = schedules(method, [steps] if steps else None, samplers=[sampler] if sampler else None)[0]
    was_training = net.training
    net.eval()
    try:
        return generate(model, schedule, num, batch_size, seed, guidance, progress=False, labels=labels)[0]
    finally:
        net.train(was_training)
