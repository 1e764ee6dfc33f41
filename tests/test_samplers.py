"""Consistency samplers against the exact consistency function of Gaussian data (SPEC 9)."""

import math

import pytest
import torch

from fewstep.samplers import multistep_sample, sample_trigflow_cm, ternary_search_times, trigflow_search_grid

SD = 0.5


def exact_f(mu, s):
    """f*(x, t) = mu + (x - cos t mu) s / sqrt(s^2 cos^2 t + sd^2 sin^2 t) for data N(mu, s^2 I)."""
    def f(x, t):
        t = t.reshape(-1, *([1] * (x.ndim - 1)))
        q = s**2 * torch.cos(t) ** 2 + SD**2 * torch.sin(t) ** 2
        return mu + (x - torch.cos(t) * mu) * s / torch.sqrt(q)
    return f


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


class ExactNet(torch.nn.Module):
    """A 'network' whose TrigFlow consistency function is f*: F = (cos t x - f*) / (sin t sd) at x = sd * input."""

    def __init__(self, mu, s):
        super().__init__()
        self.f = exact_f(mu, s)
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x_in, t, labels=None):
        x = x_in * SD
        tb = t.reshape(-1, *([1] * (x.ndim - 1)))
        return (torch.cos(tb) * x - self.f(x, t)) / (torch.sin(tb) * SD)


def test_sample_trigflow_cm_uses_net_and_own_generator():
    mu, s = torch.tensor([0.5, 0.5]), 0.2
    net = ExactNet(mu, s)
    state = torch.get_rng_state()
    x = sample_trigflow_cm(net, 5000, (2,), [math.pi / 2, 1.1], SD, batch_size=1000, seed=3)
    assert torch.equal(torch.get_rng_state(), state), "sampling must not consume the global RNG"
    assert x.shape == (5000, 2)
    torch.testing.assert_close(x.mean(0), mu, rtol=0, atol=0.02)
    torch.testing.assert_close(x.std(0), torch.full((2,), s), rtol=0, atol=0.02)
    z = sample_trigflow_cm(net, 5000, (2,), [math.pi / 2, 1.1], SD, batch_size=1000, seed=3)
    assert torch.equal(x, z)


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
