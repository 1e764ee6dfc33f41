"""Consistency-model samplers (SPEC 2.5, 3.5): plain functions.

- `multistep_sample(consistency_fn, noise, times, sigma_d, generator)`: TrigFlow (sCT, sCD), with
  `consistency_fn(x_t, t) -> x0 estimate` and `t` a (B,) tensor of TrigFlow times.
- `ve_multistep_sample(consistency_fn, noise, sigmas, eps, generator)`: the EDM/VE formulation of
  the discrete-time models (CD, CT, iCT), CM paper Algorithm 1, with `consistency_fn(x, sigma)`.

Both take unit Gaussian `noise`; `ve_sigmas` maps TrigFlow times (what schedules and the time search
speak) to VE noise levels.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from fewstep.core.edm import EPS, T_MAX, edm_consistency, karras_grid
from fewstep.core.trigflow import SIGMA_D, expand_to, trigflow_consistency, trigflow_noise

TWO_STEP_TIMES = (math.pi / 2, 1.1)  # the sCM paper's 2-step schedule (t_mid = 1.1)


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
    """Multistep consistency sampling in the VE formulation: CM paper Algorithm 1 (SPEC 3.5).

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
    """TrigFlow times as VE noise levels, `sigma = sigma_d tan(t)` (SPEC 1.1) clipped to
    [eps, sigma_max]: t = pi/2, the TrigFlow prior, is sigma_max, the VE prior's level."""
    t_max = math.atan(sigma_max / sigma_d)
    return [sigma_max if float(t) >= t_max else max(sigma_d * math.tan(float(t)), eps) for t in times]


def ve_consistency_as_trigflow(net, sigma_data: float = SIGMA_D, eps: float = EPS, sigma_max: float = T_MAX,
                              labels: torch.Tensor | None = None):
    """A discrete-time (EDM/VE) consistency network as a TrigFlow callable `fn(x_t, t)`, for the
    routines that speak TrigFlow (editing): `f(x_t / cos(t), sigma_data tan(t))` (SPEC 1.1), with t
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


def trigflow_sampler_fn(net, sigma_d: float = SIGMA_D, labels: torch.Tensor | None = None, guidance=None):
    """The consistency function of a TrigFlow network, as a sampler callable (`guidance`: the CFG
    scale for a student that takes it as input)."""
    return lambda x_t, t: trigflow_consistency(net, x_t, t, sigma_d, labels, guidance)


def trigflow_search_grid(points: int = 40, sigma_d: float = SIGMA_D, sigma_min: float = 0.002,
                         sigma_max: float = 80.0, rho: float = 7.0) -> list[float]:
    """Candidate times for `ternary_search_times`: the Karras noise levels (SPEC 1.2) as TrigFlow
    times `arctan(sigma / sigma_d)`, decreasing, `points` of them."""
    return [math.atan(s / sigma_d) for s in karras_grid(points, sigma_min, sigma_max, rho).flip(0).tolist()]


def ternary_search_times(score: Callable[[tuple[float, ...]], float], steps: int, grid: Sequence[float],
                         first: float = math.pi / 2) -> tuple[list[float], list[dict]]:
    """Multistep time points chosen greedily, one at a time (CM paper, SPEC 3.5).

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
