"""Consistency samplers against the exact consistency functions of Gaussian data (SPEC 9)."""

import math

import pytest
import torch

from fewstep.core.samplers import (multistep_sample, ternary_search_times, trigflow_sampler_fn, trigflow_search_grid,
                              ve_multistep_sample, ve_sigmas)
from helpers import ConsistencyOracle, algorithm_1_moments, exact_f, f_star_edm

SD = 0.5


def test_one_step_is_exact_map_of_noise():
    mu, s = torch.tensor([0.3, -0.2], dtype=torch.float64), 0.8
    z = torch.randn(1000, 2, dtype=torch.float64)
    x = multistep_sample(exact_f(mu, s), z, [math.pi / 2], SD)
    torch.testing.assert_close(x, mu + s * z, rtol=0, atol=1e-12)


def test_multistep_with_exact_f_keeps_the_data_distribution():
    """Re-noising exact samples and applying f* again returns N(mu, s^2 I) at every step."""
    mu, s = torch.tensor([1.0, -0.5], dtype=torch.float64), 0.3
    n = 200_000
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(n, 2, dtype=torch.float64, generator=gen)
    x = multistep_sample(exact_f(mu, s), z, [math.pi / 2, 1.1, 0.6, 0.2], SD, generator=gen)
    # Mean error ~ s / sqrt(n) = 7e-4; std error ~ s / sqrt(2n) = 5e-4.
    torch.testing.assert_close(x.mean(0), mu, rtol=0, atol=4e-3)
    torch.testing.assert_close(x.std(0), torch.full((2,), s, dtype=torch.float64), rtol=0, atol=3e-3)


def test_multistep_sample_of_a_network_draws_only_from_its_generator():
    """A consistency network through `trigflow_sampler_fn`: 2-step samples of the exact model have
    the data's moments, the global RNG is untouched, and the same seed gives the same samples."""
    mu, s = torch.tensor([0.5, 0.5]), 0.2
    fn = trigflow_sampler_fn(ConsistencyOracle(mu, s), SD)

    def draw(seed):
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn(5000, 2, generator=gen)
        return multistep_sample(fn, noise, [math.pi / 2, 1.1], SD, gen)

    state = torch.get_rng_state()
    x = draw(3)
    assert torch.equal(torch.get_rng_state(), state), "sampling must not consume the global RNG"
    torch.testing.assert_close(x.mean(0), mu, rtol=0, atol=0.02)
    torch.testing.assert_close(x.std(0), torch.full((2,), s), rtol=0, atol=0.02)
    assert torch.equal(x, draw(3)) and not torch.equal(x, draw(4))


# ---------------------------------------------------------------------------------------------
# VE multistep sampling, CM paper Algorithm 1 (SPEC 3.5)


def test_ve_multistep_sample_follows_algorithm_1_step_by_step():
    """`x = f(T z, T)`, then `x = f(x + sqrt(tau^2 - eps^2) z', tau)` with z' from the generator:
    replayed draw by draw, with a nonlinear stand-in for f."""
    eps, sigmas = 0.1, [5.0, 1.0, 0.3]
    calls = []

    def f(x, sigma):
        calls.append((x.clone(), sigma.clone()))
        return torch.tanh(x) + 0.1 * sigma[:, None]

    noise = torch.randn(6, 3, dtype=torch.float64)
    x = ve_multistep_sample(f, noise, sigmas, eps, torch.Generator().manual_seed(1))
    assert len(calls) == len(sigmas)
    gen, want = torch.Generator().manual_seed(1), sigmas[0] * noise
    for i, ((x_in, sigma), tau) in enumerate(zip(calls, sigmas)):
        if i > 0:
            z = torch.randn(noise.shape, dtype=noise.dtype, generator=gen)
            want = torch.tanh(want) + 0.1 * sigmas[i - 1] + math.sqrt(tau ** 2 - eps ** 2) * z
        assert torch.equal(sigma, torch.full((6,), tau, dtype=torch.float64))
        torch.testing.assert_close(x_in, want, rtol=0, atol=1e-15)
    torch.testing.assert_close(x, torch.tanh(want) + 0.1 * sigmas[-1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="eps"):
        ve_multistep_sample(f, noise, [1.0, 0.05], eps)


def test_ve_sigmas_read_trigflow_times_as_noise_levels():
    """t = pi/2 (also its float32 rounding, which lies above pi/2) is sigma_max; t is
    sigma_d tan t, floored at eps; the Karras search grid maps back to its noise levels."""
    t32 = float(torch.tensor(math.pi / 2, dtype=torch.float32))
    assert ve_sigmas([math.pi / 2, t32, math.atan(0.8 / SD), 1e-6], SD, 0.002, 80.0) == pytest.approx(
        [80.0, 80.0, 0.8, 0.002])
    from fewstep.core.edm import karras_grid

    grid = karras_grid(10, 0.002, 80.0).flip(0).tolist()
    assert ve_sigmas(trigflow_search_grid(10, SD), SD) == pytest.approx(grid, rel=1e-12)


@pytest.mark.parametrize("sigmas", [[1.0], [1.0, 0.5], [1.0, 0.5, 0.25]])
def test_ve_multistep_sample_matches_algorithm_1_in_closed_form(sigmas):
    """Gaussian data N(MU, S^2 I) and its exact VE consistency function, with T = 1 and eps = 0.2
    so that the start `T z` and the re-noising std `sqrt(tau^2 - eps^2)` matter: the sample moments
    are Algorithm 1's closed form."""
    eps, n = 0.2, 100_000
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(n, 4, dtype=torch.float64, generator=gen)
    x = ve_multistep_sample(lambda x, sigma: f_star_edm(x, sigma, eps), noise, sigmas, eps, gen)
    mean, var = algorithm_1_moments(sigmas, eps)
    # Standard errors: mean sqrt(var / n) < 1e-3, variance var sqrt(2 / n) = 0.45%.
    torch.testing.assert_close(x.mean(0), mean, rtol=0, atol=4e-3)
    torch.testing.assert_close(x.var(0), torch.full((4,), var, dtype=torch.float64), rtol=0.025, atol=0)


# ---------------------------------------------------------------------------------------------
# Time points by ternary search (SPEC 3.5)
# Data N(0, s^2) and a linear model f(x, t) = c(t) x whose gain is off by a factor (1 + delta sin^2 t):
# multistep samples stay Gaussian, so the W2 distance of a schedule's samples to the data is exact:
# one step gives variance c(pi/2)^2 sd^2, each step at t maps v -> c(t)^2 (cos^2 t v + sin^2 t sd^2).

SD_, S_ = 0.5, 0.2


def _gaussian_w2(delta):
    def c(t):
        return S_ / math.sqrt(S_ ** 2 * math.cos(t) ** 2 + SD_ ** 2 * math.sin(t) ** 2) * (1 + delta * math.sin(t) ** 2)

    def score(times):
        v = c(times[0]) ** 2 * SD_ ** 2
        for t in times[1:]:
            v = c(t) ** 2 * (math.cos(t) ** 2 * v + math.sin(t) ** 2 * SD_ ** 2)
        return abs(math.sqrt(v) - S_)

    return score


@pytest.mark.parametrize("delta", [0.1, 0.3, -0.2])
def test_ternary_search_finds_the_exhaustive_optimum(delta):
    """On the exact W2 of a biased Gaussian model the greedy ternary search picks the same
    2-step time as trying every grid point (measured: t = 0.609 for all three biases), with 9
    scored schedules instead of 39."""
    score, grid = _gaussian_w2(delta), trigflow_search_grid(40)
    exhaustive = min(grid[1:], key=lambda t: score((math.pi / 2, t)))
    times, history = ternary_search_times(score, 2, grid)
    assert times == [math.pi / 2, exhaustive]
    assert len(history) <= 12 and len({tuple(h["times"]) for h in history}) == len(history)
    assert score(times) < 0.7 * score((math.pi / 2,))  # two steps beat one for this model (0.54-0.63x)


def test_ternary_search_is_greedy_per_step():
    """Each step searches below the previous time: with a score that wants 0.9 then 0.3, three
    steps find the grid points nearest to them."""
    grid = [1.5, 1.3, 1.1, 0.9, 0.7, 0.5, 0.3, 0.1]

    def score(times):
        return sum(abs(t - want) for t, want in zip(times[1:], (0.9, 0.3)))

    times, _ = ternary_search_times(score, 3, grid)
    assert times == [math.pi / 2, 0.9, 0.3]
    assert ternary_search_times(score, 1, grid) == ([math.pi / 2], [])
    grid_times = trigflow_search_grid(10)
    assert len(grid_times) == 10 and all(a > b for a, b in zip(grid_times, grid_times[1:]))
    assert grid_times[0] < math.pi / 2 and grid_times[-1] > 0
    with pytest.raises(ValueError, match="decreasing"):
        ternary_search_times(score, 2, [0.5, 0.9])
    with pytest.raises(ValueError, match="no grid time"):
        ternary_search_times(score, 3, [1.0])
