"""Sampling a trained network, whatever its method: one place for `fewstep sample`,
`fewstep eval` and the training loop's previews.

A checkpoint's method hands out its sampler (`method.sampler(net)`, `fewstep.core.samplers`):
multistep consistency sampling (sCT, sCD, ECT; CM Algorithm 1 for CD, CT, iCT), flow-map
sampling (MeanFlow), or a probability-flow ODE solver (flow matching, EDM, PD). A `Schedule`
names the sampler and its steps or times; `generate` returns samples and the number of function
evaluations (NFE).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fewstep.core.ode import DEFAULT_ODE_STEPS  # noqa: F401 (the CLI's help text)
from fewstep.core.samplers import Schedule, cm_times  # noqa: F401 (re-exported: the apps' vocabulary)
from fewstep.networks.contract import network_info
from fewstep.training.restore import Restored

# ----------------------------------------------------------------------------------------------
# A model from a checkpoint, and the sampler it samples with


@dataclass
class Model(Restored):
    """A restored network and method (`fewstep.training.restore.Restored`: the network, its method,
    which hands out its sampler, and the data it was trained on), with what sampling adds: the VAE
    decoder of latent models."""

    _decoder: object = field(default=None, repr=False)
    _prompt_encoder: object = field(default=None, repr=False)

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
    def takes_text(self) -> bool:
        """Whether this is a text-to-image model (samples need prompts)."""
        return network_info(self.net).text_input

    def prompt_encoder(self):
        """The run's text encoder (`data.text_encoder`, recorded by training), loaded once."""
        if self._prompt_encoder is None:
            from fewstep.interop.diffusers.text import PromptEncoder

            spec = (self.config.get("data") or {}).get("text_encoder")
            if not spec and self.checkpoint is not None and (Path(self.checkpoint) / "model_index.json").exists():
                spec = str(self.checkpoint)  # a diffusers pipeline folder: its own text encoder
            if not spec:
                raise ValueError("this text-to-image checkpoint records no text encoder (data.text_encoder)")
            self._prompt_encoder = PromptEncoder(spec, self.device)
        return self._prompt_encoder

    def text_cond(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The network contract's text cond of `prompts`: from the training prompts' table when the
        method holds it and has them all (training previews), else encoded by the run's encoder."""
        table = getattr(self.method, "prompts", None)
        if table is not None and all(p in table.prompts for p in prompts):
            index = {p: i for i, p in enumerate(table.prompts)}
            return table.cond(torch.tensor([index[p] for p in prompts], device=self.device))
        return self.prompt_encoder().cond(list(prompts), self.device)

    def default_prompts(self) -> list[str]:
        """The prompts of samples asked for without any: the training prompts (previews)."""
        table = getattr(self.method, "prompts", None)
        if table is None:
            raise ValueError("this model is text-to-image: give prompts (fewstep sample --prompt TEXT or --prompts FILE)")
        return table.prompts

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


def load_model(checkpoint: str | Path, device: str | torch.device = "cpu", ema: bool = True) -> Model:
    """Rebuild the network and method of a checkpoint (a run folder, its checkpoints/ folder, or a
    ckpt-*.json), or of a diffusers model folder or Hub id (`fewstep.training.restore`). The network
    class must be registered (`fewstep.networks.register_network`); nothing is imported on the
    checkpoint's say-so."""
    from fewstep.training.restore import restore

    return _model(restore(checkpoint, device, ema))


def load_diffusers_model(source, device: str | torch.device = "cpu", sigma_d: float | None = None,
                         scheduler=None) -> Model:
    """A diffusers pipeline or model folder (or Hub id) as a fewstep model. A folder that fewstep
    exported (`fewstep.json` beside it) is the consistency model it was trained as; any other is a
    diffusion model, sampled with fewstep's ODE solvers through the exact TrigFlow conversion
    (`fewstep.interop.diffusers.schedules`)."""
    from fewstep.training.restore import restore_diffusers

    return _model(restore_diffusers(source, device, sigma_d, scheduler))


def _model(restored) -> Model:
    """A `fewstep.training.restore.Restored` network and method, with what sampling adds."""
    import dataclasses

    return Model(**{f.name: getattr(restored, f.name) for f in dataclasses.fields(restored)})


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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batch_seed(seed: int, index: int) -> int:
    """The seed of sampling batch `index`: each batch draws its noise (and multistep re-noising)
    from a generator of its own, so a sample depends on (seed, batch_size, its index) alone, not
    on which process draws it (EDM draws per-sample seeds the same way)."""
    return (seed * 1_000_003 + index) % 2**63


@torch.no_grad()
def generate(model: Model, schedule: Schedule, num: int, batch_size: int = 256, seed: int = 0,
             guidance: float = 1.0, progress: bool = True, labels: torch.Tensor | None = None, *,
             rank: int = 0, world_size: int = 1, transform=None,
             prompts: list[str] | None = None) -> tuple[torch.Tensor, int, float]:
    """`num` samples (on the CPU; pixels for a latent model) in batches of `batch_size`; batch k draws from a generator seeded
    by `batch_seed(seed, k)` (the global RNG is untouched). Class-conditional models get `labels`,
    by default balanced 0, 1, ..., K-1, 0, ... Returns (samples, NFE, seconds of sampling).

    Split over processes, process `rank` of `world_size` draws batches rank, rank + world_size, ...
    and returns them in that order; interleaved in batch order, the processes' samples equal
    those of `world_size=1`, bit for bit (`fewstep.training.distributed.gather_batches`).

    `transform(batch) -> tensor` maps each decoded batch before it is kept (e.g. to its features),
    so that 50,000 large samples never sit in memory together; its time counts in the seconds.
    A text-to-image model samples `prompts` cyclically (sample i has prompt i mod len(prompts); by
    default the training prompts of a run in progress)."""
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank {rank} of {world_size}")
    text = model.takes_text
    diffusion = model.sampler.consistency_fn() is None if text else False
    if guidance != 1.0 and not model.num_classes and not diffusion:
        raise ValueError("guidance applies to class-conditional checkpoints and text-to-image diffusion models only")
    if not model.num_classes:
        labels = None
    elif labels is None:
        labels = torch.arange(num) % model.num_classes
    if prompts is not None and not text:
        raise ValueError("prompts are for text-to-image models; this model takes no text")
    if text:
        prompts = list(prompts) if prompts is not None else model.default_prompts()
        if not prompts:
            raise ValueError("no prompts given")
        if not getattr(model.sampler, "takes_cond", False):
            raise ValueError(f"a text-to-image {model.method_name!r} model cannot sample with prompts yet")
    starts = list(range(0, num, batch_size))[rank::world_size]
    sampler = model.sampler
    out, nfe = [], sampler.nfe(schedule)
    _sync(model.device)
    start_time = time.perf_counter()
    desc = f"{model.method_name} {schedule.sampler} {schedule.steps} step{'s' * (schedule.steps > 1)}"
    for start in tqdm(starts, desc=desc, unit="batch", disable=not progress, leave=False):
        n = min(batch_size, num - start)
        gen = torch.Generator(device=model.device).manual_seed(batch_seed(seed, start // batch_size))
        noise = torch.randn((n, *model.shape), device=model.device, generator=gen)
        lab = None if labels is None else labels[start:start + n].to(model.device)
        if text:
            cond = model.text_cond([prompts[i % len(prompts)] for i in range(start, start + n)])
            extra = {"null_cond": model.text_cond([""] * n)} if diffusion else {}  # CFG against the empty prompt
            x = sampler.sample(noise, schedule, lab, guidance, gen, cond=cond, **extra)
        else:
            x = sampler.sample(noise, schedule, lab, guidance, gen)
        x = model.decode(x).float()
        out.append((x if transform is None else transform(x)).cpu())
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
    from fewstep.methods.base import as_method

    method = as_method(method)
    kind = "image" if len(shape) == 3 else "vector"
    model = Model.from_net(net, method, kind, shape)
    if times is not None:
        times = parse_times(",".join(map(str, times)), "times")
    schedule = method.sampler(net).schedule(steps, times, sampler)
    was_training = net.training
    net.eval()
    try:
        return generate(model, schedule, num, batch_size, seed, guidance, progress=False, labels=labels)[0]
    finally:
        net.train(was_training)
