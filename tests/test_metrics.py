"""Tests for fewstep.metrics, each against math (closed forms or plainly written formulas)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fewstep.metrics import energy_distance, mmd, sliced_wasserstein

F64 = torch.float64


def _gauss(n: int, mean, std: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mean = torch.as_tensor(mean, dtype=F64)
    return torch.randn(n, mean.numel(), generator=g, dtype=F64) * std + mean


def _normal_abs_mean(d: float, s: float) -> float:
    """E|Z| for Z ~ N(d, s^2) (folded normal mean)."""
    phi = 0.5 * (1 + math.erf((-d / s) / math.sqrt(2)))
    return s * math.sqrt(2 / math.pi) * math.exp(-d * d / (2 * s * s)) + d * (1 - 2 * phi)


def _gauss_rbf_mean(mu: np.ndarray, v: float, dim: int, h: float) -> float:
    """E exp(-|Z|^2 / (2 h^2)) for Z ~ N(mu, v I_dim)."""
    return (h * h / (h * h + v)) ** (dim / 2) * math.exp(-float(mu @ mu) / (2 * (h * h + v)))


# ------------------------------------------------------------------------------------------
# Toy distances


def test_sliced_wasserstein_1d_unequal_sizes_by_hand():
    # Quantile functions: x -> 0 on (0,1/2], 1 on (1/2,1]; y -> 0, 1, 2 on thirds.
    # |F^-1 - G^-1| is 1 on (1/3,1/2] and on (2/3,1], 0 elsewhere: W1 = 1/6 + 1/3 = 1/2,
    # W2^2 = 1/2 as well. In 1-D the only directions are +-1, so SW_p = W_p exactly.
    x = torch.tensor([[0.0], [1.0]])
    y = torch.tensor([[2.0], [0.0], [1.0]])
    assert sliced_wasserstein(x, y, num_projections=8, p=1) == pytest.approx(0.5, abs=1e-12)
    assert sliced_wasserstein(x, y, num_projections=8, p=2) == pytest.approx(math.sqrt(0.5), abs=1e-12)


def test_sliced_wasserstein_1d_matches_scipy_w1():
    scipy_stats = pytest.importorskip("scipy.stats")
    x, y = _gauss(37, [0.0], 1.0, 0), _gauss(52, [0.3], 2.0, 1)
    expected = scipy_stats.wasserstein_distance(x[:, 0].numpy(), y[:, 0].numpy())
    assert sliced_wasserstein(x, y, num_projections=4, p=1) == pytest.approx(expected, rel=1e-10)


def test_sliced_wasserstein_shift_is_exact():
    # y = x + c: every projection is shifted by u.c, so SW_2^2 = mean_u (u.c)^2 exactly, and
    # the average of (u.c)^2 over the sphere is |c|^2 / D.
    x = _gauss(500, [0.0, 0.0, 0.0], 1.0, 0)
    c = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    sw2 = sliced_wasserstein(x, x + c, num_projections=4096, p=2) ** 2
    assert sw2 == pytest.approx(float(c @ c) / 3, rel=0.03)


def test_sliced_wasserstein_gaussians_closed_form():
    # N(m1, s^2 I) vs N(m2, s^2 I): each 1-D projection is N(u.m1, s^2) vs N(u.m2, s^2), whose
    # W2^2 is (u.(m1-m2))^2, so SW_2^2 = |m1 - m2|^2 / D (plus sampling noise).
    m1, m2 = torch.tensor([0.0, 1.0]), torch.tensor([1.5, -0.5])
    x, y = _gauss(2000, m1, 0.7, 0), _gauss(1500, m2, 0.7, 1)  # unequal N on purpose
    sw2 = sliced_wasserstein(x, y, num_projections=4096, p=2) ** 2
    # Noise: sample means (~2% of the value) and the Monte-Carlo over directions (~1%).
    assert sw2 == pytest.approx(float(((m1 - m2) ** 2).sum()) / 2, rel=0.06)
    same = sliced_wasserstein(x, _gauss(1500, m1, 0.7, 2), num_projections=256)
    assert same < 0.1


def test_sliced_wasserstein_leaves_global_rng_alone_and_is_seeded():
    x, y = _gauss(50, [0.0, 0.0], 1.0, 0), _gauss(60, [1.0, 0.0], 1.0, 1)
    state = torch.get_rng_state()
    a = sliced_wasserstein(x, y, num_projections=16, seed=3)
    assert torch.equal(state, torch.get_rng_state())
    assert a == sliced_wasserstein(x, y, num_projections=16, seed=3)
    assert a != sliced_wasserstein(x, y, num_projections=16, seed=4)


def test_energy_distance_point_masses():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([4.0, -2.0])  # |a - b| = 5
    assert energy_distance(a.repeat(7, 1), b.repeat(4, 1)) == pytest.approx(10.0, abs=1e-12)
    assert energy_distance(a.repeat(7, 1), a.repeat(3, 1)) == pytest.approx(0.0, abs=1e-12)


def test_energy_distance_gaussians_1d_unbiased():
    # ED = 2 E|X-Y| - E|X-X'| - E|Y-Y'| with X ~ N(0, 1), Y ~ N(1, 2^2); all three are folded
    # normal means. Averaging many small-sample estimates checks unbiasedness: the V-statistic
    # (keeping i == j) would sit ~0.07 too high at n = 50.
    expected = 2 * _normal_abs_mean(1.0, math.sqrt(5)) - _normal_abs_mean(0, math.sqrt(2)) \
        - _normal_abs_mean(0, math.sqrt(8))
    est = [energy_distance(_gauss(50, [0.0], 1.0, 2 * r), _gauss(50, [1.0], 2.0, 2 * r + 1))
           for r in range(400)]
    assert np.mean(est) == pytest.approx(expected, abs=0.025)


def test_mmd_gaussians_closed_form_unbiased():
    # MMD^2 = E k(X,X') + E k(Y,Y') - 2 E k(X,Y); each is a Gaussian integral of the RBF kernel.
    dim, s1, s2 = 2, 1.0, 0.8
    m1, m2 = np.array([0.0, 0.0]), np.array([0.7, 0.2])
    hs = (0.5, 1.0, 2.0)
    expected = sum(_gauss_rbf_mean(np.zeros(dim), 2 * s1**2, dim, h)
                   + _gauss_rbf_mean(np.zeros(dim), 2 * s2**2, dim, h)
                   - 2 * _gauss_rbf_mean(m1 - m2, s1**2 + s2**2, dim, h) for h in hs)
    est = [mmd(_gauss(40, m1, s1, 2 * r), _gauss(30, m2, s2, 2 * r + 1), bandwidths=hs)
           for r in range(300)]
    assert np.mean(est) == pytest.approx(expected, rel=0.05)


def test_mmd_identical_distributions_near_zero():
    # Unbiased: the mean over replicates of equal distributions is ~0 (a biased estimate is > 0).
    est = [mmd(_gauss(30, [0.0, 0.0, 0.0], 1.0, 2 * r), _gauss(30, [0.0, 0.0, 0.0], 1.0, 2 * r + 1))
           for r in range(300)]
    assert abs(np.mean(est)) < 3 * np.std(est) / math.sqrt(len(est))
    assert min(est) < 0  # only an unbiased estimator goes negative
    big = mmd(_gauss(1500, [0.0, 0.0], 1.0, 0), _gauss(1500, [0.0, 0.0], 1.0, 1))
    far = mmd(_gauss(1500, [0.0, 0.0], 1.0, 0), _gauss(1500, [2.0, 0.0], 1.0, 1))
    assert abs(big) < 0.01 < far


def test_toy_input_validation():
    with pytest.raises(ValueError, match="dimension"):
        energy_distance(torch.zeros(3, 2), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="at least two"):
        mmd(torch.zeros(1, 2), torch.zeros(3, 2), bandwidths=(1.0,))
    with pytest.raises(ValueError, match="positive"):
        mmd(torch.zeros(3, 2), torch.zeros(3, 2), bandwidths=(0.0,))
