"""TrigFlow: the noise process and parameterization of continuous-time consistency models.

docs/math.md#the-network-contract. Data `x0` (per-dim std ~ sigma_d), noise `z ~ N(0, sigma_d^2 I)`,
`x_t = cos(t) x0 + sin(t) z` for `t in [0, pi/2]`. The network `F` sees `x_t / sigma_d` and
`c_noise(t) = t` (the identity time transform: `sin(t) d c_noise/dt` stays bounded): the network
contract is `F(x_t / sigma_d, t, labels, **cond)`; `net_velocity` turns it into a velocity.
"""

from __future__ import annotations

import math

import torch

HALF_PI = math.pi / 2
SIGMA_D = 0.5  # the per-dimension data std TrigFlow's parameterization assumes; the default everywhere


def expand_to(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-sample (B,) tensor (times, noise levels, weights) reshaped to (B, 1, ..., 1), so that
    it broadcasts against `x` of shape (B, ...)."""
    return t.reshape(-1, *([1] * (x.ndim - 1)))


def trigflow_noise(x0: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """`x_t = cos(t) x0 + sin(t) z`; `z` is already scaled by sigma_d."""
    t = expand_to(t, x0)
    return torch.cos(t) * x0 + torch.sin(t) * z


def trigflow_velocity(x0: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Conditional velocity `dx_t/dt = cos(t) z - sin(t) x0` (the flow-matching target)."""
    t = expand_to(t, x0)
    return torch.cos(t) * z - torch.sin(t) * x0


def net_velocity(net, x_t: torch.Tensor, t: torch.Tensor, sigma_d: float, labels=None, **cond) -> torch.Tensor:
    """The TrigFlow velocity of a network, `v = sigma_d F(x_t / sigma_d, t, labels, **cond)` (docs/math.md#the-network-contract).

    `cond`: extra keyword inputs, e.g. `guidance` (the CFG scale of a student that takes it as
    input); a keyword whose value is None is left out, so `guidance=None` suits any network.
    """
    cond = {k: v for k, v in cond.items() if v is not None}
    return sigma_d * net(x_t / sigma_d, t, labels, **cond)


def consistency_from_velocity(x_t, t, v) -> torch.Tensor:
    """First-order DDIM step from t to 0: `f = cos(t) x_t - sin(t) v`. Exactly `x_t` at t = 0."""
    t = expand_to(t, x_t)
    return torch.cos(t) * x_t - torch.sin(t) * v


def trigflow_consistency(net, x_t, t, sigma_d: float, labels=None, guidance=None, **cond) -> torch.Tensor:
    """Consistency function `f(x_t, t) = cos(t) x_t - sin(t) sigma_d F(x_t / sigma_d, t)`."""
    return consistency_from_velocity(x_t, t, net_velocity(net, x_t, t, sigma_d, labels, guidance=guidance, **cond))


def time_dtype(x: torch.Tensor) -> torch.dtype:
    """Times are drawn in float32, or in float64 for float64 data (never in fp16/bf16: t near
    pi/2 needs the resolution)."""
    return torch.promote_types(x.dtype, torch.float32)


def lognormal_times(n: int, p_mean: float, p_std: float, sigma_d: float, device=None,
                    dtype=torch.float32, generator=None) -> torch.Tensor:
    """The log-normal proposal: `tau ~ N(P_mean, P_std^2)`, `t = arctan(exp(tau) / sigma_d)`."""
    tau = torch.randn(n, device=device, dtype=dtype, generator=generator) * p_std + p_mean
    return torch.atan(torch.exp(tau) / sigma_d)


def sigma_to_t(sigma, sigma_d: float):
    """EDM noise level to TrigFlow time: `t = arctan(sigma / sigma_d)`."""
    if isinstance(sigma, torch.Tensor):
        return torch.atan(sigma / sigma_d)
    return math.atan(sigma / sigma_d)


def t_to_sigma(t, sigma_d: float):
    """TrigFlow time to EDM noise level: `sigma = sigma_d tan(t)`."""
    if isinstance(t, torch.Tensor):
        return sigma_d * torch.tan(t)
    return sigma_d * math.tan(t)
