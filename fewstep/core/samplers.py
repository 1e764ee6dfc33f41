"""Samplers of few-step models: plain functions, and the sampler objects a method hands out.

Functions (docs/math.md, Samplers):
- `multistep_sample(consistency_fn, noise, times, sigma_d, generator)`: TrigFlow (sCT, sCD, ECT), with
  `consistency_fn(x_t, t) -> x0 estimate` and `t` a (B,) tensor of TrigFlow times.
- `ve_multistep_sample(consistency_fn, noise, sigmas, eps, generator)`: the EDM/VE formulation of
  the discrete-time models (CD, CT, iCT), CM paper Algorithm 1, with `consistency_fn(x, sigma)`.

Both take unit Gaussian `noise`; `ve_sigmas` maps TrigFlow times (what schedules and the time search
speak) to VE noise levels.

Objects: `method.sampler(net)` returns one of `TrigFlowConsistencySampler`, `VEConsistencySampler`,
`FlowMapSampler` (here) or `fewstep.core.ode.ODESampler`. They share one interface and know no
method: what they need (sigma_d, t_max, whether the network takes guidance) is given to them.

    sampler = method.sampler(net)
    schedule = sampler.schedule(steps=2)            # the default times; or times=..., sampler=...
    x = sampler.sample(noise, schedule, labels, guidance, generator)     # NFE: sampler.nfe(schedule)
    f = sampler.consistency_fn(labels)              # (x_t, t) -> x0 for editing; None for ODE solvers
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from fewstep.core.edm import EPS, T_MAX, edm_consistency, karras_grid
from fewstep.core.trigflow import HALF_PI, SIGMA_D, expand_to, net_velocity, trigflow_consistency, trigflow_noise

TWO_STEP_TIMES = (math.pi / 2, 1.1)  # the sCM paper's 2-step schedule (t_mid = 1.1)
MULTISTEP = "multistep"  # the schedule name of every consistency / flow-map sampler


def cm_times(steps: int, first: float = HALF_PI) -> list[float]:
    """Multistep consistency times: 1 -> [first], 2 -> [first, 1.1] (the sCM paper), k > 2 ->
    first then k - 1 times evenly spaced from 1.1 down to 0.2 (as `fewstep sample --steps k`)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if steps <= 2:
        return [float(first), TWO_STEP_TIMES[1]][:steps]
    return [float(first)] + [float(t) for t in np.linspace(TWO_STEP_TIMES[1], 0.2, steps - 1)]


@torch.no_grad()
def multistep_sample(consistency_fn, noise: torch.Tensor, times, sigma_d: float = SIGMA_D,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Multistep consistency sampling in TrigFlow.

    `noise` is standard normal; `times` decreasing in (0, pi/2]. Step 1: `x = f(sigma_d z,
    times[0])` (exact for `times[0] = pi/2`; otherwise `z` is read as `x_T`). Each further t
    re-noises the estimate, `x_t = cos(t) x + sin(t) sigma_d z'`, and maps it back with f.
    NFE = len(times).
    """
    times = [float(t) for t in times]
    if not times:
        raise ValueError("times must hold at least one time")
    b = noise.shape[0]
    x = consistency_fn(sigma_d * noise, torch.full((b,), times[0], device=noise.device, dtype=noise.dtype))
    for t in times[1:]:
        tt = torch.full((b,), t, device=noise.device, dtype=noise.dtype)
        z = torch.randn(noise.shape, device=noise.device, dtype=noise.dtype, generator=generator)
        x = consistency_fn(trigflow_noise(x, sigma_d * z, tt), tt)
    return x


@torch.no_grad()
def ve_multistep_sample(consistency_fn, noise: torch.Tensor, sigmas, eps: float = EPS,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """Multistep consistency sampling in the VE formulation: CM paper Algorithm 1 (docs/math.md#ve-multistep-sampling-cm-algorithm-1).

    `consistency_fn(x, sigma) -> x0 estimate` with `sigma` a (B,) tensor of noise levels; `noise`
    standard normal; `sigmas` decreasing in [eps, T], `sigmas[0] = T` (sigma_max for a full
    sample). Step 1: `x = f(T z, T)`. Each further tau re-noises the estimate, which sits at level
    eps (`f(x, eps) = x`), up to level tau: `x = f(x + sqrt(tau^2 - eps^2) z', tau)`.
    NFE = len(sigmas).
    """
    sigmas = [float(s) for s in sigmas]
    if not sigmas:
        raise ValueError("sigmas must hold at least one noise level")
    if min(sigmas) < eps:
        raise ValueError(f"noise levels must be >= eps = {eps}, got {min(sigmas)}")
    b = noise.shape[0]
    x = consistency_fn(sigmas[0] * noise, noise.new_full((b,), sigmas[0]))
    for tau in sigmas[1:]:
        z = torch.randn(noise.shape, device=noise.device, dtype=noise.dtype, generator=generator)
        x = consistency_fn(x + math.sqrt(tau ** 2 - eps ** 2) * z, noise.new_full((b,), tau))
    return x


def ve_sigmas(times, sigma_d: float = SIGMA_D, eps: float = EPS, sigma_max: float = T_MAX) -> list[float]:
    """TrigFlow times as VE noise levels, `sigma = sigma_d tan(t)` (docs/math.md#discrete-time-models-as-trigflow-callables) clipped to
    [eps, sigma_max]: t = pi/2, the TrigFlow prior, is sigma_max, the VE prior's level."""
    t_max = math.atan(sigma_max / sigma_d)
    return [sigma_max if float(t) >= t_max else max(sigma_d * math.tan(float(t)), eps) for t in times]


def ve_consistency_as_trigflow(net, sigma_data: float = SIGMA_D, eps: float = EPS, sigma_max: float = T_MAX,
                              labels: torch.Tensor | None = None):
    """A discrete-time (EDM/VE) consistency network as a TrigFlow callable `fn(x_t, t)`, for the
    routines that speak TrigFlow (editing): `f(x_t / cos(t), sigma_data tan(t))` (docs/math.md#discrete-time-models-as-trigflow-callables), with t
    capped at `t_max = arctan(sigma_max / sigma_data)` and sigma floored at eps (f = identity).

    Not Algorithm 1 when passed to `multistep_sample`: at t = pi/2 the network sees
    `sigma_d z / cos(t_max) = sqrt(sigma_max^2 + sigma_data^2) z` rather than `sigma_max z`, and a
    re-noised estimate gets noise of std sigma rather than `sqrt(sigma^2 - eps^2)`. Sample these
    models with `ve_multistep_sample` (`fewstep.methods.cm` models: `method.sample`)."""
    t_max = math.atan(sigma_max / sigma_data)

    def fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.clamp(max=t_max)
        x_sigma = x_t / expand_to(torch.cos(t), x_t)
        sigma = (sigma_data * torch.tan(t)).clamp(min=eps)
        return edm_consistency(net, x_sigma, sigma, labels, sigma_data, eps)

    return fn


def trigflow_sampler_fn(net, sigma_d: float = SIGMA_D, labels: torch.Tensor | None = None, guidance=None,
                        cond: dict | None = None):
    """The consistency function of a TrigFlow network, as a sampler callable (`guidance`: the CFG
    scale for a student that takes it as input; `cond`: other keyword inputs, e.g. text)."""
    return lambda x_t, t: trigflow_consistency(net, x_t, t, sigma_d, labels, guidance, **(cond or {}))


def trigflow_search_grid(points: int = 40, sigma_d: float = SIGMA_D, sigma_min: float = 0.002,
                         sigma_max: float = 80.0, rho: float = 7.0) -> list[float]:
    """Candidate times for `ternary_search_times`: the Karras noise levels (docs/math.md#choosing-the-times) as TrigFlow
    times `arctan(sigma / sigma_d)`, decreasing, `points` of them."""
    return [math.atan(s / sigma_d) for s in karras_grid(points, sigma_min, sigma_max, rho).flip(0).tolist()]


def ternary_search_times(score: Callable[[tuple[float, ...]], float], steps: int, grid: Sequence[float],
                         first: float = math.pi / 2) -> tuple[list[float], list[dict]]:
    """Multistep time points chosen greedily, one at a time (CM paper, docs/math.md#choosing-the-times).

    `times[0] = first`; each further time is the point of `grid` (decreasing) below the previous
    one that minimizes `score(times + (candidate,))` (lower is better, e.g. FID), found by ternary
    search over the grid index, i.e. assuming the score is unimodal along the grid; the last
    three candidates are compared directly. Returns the times and every scored schedule, in order
    (`[{"times": [...], "score": s}, ...]`); each schedule is scored once.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    grid = [float(t) for t in grid]
    if any(a <= b for a, b in zip(grid, grid[1:])):
        raise ValueError("the search grid must be strictly decreasing")
    times, history, cache = [float(first)], [], {}

    def f(candidates: list[float], i: int) -> float:
        key = tuple(times) + (candidates[i],)
        if key not in cache:
            cache[key] = float(score(key))
            history.append({"times": list(key), "score": cache[key]})
        return cache[key]

    for _ in range(steps - 1):
        candidates = [t for t in grid if t < times[-1]]
        if not candidates:
            raise ValueError(f"no grid time below {times[-1]:.4f} left for step {len(times) + 1}")
        lo, hi = 0, len(candidates) - 1
        while hi - lo > 2:
            m1, m2 = lo + (hi - lo) // 3, hi - (hi - lo) // 3
            if f(candidates, m1) < f(candidates, m2):
                hi = m2
            else:
                lo = m1
        best = min(range(lo, hi + 1), key=lambda i: f(candidates, i))
        times.append(candidates[best])
    return times, history


# ---------------------------------------------------------------------------------------------
# Sampler objects


@dataclass(frozen=True)
class Schedule:
    """One way to sample: `sampler` 'multistep' with its `times` (consistency and flow-map models),
    or an ODE solver's name with its `steps`."""

    sampler: str
    steps: int
    times: tuple[float, ...] = ()

    def to_dict(self) -> dict:
        return {"sampler": self.sampler, "steps": self.steps, **({"times": list(self.times)} if self.times else {})}


class Sampler:
    """What every sampler object offers; the subclasses fill in `sample`, `nfe`, the schedules and
    `consistency_fn`. `sample` takes unit Gaussian `noise` and returns model-space samples."""

    def schedules(self, steps: list[int] | None = None, nfe: list[int] | None = None,
                  samplers: list[str] | None = None) -> list[Schedule]:
        """The rows `fewstep eval` samples: one per step count (or NFE) and sampler."""
        raise NotImplementedError

    def schedule(self, steps: int | None = None, times=None, sampler: str | None = None) -> Schedule:
        """One schedule: the default one, or at `steps`, or at explicit `times`, or with `sampler`."""
        raise NotImplementedError

    def preview_schedules(self, times=None) -> list[Schedule]:
        """What the training previews sample (`times`: a consistency model's multistep times)."""
        raise NotImplementedError

    def nfe(self, schedule: Schedule) -> int:
        """Network evaluations per sample (a CFG-guided evaluation counts once)."""
        raise NotImplementedError

    def sample(self, noise: torch.Tensor, schedule: Schedule, labels: torch.Tensor | None = None,
               guidance=1.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """Samples from `noise`. Samplers that also take the network contract's other cond (a
        text-to-image model's `text`, `text_mask`) have a `cond=` keyword and `takes_cond = True`."""
        raise NotImplementedError

    def consistency_fn(self, labels: torch.Tensor | None = None, guidance=None) -> Callable | None:
        """`fn(x_t, t) -> x0` in TrigFlow time (editing), or None where the model has none."""
        return None


@dataclass(frozen=True)
class _Multistep(Sampler):
    """The schedule logic shared by the consistency and flow-map samplers: decreasing times, NFE =
    len(times), starting at `t_max` by default."""

    net: torch.nn.Module
    sigma_d: float = SIGMA_D
    guidance_input: bool = False  # the network takes the CFG scale as an input (sCD's guidance_range)
    t_max: float = HALF_PI  # where sampling starts: pi/2 is the exact prior
    default_times: tuple[float, ...] = ()  # a generator trained at its own times (DMD2) samples at them by default

    def times(self, steps: int) -> list[float]:
        if self.default_times and steps == len(self.default_times):
            return [float(t) for t in self.default_times]
        return cm_times(steps, self.t_max)

    def default_steps(self) -> int:
        return len(self.default_times) or 2

    def _check_sampler(self, sampler: str | None) -> None:
        if sampler not in (None, MULTISTEP):
            raise ValueError(f"a consistency model samples with its own {MULTISTEP!r} sampler, not {sampler!r} "
                             f"(--sampler applies to diffusion models)")

    def schedules(self, steps=None, nfe=None, samplers=None) -> list[Schedule]:
        if steps is not None and nfe is not None:
            raise ValueError("give --steps or --nfe, not both")
        for s in samplers or ():
            self._check_sampler(s)
        return [self.schedule(k) for k in (steps or nfe or [1, 2])]

    def schedule(self, steps=None, times=None, sampler=None) -> Schedule:
        self._check_sampler(sampler)
        if times is not None and steps is not None:
            raise ValueError("give steps or times, not both")
        times = self.times(self.default_steps() if steps is None else steps) if times is None else [float(t) for t in times]
        if not times or any(b >= a for a, b in zip(times, times[1:])) or times[-1] <= 0:
            raise ValueError(f"multistep times must be strictly decreasing in (0, pi/2], got {times}")
        return Schedule(MULTISTEP, len(times), tuple(times))

    def preview_schedules(self, times=None) -> list[Schedule]:
        times = tuple(times or self.times(max(self.default_steps(), 2)))
        return [self.schedule(times=times[:1])] + ([self.schedule(times=times)] if len(times) > 1 else [])

    def nfe(self, schedule: Schedule) -> int:
        return len(schedule.times)

    def _guidance(self, guidance):
        """The scale handed to the network: only a student trained with it as an input takes one."""
        if self.guidance_input:
            return guidance
        if guidance is not None and (isinstance(guidance, torch.Tensor) or guidance != 1.0):
            raise ValueError("this consistency model's guidance was fixed when it was distilled (method.guidance); "
                             "a student distilled with method.guidance_range takes --guidance")
        return None

    def _start(self, schedule: Schedule) -> list[float]:
        """The schedule's times, a first time at or above t_max read as t_max (where sampling starts)."""
        times = [float(t) for t in schedule.times]
        if not times:
            raise ValueError("times must hold at least one time")
        times[0] = min(times[0], self.t_max)
        return times


@dataclass(frozen=True)
class TrigFlowConsistencySampler(_Multistep):
    """Multistep consistency sampling of a TrigFlow consistency network (sCT, sCD, ECT): `x = f(x_T,
    times[0])`, then re-noise to each further t and map back with f (docs/math.md, Multistep
    consistency sampling).

    A schedule that starts at (or above) `t_max` starts from `x_T = sigma_d sin(t_max) z`, the noise
    part of `x_{t_max}`: the exact prior at t_max = pi/2, and EDM's `sigma_max z` at `t_max =
    arctan(sigma_max / sigma_d)` (ECT starts there). A schedule that starts lower (SDEdit-like) reads
    `sigma_d z` as its first state."""

    takes_cond = True

    def consistency_fn(self, labels=None, guidance=None, cond: dict | None = None) -> Callable:
        w = guidance if self.guidance_input else None
        return trigflow_sampler_fn(self.net, self.sigma_d, labels, w, cond)

    @torch.no_grad()
    def sample(self, noise, schedule, labels=None, guidance=1.0, generator=None, cond: dict | None = None
               ) -> torch.Tensor:
        fn = self.consistency_fn(labels, self._guidance(guidance), cond)
        times = self._start(schedule)
        if times[0] == self.t_max:
            noise = math.sin(self.t_max) * noise  # sin(pi/2) is 1.0 exactly: the prior's noise unchanged
        return multistep_sample(fn, noise, times, self.sigma_d, generator)


@dataclass(frozen=True)
class VEConsistencySampler(_Multistep):
    """CM paper Algorithm 1 for a discrete-time consistency network in EDM parameterization (CD, CT,
    iCT): schedules speak TrigFlow times, read as the levels `sigma = sigma_d tan(t)` (`ve_sigmas`;
    t = pi/2 is sigma_max). These networks take no guidance input."""

    eps: float = EPS
    sigma_max: float = T_MAX

    def consistency_fn(self, labels=None, guidance=None) -> Callable:
        return ve_consistency_as_trigflow(self.net, self.sigma_d, self.eps, self.sigma_max, labels)

    @torch.no_grad()
    def sample(self, noise, schedule, labels=None, guidance=1.0, generator=None) -> torch.Tensor:
        self._guidance(guidance)
        sigmas = ve_sigmas(self._start(schedule), self.sigma_d, self.eps, self.sigma_max)
        return ve_multistep_sample(lambda x, sigma: edm_consistency(self.net, x, sigma, labels, self.sigma_d, self.eps),
                                   noise, sigmas, self.eps, generator)


@dataclass(frozen=True)
class FlowMapSampler(_Multistep):
    """Flow-map sampling with an average velocity `u(x_t, r, t) = sigma_d F(x_t / sigma_d, t, r=r)`
    (MeanFlow): `x = sigma_d z` at times[0], then one jump `x <- x - (t - s) u(x, s, t)` per time, the
    last to s = 0. Deterministic: no re-noising (the generator is unused)."""

    def average_velocity(self, labels=None, guidance=None) -> Callable:
        """`u(x_t, r, t)` as a callable of (B,) times r and t."""
        w = guidance if self.guidance_input else None
        return lambda x_t, r, t: net_velocity(self.net, x_t, t, self.sigma_d, labels, guidance=w, r=r)

    def consistency_fn(self, labels=None, guidance=None) -> Callable:
        """The flow map to 0, `f(x_t, t) = x_t - t u(x_t, 0, t)`: a consistency function."""
        u = self.average_velocity(labels, guidance)
        return lambda x_t, t: x_t - expand_to(t, x_t) * u(x_t, torch.zeros_like(t), t)

    @torch.no_grad()
    def sample(self, noise, schedule, labels=None, guidance=1.0, generator=None) -> torch.Tensor:
        times = self._start(schedule)
        u = self.average_velocity(labels, self._guidance(guidance))
        x = self.sigma_d * noise
        for t, s in zip(times, times[1:] + [0.0]):
            tt = torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype)
            x = x - (t - s) * u(x, torch.full_like(tt, s), tt)
        return x
