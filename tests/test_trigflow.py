"""TrigFlow formulation (docs/math.md#trigflow), checked against closed forms and finite differences."""

from __future__ import annotations

import math

import pytest
import torch

from fewstep.networks import UNet
from fewstep.core.trigflow import (
    HALF_PI,
    consistency_from_velocity,
    lognormal_times,
    sigma_to_t,
    t_to_sigma,
    trigflow_consistency,
    trigflow_noise,
    trigflow_velocity,
)
from helpers import randomize_zero_params_, tiny_mlp, tiny_unet

SIGMA_D = 0.5






# ---------------------------------------------------------------------------------------------
# Noising and velocity


def test_noise_endpoints():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64)
    z = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64) * SIGMA_D
    # t = 0 gives the data exactly (cos 0 = 1, sin 0 = 0 are exact).
    assert torch.equal(trigflow_noise(x0, z, torch.zeros(5, dtype=torch.float64)), x0)
    # t = pi/2 gives the noise (cos(pi/2) is ~6e-17 in floating point, not exactly 0).
    x_half = trigflow_noise(x0, z, torch.full((5,), HALF_PI, dtype=torch.float64))
    torch.testing.assert_close(x_half, z, rtol=0, atol=1e-15)
    # Per-sample times broadcast per sample: compare with the per-sample formula.
    t = torch.tensor([0.0, 0.3, 0.7, 1.2, HALF_PI], dtype=torch.float64)
    x_t = trigflow_noise(x0, z, t)
    for i in range(5):
        expect = math.cos(t[i].item()) * x0[i] + math.sin(t[i].item()) * z[i]
        torch.testing.assert_close(x_t[i], expect, rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("shape", [(6, 2), (6, 3, 4, 4)])
def test_velocity_is_time_derivative_of_noising(shape):
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(shape, generator=g, dtype=torch.float64)
    z = torch.randn(shape, generator=g, dtype=torch.float64) * SIGMA_D
    t = torch.tensor([1e-3, 0.2, 0.5, 0.9, 1.3, HALF_PI - 1e-3], dtype=torch.float64)
    h = 1e-5
    fd = (trigflow_noise(x0, z, t + h) - trigflow_noise(x0, z, t - h)) / (2 * h)
    # Central difference error ~ h^2/6 |x'''| <= ~1e-10 here.
    torch.testing.assert_close(trigflow_velocity(x0, z, t), fd, rtol=0, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# Consistency function: boundary condition f(x, 0) = x exactly


@pytest.mark.parametrize("make", [tiny_unet, tiny_mlp], ids=["unet", "mlp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_consistency_boundary_is_exact(make, dtype):
    torch.manual_seed(0)
    net = randomize_zero_params_(make()).to(dtype)
    shape = (4, 2, 8, 8) if isinstance(net, UNet) else (4, 3)
    x = torch.randn(shape, dtype=dtype) * 3
    t0 = torch.zeros(4, dtype=dtype)
    with torch.no_grad():
        v = SIGMA_D * net(x / SIGMA_D, t0)
        assert v.abs().min() > 0  # the network output is not trivially zero
        f = trigflow_consistency(net, x, t0, SIGMA_D)
    assert torch.equal(f, x)
    # Away from t = 0 the network does contribute.
    with torch.no_grad():
        f1 = trigflow_consistency(net, x, torch.full((4,), 0.5, dtype=dtype), SIGMA_D)
    assert not torch.allclose(f1, math.cos(0.5) * x)


def test_consistency_from_velocity_formula():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 2, generator=g, dtype=torch.float64)
    v = torch.randn(4, 2, generator=g, dtype=torch.float64)
    t = torch.tensor([0.0, 0.4, 1.0, HALF_PI], dtype=torch.float64)
    f = consistency_from_velocity(x, t, v)
    expect = torch.cos(t)[:, None] * x - torch.sin(t)[:, None] * v
    torch.testing.assert_close(f, expect, rtol=0, atol=0)
    # With the conditional velocity, one DDIM step from any t lands exactly on the data:
    # cos t (cos t x0 + sin t z) - sin t (cos t z - sin t x0) = x0.
    x0 = torch.randn(4, 2, generator=g, dtype=torch.float64)
    z = torch.randn(4, 2, generator=g, dtype=torch.float64) * SIGMA_D
    f = consistency_from_velocity(trigflow_noise(x0, z, t), t, trigflow_velocity(x0, z, t))
    torch.testing.assert_close(f, x0, rtol=0, atol=1e-15)


# ---------------------------------------------------------------------------------------------
# Log-normal proposal and the sigma <-> t maps


@pytest.mark.parametrize("p_mean,p_std,sigma_d,dtype", [
    (-1.0, 1.4, 0.5, torch.float32),
    (-0.8, 1.6, 0.5, torch.float64),
    (0.3, 0.7, 1.0, torch.float64),
])
def test_lognormal_proposal_moments(p_mean, p_std, sigma_d, dtype):
    n = 200_000
    g = torch.Generator().manual_seed(3)
    t = lognormal_times(n, p_mean, p_std, sigma_d, dtype=dtype, generator=g)
    assert t.shape == (n,) and t.dtype == dtype
    assert (t > 0).all() and (t < HALF_PI).all()
    # log(sigma_d tan t) = tau ~ N(p_mean, p_std^2).
    tau = torch.log(sigma_d * torch.tan(t.double()))
    se_mean = p_std / math.sqrt(n)                  # standard error of the sample mean
    se_std = p_std / math.sqrt(2 * (n - 1))         # ... and of the sample std (Gaussian)
    assert abs(tau.mean().item() - p_mean) < 5 * se_mean
    assert abs(tau.std().item() - p_std) < 5 * se_std
    # Gaussian shape: standardized skewness ~ 0, kurtosis ~ 3 (SEs sqrt(6/n), sqrt(24/n)).
    u = (tau - tau.mean()) / tau.std()
    assert abs(u.pow(3).mean().item()) < 5 * math.sqrt(6 / n)
    assert abs(u.pow(4).mean().item() - 3) < 5 * math.sqrt(24 / n)
    # Median of sigma = sigma_d tan t is exp(p_mean).
    median_sigma = (sigma_d * torch.tan(t.double())).median().item()
    assert abs(math.log(median_sigma) - p_mean) < 0.02


def test_lognormal_proposal_generator_reproducible():
    a = lognormal_times(100, -1.0, 1.4, 0.5, generator=torch.Generator().manual_seed(7))
    b = lognormal_times(100, -1.0, 1.4, 0.5, generator=torch.Generator().manual_seed(7))
    c = lognormal_times(100, -1.0, 1.4, 0.5, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_sigma_t_maps_are_inverse():
    sig = torch.tensor([1e-3, 0.1, 0.5, 2.0, 80.0], dtype=torch.float64)
    t = sigma_to_t(sig, SIGMA_D)
    torch.testing.assert_close(t, torch.atan(sig / SIGMA_D))
    torch.testing.assert_close(t_to_sigma(t, SIGMA_D), sig, rtol=1e-12, atol=0)
    assert math.isclose(t_to_sigma(sigma_to_t(0.7, SIGMA_D), SIGMA_D), 0.7, rel_tol=1e-14)
    assert math.isclose(sigma_to_t(SIGMA_D, SIGMA_D), math.pi / 4, rel_tol=1e-15)


def test_edm_variance_matches_trigflow():
    # docs/math.md#trigflow: x_t / cos t = x0 + sigma_d tan(t) (z / sigma_d), i.e. EDM's x0 + sigma eps with
    # sigma = sigma_d tan t. Check that identity on the library's functions.
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(5, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(5, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([0.1, 0.4, 0.8, 1.2, 1.5], dtype=torch.float64)
    x_t = trigflow_noise(x0, SIGMA_D * eps, t)
    sigma = t_to_sigma(t, SIGMA_D)
    torch.testing.assert_close(x_t / torch.cos(t)[:, None], x0 + sigma[:, None] * eps, rtol=1e-13, atol=1e-13)
