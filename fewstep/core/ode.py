"""Probability-flow ODE samplers (k-diffusion style): plain functions with one signature,

    x, nfe = sample_<name>(ode, x, times)

`ode` holds the model and names the formulation, `times` runs from noise to data in that
formulation's own time variable (ending at 0), `x` is the state at `times[0]`, and `nfe`
counts calls of the model (a CFG-guided call counts once, though it runs the network on a
doubled batch). A new sampler is a new function; nothing else changes.

- `TrigFlowODE(velocity, sigma_d)`: times t from pi/2 down to 0, `dx/dt = velocity(x, t)`.
- `EDMODE(denoiser)`: noise levels sigma from sigma_max down to 0,
  `dx/dsigma = (x - D(x, sigma)) / sigma`.

Both expose the same four things: `derivative(x, s)`, `denoise(x, s)` (the x0 prediction,
used by the multistep solver), `alpha_sigma(s)` (with `x_s = alpha x0 + sigma n`,
`n ~ N(0, I)`) and `times(steps)` (the default Karras schedule). The models they hold take
`(x, s)` with `s` a per-sample (B,) tensor; bind labels and guidance with `guided`.

`ODESampler` is the sampler object of diffusion models (`method.sampler(net)`): it builds the
guided ODE of a network and runs a named solver on its default schedule.

Example (class-conditional TrigFlow teacher, Heun with 18 steps = 35 NFE, CFG 2):

    ode = TrigFlowODE(guided(trigflow_net_velocity(net, 0.5), labels, 2.0, net.num_classes), 0.5)
    x, nfe = solve(ode, torch.randn(16, 3, 32, 32), steps=18, sampler="heun")
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from fewstep.core.edm import EPS, RHO, T_MAX, edm_denoiser, karras_sigmas
from fewstep.core.samplers import Sampler, Schedule
from fewstep.core.trigflow import HALF_PI, SIGMA_D, consistency_from_velocity, expand_to, net_velocity

# ---------------------------------------------------------------------------------------------
# Classifier-free guidance


def cfg_combine(uncond: torch.Tensor, cond: torch.Tensor, guidance) -> torch.Tensor:
    """`uncond + w (cond - uncond)`: w = 1 is the conditional model, w = 0 the unconditional.
    `w` is a float or a per-sample (B,) tensor."""
    if isinstance(guidance, torch.Tensor) and guidance.ndim == 1:
        guidance = expand_to(guidance.to(cond.dtype), cond)
    return uncond + guidance * (cond - uncond)


def guided(model: Callable, labels: torch.Tensor | None = None, guidance=1.0,
           null_label: int | None = None) -> Callable:
    """Bind labels to `model(x, s, labels)`, with classifier-free guidance: returns `fn(x, s)`.

    The output (velocity, denoiser or anything linear in the model) is
    `model(x, s, null) + w (model(x, s, labels) - model(x, s, null))`. With `null_label`
    (the networks' null index is `net.num_classes`) the two evaluations share one batched
    call; without it the unconditional one passes `labels=None` (all-null for fewstep nets).
    `w = 1` or `labels=None` costs a single conditional call. `guidance` may be a per-sample
    (B,) tensor (sCD with a guidance-conditioned student draws one scale per sample).
    """
    if labels is None or (not isinstance(guidance, torch.Tensor) and guidance == 1.0):
        return lambda x, s: model(x, s, labels)

    def fn(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        if null_label is None:
            return cfg_combine(model(x, s, None), model(x, s, labels), guidance)
        both = model(torch.cat([x, x]), torch.cat([s, s]),
                     torch.cat([labels, torch.full_like(labels, null_label)]))
        cond, uncond = both.chunk(2)
        return cfg_combine(uncond, cond, guidance)

    return fn


def guided_text(model: Callable, cond: dict, null_cond: dict, guidance=1.0) -> Callable:
    """Bind text cond (the network contract's `text`, `text_mask`) to `model(x, s, labels, **cond)`,
    guided against the empty prompt (docs/math.md#text-guidance): returns `fn(x, s)` with output
    `model(x, s, null) + w (model(x, s, cond) - model(x, s, null))`, both halves in one batched call.
    `w` is a float or a per-sample (B,) tensor; `w = 1` costs a single conditional call."""
    if not isinstance(guidance, torch.Tensor) and guidance == 1.0:
        return lambda x, s: model(x, s, None, **cond)
    both_cond = {k: torch.cat([cond[k], null_cond[k].to(cond[k].dtype)]) for k in cond}

    def fn(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        both = model(torch.cat([x, x]), torch.cat([s, s]), None, **both_cond)
        c, u = both.chunk(2)
        return cfg_combine(u, c, guidance)

    return fn


def trigflow_net_velocity(net, sigma_d: float = SIGMA_D) -> Callable:
    """`(x_t, t, labels, **cond) -> sigma_d F(x_t / sigma_d, t, labels, **cond)` for a TrigFlow network
    (`fewstep.core.trigflow.net_velocity` with the network bound)."""
    return lambda x_t, t, labels=None, **cond: net_velocity(net, x_t, t, sigma_d, labels, **cond)


def edm_net_denoiser(net, sigma_data: float = SIGMA_D) -> Callable:
    """`(x, sigma, labels) -> D(x, sigma)` for an EDM-preconditioned network."""
    return partial(edm_denoiser, net, sigma_data=sigma_data)


# ---------------------------------------------------------------------------------------------
# Formulations


def trigflow_times(steps: int, sigma_d: float = SIGMA_D, sigma_min: float = EPS,
                   sigma_max: float = T_MAX, rho: float = RHO) -> torch.Tensor:
    """The Karras schedule in TrigFlow time, `t = arctan(sigma / sigma_d)`, starting at pi/2
    (the exact prior `N(0, sigma_d^2 I)`) and ending at 0: `steps + 1` values."""
    times = torch.atan(karras_sigmas(steps, sigma_min, sigma_max, rho) / sigma_d)
    times[0] = HALF_PI
    return times


@dataclass(frozen=True)
class TrigFlowODE:
    """`dx_t/dt = v(x_t, t)` for t from pi/2 to 0; `x_t = cos(t) x0 + sin(t) sigma_d n`."""

    velocity: Callable  # (x_t, t) -> v
    sigma_d: float = SIGMA_D

    def derivative(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.velocity(x, t)

    def denoise(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return consistency_from_velocity(x, t, self.velocity(x, t))

    def alpha_sigma(self, t: float) -> tuple[float, float]:
        t = min(t, HALF_PI)  # float32 pi/2 lies above pi/2, where cos(t) < 0
        return math.cos(t), self.sigma_d * math.sin(t)

    def times(self, steps: int, **kw) -> torch.Tensor:
        return trigflow_times(steps, self.sigma_d, **kw)


@dataclass(frozen=True)
class EDMODE:
    """`dx/dsigma = (x - D(x, sigma)) / sigma` for sigma from sigma_max to 0; `x = x0 + sigma n`."""

    denoiser: Callable  # (x, sigma) -> D

    def derivative(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return (x - self.denoiser(x, sigma)) / expand_to(sigma, x)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.denoiser(x, sigma)

    def alpha_sigma(self, sigma: float) -> tuple[float, float]:
        return 1.0, sigma

    def times(self, steps: int, **kw) -> torch.Tensor:
        return karras_sigmas(steps, **kw)


# ---------------------------------------------------------------------------------------------
# Samplers: `x, nfe = sample_<name>(ode, x, times)`


def _floats(times) -> list[float]:
    return [float(s) for s in times]


def _full(x: torch.Tensor, s: float) -> torch.Tensor:
    return torch.full((x.shape[0],), s, dtype=x.dtype, device=x.device)


@torch.no_grad()
def sample_euler(ode, x: torch.Tensor, times) -> tuple[torch.Tensor, int]:
    """Explicit Euler: first order, one NFE per step."""
    times, nfe = _floats(times), 0
    for s, s_next in zip(times[:-1], times[1:]):
        x = x + (s_next - s) * ode.derivative(x, _full(x, s))
        nfe += 1
    return x, nfe


@torch.no_grad()
def sample_heun(ode, x: torch.Tensor, times) -> tuple[torch.Tensor, int]:
    """EDM's deterministic sampler (Karras et al. 2022, Algorithm 1): Heun's second-order
    method, with an Euler last step when it lands on 0. `2 steps - 1` NFE on a schedule ending at 0."""
    times, nfe = _floats(times), 0
    for s, s_next in zip(times[:-1], times[1:]):
        d = ode.derivative(x, _full(x, s))
        x_next = x + (s_next - s) * d
        nfe += 1
        if s_next != 0:
            d_next = ode.derivative(x_next, _full(x, s_next))
            x_next = x + (s_next - s) * 0.5 * (d + d_next)
            nfe += 1
        x = x_next
    return x, nfe


@torch.no_grad()
def sample_dpmpp_2m(ode, x: torch.Tensor, times) -> tuple[torch.Tensor, int]:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): multistep, second order in the
    log-SNR `lambda = log(alpha / sigma)`, one NFE per step. The first step is first order
    (DDIM); a step that lands on sigma = 0 returns the current x0 prediction."""
    times, nfe = _floats(times), 0
    old_denoised, h_last = None, None
    for s, s_next in zip(times[:-1], times[1:]):
        denoised = ode.denoise(x, _full(x, s))
        nfe += 1
        alpha, sigma = ode.alpha_sigma(s)
        alpha_next, sigma_next = ode.alpha_sigma(s_next)
        if sigma_next == 0:
            x = alpha_next * denoised
            continue
        h = math.log(alpha_next / sigma_next) - math.log(alpha / sigma)
        if old_denoised is None:
            d = denoised
        else:
            r = h_last / h
            d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        x = (sigma_next / sigma) * x - alpha_next * math.expm1(-h) * d
        old_denoised, h_last = denoised, h
    return x, nfe


@torch.no_grad()
def sample_ddim(ode, x: torch.Tensor, times) -> tuple[torch.Tensor, int]:
    """DDIM (Song et al. 2021), deterministic: `x_next = alpha' x0_hat + sigma' n_hat` with
    `n_hat = (x - alpha x0_hat) / sigma`; first order, exact when the x0 prediction is constant
    along the path. One NFE per step. The sampler of progressive-distillation students."""
    times, nfe = _floats(times), 0
    for s, s_next in zip(times[:-1], times[1:]):
        denoised = ode.denoise(x, _full(x, s))
        nfe += 1
        alpha, sigma = ode.alpha_sigma(s)
        alpha_next, sigma_next = ode.alpha_sigma(s_next)
        x = alpha_next * denoised if sigma_next == 0 else alpha_next * denoised + sigma_next * (x - alpha * denoised) / sigma
    return x, nfe


SAMPLERS = {"euler": sample_euler, "heun": sample_heun, "dpmpp_2m": sample_dpmpp_2m, "ddim": sample_ddim}


def solve(ode, noise: torch.Tensor, steps: int, sampler: str = "heun", times=None):
    """Sample from unit Gaussian `noise`: scale it to `times[0]` (default: `ode.times(steps)`)
    and run the named sampler. Returns `(x, nfe)`."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {sampler!r}")
    times = ode.times(steps) if times is None else times
    x = ode.alpha_sigma(float(times[0]))[1] * noise
    return SAMPLERS[sampler](ode, x, times)


# ---------------------------------------------------------------------------------------------
# The sampler object of diffusion models

DEFAULT_ODE_STEPS = 18  # EDM's CIFAR-10 setting: 35 NFE with Heun


@dataclass(frozen=True)
class ODESampler(Sampler):
    """A probability-flow ODE solver for a diffusion network (`fewstep.core.samplers` has the
    interface), with classifier-free guidance through the null label `num_classes`.

    `formulation` 'trigflow' reads the network as a TrigFlow velocity, 'edm' as an EDM denoiser.
    `solver` and `steps` are the defaults; `grid` 'karras' is the formulation's Karras schedule,
    'uniform' the uniform grid in t from pi/2 to 0 (what a progressive-distillation student learned)."""

    net: torch.nn.Module
    sigma_d: float = SIGMA_D
    formulation: str = "trigflow"
    num_classes: int = 0
    solver: str = "heun"
    steps: int = DEFAULT_ODE_STEPS
    grid: str = "karras"

    def __post_init__(self):
        if self.formulation not in ("trigflow", "edm"):
            raise ValueError(f"formulation must be 'trigflow' or 'edm', got {self.formulation!r}")
        if self.grid not in ("karras", "uniform") or (self.grid == "uniform" and self.formulation != "trigflow"):
            raise ValueError(f"grid must be 'karras', or 'uniform' for a TrigFlow model, got {self.grid!r}")
        self._check_solver(self.solver)

    @staticmethod
    def _check_solver(name) -> None:
        if name not in SAMPLERS:
            raise ValueError(f"--sampler must be among {', '.join(SAMPLERS)} for a diffusion model, got {name!r}")

    def ode(self, labels: torch.Tensor | None = None, guidance=1.0):
        """The guided probability-flow ODE of the network."""
        null = self.num_classes or None
        if self.formulation == "edm":
            return EDMODE(guided(edm_net_denoiser(self.net, self.sigma_d), labels, guidance, null))
        return TrigFlowODE(guided(trigflow_net_velocity(self.net, self.sigma_d), labels, guidance, null), self.sigma_d)

    def times(self, steps: int) -> torch.Tensor | None:
        """The solver's grid (None: the formulation's Karras schedule)."""
        return torch.linspace(HALF_PI, 0, steps + 1, dtype=torch.float64) if self.grid == "uniform" else None

    def schedules(self, steps=None, nfe=None, samplers=None) -> list[Schedule]:
        """Each solver (default: this sampler's) at each step count, or at the steps that give each
        NFE (Heun: NFE = 2 steps - 1, so NFE must be odd; Euler, DPM-Solver++(2M), DDIM: NFE = steps)."""
        if steps is not None and nfe is not None:
            raise ValueError("give --steps or --nfe, not both")
        samplers = samplers or [self.solver]
        for s in samplers:
            self._check_solver(s)
        rows = []
        for s in samplers:
            if nfe is None:
                rows += [Schedule(s, k) for k in (steps or [self.steps])]
                continue
            for n in nfe:
                if s == "heun" and n % 2 == 0:
                    raise ValueError(f"heun takes 2 steps - 1 NFE, so --nfe must be odd for it, got {n}")
                rows.append(Schedule(s, (n + 1) // 2 if s == "heun" else n))
        return rows

    def schedule(self, steps=None, times=None, sampler=None) -> Schedule:
        if times is not None:
            raise ValueError("times are for consistency models; a diffusion model takes steps and a sampler")
        return self.schedules([steps] if steps else None, samplers=[sampler] if sampler else None)[0]

    def preview_schedules(self, times=None) -> list[Schedule]:
        return self.schedules()

    def nfe(self, schedule: Schedule) -> int:
        return 2 * schedule.steps - 1 if schedule.sampler == "heun" else schedule.steps  # grids end at 0

    takes_cond = True

    @torch.no_grad()
    def sample(self, noise, schedule, labels=None, guidance=1.0, generator=None, cond: dict | None = None,
               null_cond: dict | None = None) -> torch.Tensor:
        """Deterministic: the generator is unused. `cond` / `null_cond`: a text-to-image model's text
        cond and the empty prompt's, guided as `v_u + w (v_c - v_u)` (TrigFlow formulation)."""
        if cond:
            if self.formulation != "trigflow" or null_cond is None:
                raise ValueError("text cond needs a TrigFlow diffusion model and the empty prompt's cond")
            ode = TrigFlowODE(guided_text(trigflow_net_velocity(self.net, self.sigma_d), cond, null_cond, guidance),
                              self.sigma_d)
        else:
            ode = self.ode(labels, guidance)
        return solve(ode, noise, schedule.steps, schedule.sampler, times=self.times(schedule.steps))[0]
