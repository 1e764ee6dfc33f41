"""Consistency samplers against the exact consistency function of Gaussian data (SPEC 9)."""

import math

import torch

from fewstep.samplers import multistep_sample, sample_trigflow_cm

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
