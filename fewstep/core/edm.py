"""EDM / VE: the noise process and parameterizations of the discrete-time CM family.

docs/math.md#edm-parameterization. `x_sigma = x0 + sigma n`, `n ~ N(0, I)`, `sigma in [eps, T]` (0.002, 80),
`sigma_data = 0.5`. The network `F` sees `c_in(sigma) x` and `c_noise(sigma) = ln(sigma) / 4`.
A diffusion denoiser is `D = c_skip x + c_out F`; a consistency model uses the same form with
coefficients that make `f(x, eps) = x` exactly. PF-ODE: `dx/dsigma = (x - D(x, sigma)) / sigma`.

Also the bridge to TrigFlow (docs/math.md#edm-to-trigflow): `sigma = sigma_d tan(t)`, `x_sigma = x_t / cos(t)`.
"""

from __future__ import annotations

from typing import Callable

import torch

from fewstep.core.trigflow import HALF_PI, SIGMA_D, expand_to

EPS = 0.002  # smallest noise level, the consistency boundary
T_MAX = 80.0  # largest noise level
RHO = 7.0

# A denoiser `D(x, sigma, labels) -> x0 estimate` (sigma: per-sample, shape (B,)).
Denoiser = Callable[..., torch.Tensor]
# A TrigFlow velocity `v(x_t, t, labels) -> dx_t/dt`.
Velocity = Callable[..., torch.Tensor]


def _per_sample(sigma, x: torch.Tensor) -> torch.Tensor:
    """A float or a (B,) tensor of noise levels as a (B,) tensor in `x`'s dtype and device."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma


# ---------------------------------------------------------------------------------------------
# Preconditioning (docs/math.md#edm-parameterization)

def edm_precond(sigma: torch.Tensor, sigma_data: float = SIGMA_D):
    """EDM's diffusion preconditioning: `(c_skip, c_out, c_in, c_noise)` at noise level sigma."""
    var = sigma.square() + sigma_data ** 2
    return sigma_data ** 2 / var, sigma * sigma_data / var.sqrt(), var.rsqrt(), sigma.log() / 4


def consistency_precond(sigma: torch.Tensor, sigma_data: float = SIGMA_D, eps: float = EPS):
    """The consistency model's coefficients (CM paper, Appendix C): boundary at `eps`.

    `c_skip(eps) = 1` and `c_out(eps) = 0` exactly, so `f(x, eps) = x` exactly.
    """
    var = sigma.square() + sigma_data ** 2
    c_skip = sigma_data ** 2 / ((sigma - eps).square() + sigma_data ** 2)
    c_out = sigma_data * (sigma - eps) / var.sqrt()
    return c_skip, c_out, var.rsqrt(), sigma.log() / 4


def _precond_apply(coeffs, net, x, labels):
    c_skip, c_out, c_in, c_noise = coeffs
    return expand_to(c_skip, x) * x + expand_to(c_out, x) * net(expand_to(c_in, x) * x, c_noise, labels)


def edm_denoiser(net, x: torch.Tensor, sigma, labels: torch.Tensor | None = None,
                 sigma_data: float = SIGMA_D) -> torch.Tensor:
    """`D(x, sigma) = c_skip x + c_out F(c_in x, ln(sigma) / 4)` (EDM, docs/math.md#edm-parameterization)."""
    return _precond_apply(edm_precond(_per_sample(sigma, x), sigma_data), net, x, labels)


def edm_consistency(net, x: torch.Tensor, sigma, labels: torch.Tensor | None = None,
                    sigma_data: float = SIGMA_D, eps: float = EPS) -> torch.Tensor:
    """Consistency function `f(x, sigma)` with the boundary condition `f(x, eps) = x`."""
    return _precond_apply(consistency_precond(_per_sample(sigma, x), sigma_data, eps), net, x, labels)


# ---------------------------------------------------------------------------------------------
# Time grids

def karras_grid(n: int, eps: float = EPS, T: float = T_MAX, rho: float = RHO,
                dtype=torch.float64) -> torch.Tensor:
    """Karras grid of docs/math.md#edm-parameterization, increasing, `n` points from eps to T:
    `t_i = (eps^(1/rho) + (i-1)/(n-1) (T^(1/rho) - eps^(1/rho)))^rho`."""
    if n < 2:
        raise ValueError(f"karras_grid needs n >= 2 points, got {n}")
    u = torch.linspace(0, 1, n, dtype=torch.float64)
    grid = (eps ** (1 / rho) + u * (T ** (1 / rho) - eps ** (1 / rho))) ** rho
    return grid.to(dtype)


def karras_sigmas(steps: int, sigma_min: float = EPS, sigma_max: float = T_MAX, rho: float = RHO,
                  dtype=torch.float64) -> torch.Tensor:
    """Sampling schedule: `steps` Karras noise levels from sigma_max down to sigma_min, then 0
    (`steps + 1` values; EDM's sampler, and k-diffusion's `get_sigmas_karras`)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if steps == 1:
        grid = torch.tensor([sigma_max], dtype=torch.float64)
    else:
        grid = karras_grid(steps, sigma_min, sigma_max, rho).flip(0)
    return torch.cat([grid, grid.new_zeros(1)]).to(dtype)


# ---------------------------------------------------------------------------------------------
# EDM <-> TrigFlow (docs/math.md#edm-to-trigflow)

# The conversion divides by cos(t); times are capped just below pi/2 (sigma ~ 5000 sigma_d) so
# that t = pi/2 (float32 pi/2 is slightly above it) gives a finite velocity.
T_CAP = HALF_PI - 1e-4


def edm_to_trigflow(denoiser: Denoiser, sigma_d: float = SIGMA_D, t_max: float = T_CAP) -> Velocity:
    """TrigFlow velocity of an EDM denoiser `D(x_sigma, sigma, labels)` (docs/math.md#edm-to-trigflow):

        v(x_t, t) = (cos(t) x_t - D(x_t / cos(t), sigma_d tan(t))) / sin(t),

    so that the TrigFlow consistency function `cos(t) x_t - sin(t) v` is exactly `D`.
    Valid for `0 < t <= pi/2`; `t` above `t_max` is evaluated at `t_max`.
    """

    def velocity(x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        t = _per_sample(t, x_t).clamp(max=t_max)
        cos, sin = expand_to(torch.cos(t), x_t), expand_to(torch.sin(t), x_t)
        return (cos * x_t - denoiser(x_t / cos, sigma_d * torch.tan(t), labels)) / sin

    return velocity


def trigflow_to_edm(velocity: Velocity, sigma_d: float = SIGMA_D) -> Denoiser:
    """The inverse map: an EDM denoiser from a TrigFlow velocity,
    `D(x_sigma, sigma) = cos(t) x_t - sin(t) v(x_t, t)` with `t = arctan(sigma / sigma_d)`,
    `x_t = cos(t) x_sigma`. Lets the EDM samplers run a TrigFlow model."""

    def denoiser(x: torch.Tensor, sigma, labels: torch.Tensor | None = None) -> torch.Tensor:
        t = torch.atan(_per_sample(sigma, x) / sigma_d)
        cos, sin = expand_to(torch.cos(t), x), expand_to(torch.sin(t), x)
        x_t = cos * x
        return cos * x_t - sin * velocity(x_t, t, labels)

    return denoiser

