"""Consistency-model samplers (SPEC 2.5, 3.5): plain functions with one signature.

`consistency_fn(x_t, t) -> x0 estimate` where `t` is a (B,) tensor of TrigFlow times.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from fewstep.trigflow import trigflow_consistency, trigflow_noise

TWO_STEP_TIMES = (math.pi / 2, 1.1)  # the sCM paper's 2-step schedule (t_mid = 1.1)


@torch.no_grad()
def multistep_sample(consistency_fn, noise: torch.Tensor, times, sigma_d: float = 0.5,
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


def ve_consistency_as_trigflow(net, sigma_data: float = 0.5, eps: float = 0.002, sigma_max: float = 80.0,
                              labels: torch.Tensor | None = None):
    """A discrete-time (EDM/VE) consistency network as a TrigFlow sampler callable, so that every
    sampler and editing routine serves both families: `x_sigma = x_t / cos(t)`,
    `sigma = sigma_data tan(t)` (SPEC 1.1), with t capped at `arctan(sigma_max / sigma_data)` (there
    `x_t / cos(t)` is the VE prior sample `sigma_max z`) and sigma floored at eps (f = identity)."""
    from fewstep.edm import edm_consistency

    t_max = math.atan(sigma_max / sigma_data)

    def fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.clamp(max=t_max)
        x_sigma = x_t / torch.cos(t).reshape(-1, *([1] * (x_t.ndim - 1)))
        sigma = (sigma_data * torch.tan(t)).clamp(min=eps)
        return edm_consistency(net, x_sigma, sigma, labels, sigma_data, eps)

    return fn


def trigflow_sampler_fn(net, sigma_d: float = 0.5, labels: torch.Tensor | None = None, guidance=None):
    """The consistency function of a TrigFlow network, as a sampler callable (`guidance`: the CFG
    scale for a student that takes it as input)."""
    return lambda x_t, t: trigflow_consistency(net, x_t, t, sigma_d, labels, guidance)


@torch.no_grad()
def sample_trigflow_cm(net, num: int, shape, times=TWO_STEP_TIMES, sigma_d: float = 0.5,
                       labels: torch.Tensor | None = None, batch_size: int = 256, device=None,
                       seed: int | None = 0) -> torch.Tensor:
    """`num` samples from a TrigFlow consistency network in batches, on its device.

    Uses its own generator (seeded), so sampling never disturbs the global RNG of a run.
    """
    device = device or next(net.parameters()).device
    gen = torch.Generator(device=device)
    if seed is not None:
        gen.manual_seed(seed)
    else:
        gen.seed()
    out = []
    for start in range(0, num, batch_size):
        n = min(batch_size, num - start)
        noise = torch.randn((n, *shape), device=device, generator=gen)
        lab = None if labels is None else labels[start:start + n].to(device)
        out.append(multistep_sample(trigflow_sampler_fn(net, sigma_d, lab), noise, times, sigma_d, gen).cpu())
    return torch.cat(out)


def trigflow_search_grid(points: int = 40, sigma_d: float = 0.5, sigma_min: float = 0.002,
                         sigma_max: float = 80.0, rho: float = 7.0) -> list[float]:
    """Candidate times for `ternary_search_times`: the Karras noise levels (SPEC 1.2) as TrigFlow
    times `arctan(sigma / sigma_d)`, decreasing, `points` of them."""
    from fewstep.edm import karras_grid

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
