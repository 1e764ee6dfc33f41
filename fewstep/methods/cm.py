"""Discrete-time consistency models in the EDM / VE formulation (docs/math.md#cm-ct-and-ict): CD, CT and iCT.

The network is read through the consistency parameterization of `fewstep.core.edm`
(`f(x, sigma) = c_skip x + c_out F(c_in x, ln(sigma) / 4)`, exactly `x` at sigma = eps). Each
objective compares `f_theta` at the noisier of two neighbouring Karras noise levels with a
target `f_theta^-` at the other:

- `CD` (Algorithm 2): the neighbour is one ODE step of a diffusion teacher (Euler or Heun);
  `theta^-` is an EMA of theta with rate `mu`; N fixed (paper: 18, Heun).
- `CT` (Algorithm 3): the neighbour is the same `x0` with the same noise `z`; N and the target
  rate grow with training (`ct_num_scales`, `ct_target_decay`).
- `ICT` (improved CT): `theta^- = stopgrad(theta)`, pseudo-Huber metric, weighting
  `1 / (sigma_{n+1} - sigma_n)`, noise levels drawn from a discretized log-normal, an
  exponential curriculum for N.

The online and the target evaluation draw the same dropout masks (the RNG is replayed, as in the
official code), so that they differ only by their inputs and weights. Objectives with an EMA
target hold it themselves (`target`); the training loop calls `after_step(net, step)` after each
optimizer step and checkpoints `state_tensors()`.

Sampling is Algorithm 1 in the VE formulation (`sampler`, `fewstep.core.samplers.VEConsistencySampler`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import InitVar, dataclass, field
from typing import Callable

import torch

from fewstep.core.edm import EPS, RHO, T_MAX, edm_consistency, karras_grid
from fewstep.methods.base import Method, register_method
from fewstep.methods.common import check_choice, check_range, same_random_draws
from fewstep.core.trigflow import SIGMA_D, expand_to
from fewstep.networks.contract import network_info

METRICS = ("l2", "l1", "pseudo_huber", "lpips")


# ---------------------------------------------------------------------------------------------
# Schedules (docs/math.md#consistency-training, 3.3)


def ct_num_scales(step: int, total_steps: int, s0: int = 2, s1: int = 150) -> int:
    """CT's discretization curriculum `N(k) = ceil(sqrt(k/K ((s1 + 1)^2 - s0^2) + s0^2) - 1) + 1`."""
    k, K = step, max(total_steps, 1)
    return math.ceil(math.sqrt(min(k, K) / K * ((s1 + 1) ** 2 - s0 ** 2) + s0 ** 2) - 1) + 1


def ct_target_decay(num_scales: int, s0: int = 2, mu0: float = 0.9) -> float:
    """CT's target EMA rate `mu(k) = exp(s0 ln(mu0) / N(k))`."""
    return math.exp(s0 * math.log(mu0) / num_scales)


def ict_num_scales(step: int, total_steps: int, s0: int = 10, s1: int = 1280) -> int:
    """iCT's exponential curriculum `N(k) = min(s0 2^floor(k / K'), s1) + 1`,
    `K' = floor(K / (log2(floor(s1 / s0)) + 1))`."""
    k_prime = max(1, math.floor(total_steps / (math.log2(math.floor(s1 / s0)) + 1)))
    return min(s0 * 2 ** (step // k_prime), s1) + 1


def lognormal_index_probs(sigmas: torch.Tensor, p_mean: float = -1.1, p_std: float = 2.0) -> torch.Tensor:
    """iCT's discretized log-normal over the N - 1 intervals of an increasing grid:
    `p(n) ~ erf((ln s_{n+1} - P_mean) / (sqrt 2 P_std)) - erf((ln s_n - P_mean) / (sqrt 2 P_std))`."""
    cdf = torch.erf((sigmas.double().log() - p_mean) / (math.sqrt(2) * p_std))
    p = cdf[1:] - cdf[:-1]
    return p / p.sum()


# ---------------------------------------------------------------------------------------------
# Metrics d(x, y) (docs/math.md#metrics), per sample


def pseudo_huber_c(dim: int) -> float:
    """iCT's constant `c = 0.00054 sqrt(D)`."""
    return 0.00054 * math.sqrt(dim)


def cm_distance(a: torch.Tensor, b: torch.Tensor, metric: str = "l2", c: float | None = None) -> torch.Tensor:
    """Per-sample distance: 'l2' (mean squared error), 'l1' (mean absolute error), 'pseudo_huber'
    (`sqrt(||a - b||^2 + c^2) - c`, default c of iCT). LPIPS needs pretrained ImageNet weights that
    fewstep does not ship; it is refused with a clear error."""
    diff = (a - b).flatten(1).float() if a.dtype in (torch.float16, torch.bfloat16) else (a - b).flatten(1)
    if metric == "l2":
        return diff.square().mean(1)
    if metric == "l1":
        return diff.abs().mean(1)
    if metric == "pseudo_huber":
        c = pseudo_huber_c(diff.shape[1]) if c is None else c
        return (diff.square().sum(1) + c * c).sqrt() - c
    if metric == "lpips":
        raise ValueError("method.metric 'lpips' needs pretrained VGG/AlexNet weights that cannot be fetched "
                         "here; use 'pseudo_huber' (iCT's choice), 'l2' or 'l1'")
    raise ValueError(f"method.metric must be one of {METRICS}, got {metric!r}")


# ---------------------------------------------------------------------------------------------
# The shared machinery


def _draw_pair(sigmas: torch.Tensor, like: torch.Tensor, probs: torch.Tensor | None = None):
    """Indices n (of the lower level) and the levels (sigma_n, sigma_{n+1}) for a batch like `like`
    (its size, device and dtype), n uniform or from `probs`."""
    n, device = like.shape[0], like.device
    if probs is None:
        idx = torch.randint(0, len(sigmas) - 1, (n,), device=device)
    else:
        idx = torch.multinomial(probs.to(device), n, replacement=True)
    s = sigmas.to(device=device, dtype=like.dtype)
    return idx, s[idx], s[idx + 1]


@dataclass
class _DiscreteCM(Method):
    sigma_data: float = SIGMA_D
    eps: float = EPS
    sigma_max: float = T_MAX
    rho: float = RHO
    metric: str = "l2"
    huber_c: float | None = None  # pseudo-Huber c (default 0.00054 sqrt(D))
    total_steps: int = 0  # the run length the curricula are laid out over (0: the run's train.steps)

    def _check(self):
        check_range("method.sigma_data", self.sigma_data, 0, low_open=True)
        check_range("method.eps", self.eps, 0, low_open=True)
        check_range("method.sigma_max", self.sigma_max, self.eps, low_open=True)
        check_choice("method.metric", self.metric, METRICS)
        check_range("method.total_steps", self.total_steps, 0)
        if self.metric == "lpips":
            cm_distance(torch.zeros(1, 1), torch.zeros(1, 1), "lpips")

    parameterization = "edm"

    @property
    def sigma_d(self) -> float:
        return self.sigma_data

    def setup(self, net, total_steps: int) -> None:
        if self.total_steps == 0:
            self.total_steps = total_steps  # curricula (CT, iCT) are laid out over the whole run

    def sampler(self, net, step=None):
        """CM paper Algorithm 1 in the VE formulation (`fewstep.core.samplers.VEConsistencySampler`)."""
        from fewstep.core.samplers import VEConsistencySampler

        return VEConsistencySampler(net, self.sigma_data, eps=self.eps, sigma_max=self.sigma_max)

    def grid(self, num_scales: int) -> torch.Tensor:
        """The N Karras noise levels, increasing, in float64."""
        return karras_grid(num_scales, self.eps, self.sigma_max, self.rho)

    def f(self, net, x, sigma, labels):
        return edm_consistency(net, x, sigma, labels, self.sigma_data, self.eps)

    def pred_and_target(self, net, target_net, x_hi, s_hi, x_lo, s_lo, labels):
        """`f_theta(x_hi, s_hi)` (graded) and the target `f_theta^-(x_lo, s_lo)` (no graph), both
        evaluated with the same dropout masks: the RNG is replayed for the target pass."""
        with same_random_draws(x_hi):
            pred = self.f(net, x_hi, s_hi, labels)
        with torch.no_grad():
            target = self.f(target_net, x_lo, s_lo, labels)
        return pred, target

    def _loss(self, pred, target, weight, n_scales):
        dist = cm_distance(pred, target.to(pred.dtype), self.metric, self.huber_c)
        return weight * dist, {"distance": dist.detach().mean(), "num_scales": torch.tensor(float(n_scales))}


class _EMATarget:
    """theta^-: an EMA copy of the network, created at the first call; it follows the network's
    train/eval mode, so that both draw the same dropout masks."""

    target: torch.nn.Module | None

    def _target(self, net):
        if self.target is None:
            self.target = copy.deepcopy(net).requires_grad_(False)
        return self.target.train(net.training)

    @torch.no_grad()
    def _ema(self, net, mu: float) -> None:
        target = self._target(net)
        torch._foreach_lerp_(list(target.parameters()), [p.detach() for p in net.parameters()], 1.0 - mu)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {} if self.target is None else dict(self.target.state_dict())

    def load_state_tensors(self, net, tensors: dict[str, torch.Tensor]) -> None:
        if tensors:
            self._target(net).load_state_dict(tensors)

    def extra_networks(self, net) -> dict[str, torch.nn.Module]:
        return {"target": self._target(net)}

    def after_step(self, net, step: int) -> bool:
        self._ema(net, self.target_decay(step))
        return False


# ---------------------------------------------------------------------------------------------
# The objectives


@register_method("ct")
@dataclass
class CT(_EMATarget, _DiscreteCM):
    """Consistency training (CM paper, Algorithm 3), docs/math.md#consistency-training."""

    s0: int = 2
    s1: int = 150
    mu0: float = 0.9
    target: torch.nn.Module | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        self._check()
        check_range("method.s0", self.s0, 2)
        check_range("method.s1", self.s1, self.s0)
        check_range("method.mu0", self.mu0, 0, 1)

    def num_scales(self, step: int) -> int:
        return ct_num_scales(step, self.total_steps, self.s0, self.s1)

    def __call__(self, net, x0: torch.Tensor, labels: torch.Tensor | None = None, step: int = 0):
        N = self.num_scales(step)
        _, s_lo, s_hi = _draw_pair(self.grid(N), x0)
        z = torch.randn_like(x0)
        pred, target = self.pred_and_target(net, self._target(net), x0 + expand_to(s_hi, x0) * z, s_hi,
                                            x0 + expand_to(s_lo, x0) * z, s_lo, labels)
        return self._loss(pred, target, torch.ones_like(s_hi), N)

    def target_decay(self, step: int) -> float:
        return ct_target_decay(self.num_scales(step), self.s0, self.mu0)


@register_method("ict")
@dataclass
class ICT(_DiscreteCM):
    """Improved consistency training (Song & Dhariwal 2023), docs/math.md#improved-consistency-training: no EMA target."""

    metric: str = "pseudo_huber"
    s0: int = 10
    s1: int = 1280
    p_mean: float = -1.1
    p_std: float = 2.0

    def __post_init__(self):
        self._check()
        check_range("method.s0", self.s0, 1)
        check_range("method.s1", self.s1, self.s0)
        check_range("method.p_std", self.p_std, 0, low_open=True)

    def num_scales(self, step: int) -> int:
        return ict_num_scales(step, self.total_steps, self.s0, self.s1)

    def __call__(self, net, x0: torch.Tensor, labels: torch.Tensor | None = None, step: int = 0):
        N = self.num_scales(step)
        sigmas = self.grid(N)
        _, s_lo, s_hi = _draw_pair(sigmas, x0, lognormal_index_probs(sigmas, self.p_mean, self.p_std))
        z = torch.randn_like(x0)
        # theta^- = stopgrad(theta): the same network, its target pass without a graph
        pred, target = self.pred_and_target(net, net, x0 + expand_to(s_hi, x0) * z, s_hi,
                                            x0 + expand_to(s_lo, x0) * z, s_lo, labels)
        return self._loss(pred, target, 1.0 / (s_hi - s_lo), N)


def make_teacher_denoiser(net, formulation: str = "edm", sigma_data: float = SIGMA_D,
                          guidance: float = 1.0, null_label: int | None = None) -> Callable:
    """A frozen diffusion teacher as an EDM denoiser `D(x, sigma, labels)` (no gradients):
    an EDM network directly, a TrigFlow velocity network through `trigflow_to_edm`;
    classifier-free guided when `guidance != 1`."""
    from fewstep.core.edm import trigflow_to_edm
    from fewstep.core.ode import edm_net_denoiser, guided, trigflow_net_velocity

    check_choice("formulation", formulation, ("edm", "trigflow"))
    if hasattr(net, "eval"):
        net.eval()
    model = (edm_net_denoiser(net, sigma_data) if formulation == "edm"
             else trigflow_to_edm(trigflow_net_velocity(net, sigma_data), sigma_data))
    if null_label is None:
        null_label = network_info(net).num_classes or None

    @torch.no_grad()
    def denoiser(x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return guided(model, labels, guidance, null_label)(x, sigma)

    return denoiser


@register_method("cd")
@dataclass
class CD(_EMATarget, _DiscreteCM):
    """Consistency distillation (CM paper, Algorithm 2), docs/math.md#consistency-distillation. `teacher`: an EDM denoiser
    `D(x, sigma, labels)` (see `make_teacher_denoiser`), given at construction."""

    teacher: InitVar[Callable | None] = None
    num_scales_fixed: int = 18  # N (paper best: 18 with Heun)
    mu: float = 0.95  # target EMA rate (paper: 0 on CIFAR-10, 0.95 on ImageNet 64)
    solver: str = "heun"
    target: torch.nn.Module | None = field(default=None, init=False, repr=False)

    def __post_init__(self, teacher):
        self.teacher = teacher
        self._check()
        check_range("method.num_scales_fixed", self.num_scales_fixed, 2)
        check_range("method.mu", self.mu, 0, 1)
        check_choice("method.solver", self.solver, ("euler", "heun"))

    @torch.no_grad()
    def teacher_step(self, x: torch.Tensor, s_hi: torch.Tensor, s_lo: torch.Tensor, labels=None) -> torch.Tensor:
        """One PF-ODE step `dx/dsigma = (x - D(x, sigma)) / sigma` from s_hi down to s_lo."""
        if self.teacher is None:
            raise ValueError("CD needs a teacher: CD(teacher=make_teacher_denoiser(net, ...)) or --teacher CKPT")
        d = (x - self.teacher(x, s_hi, labels)) / expand_to(s_hi, x)
        x_lo = x + expand_to(s_lo - s_hi, x) * d
        if self.solver == "heun":
            d_lo = (x_lo - self.teacher(x_lo, s_lo, labels)) / expand_to(s_lo, x)
            x_lo = x + expand_to(s_lo - s_hi, x) * 0.5 * (d + d_lo)
        return x_lo

    def __call__(self, net, x0: torch.Tensor, labels: torch.Tensor | None = None, step: int = 0):
        N = self.num_scales_fixed
        _, s_lo, s_hi = _draw_pair(self.grid(N), x0)
        x_hi = x0 + expand_to(s_hi, x0) * torch.randn_like(x0)
        x_lo = self.teacher_step(x_hi, s_hi, s_lo, labels).to(x0.dtype)
        pred, target = self.pred_and_target(net, self._target(net), x_hi, s_hi, x_lo, s_lo, labels)
        return self._loss(pred, target, torch.ones_like(s_hi), N)

    takes_teacher = True

    def set_teacher(self, net, formulation: str = "trigflow") -> None:
        """Discrete-time distillation steps the teacher's ODE in sigma: its EDM denoiser."""
        self.teacher = make_teacher_denoiser(net.requires_grad_(False), formulation, self.sigma_data)

    def target_decay(self, step: int) -> float:
        return self.mu
