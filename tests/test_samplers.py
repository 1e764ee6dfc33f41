"""Consistency samplers against the exact consistency functions of Gaussian data (docs/math.md#gaussian-closed-forms)."""

import math

import pytest
import torch

from fewstep.core.edm import consistency_precond
from fewstep.core.ode import ODESampler
from fewstep.core.samplers import (FlowMapSampler, TrigFlowConsistencySampler, VEConsistencySampler, multistep_sample,
                                   ternary_search_times, trigflow_sampler_fn, trigflow_search_grid, ve_multistep_sample,
                                   ve_sigmas)
from fewstep.methods import METHODS
from fewstep.methods.base import as_method
from helpers import MU, S, ConsistencyOracle, algorithm_1_moments, exact_f, f_star, f_star_edm, per_sample, v_star

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
# VE multistep sampling, CM paper Algorithm 1 (docs/math.md#ve-multistep-sampling-cm-algorithm-1)


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
# Time points by ternary search (docs/math.md#ve-multistep-sampling-cm-algorithm-1)
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


# ---------------------------------------------------------------------------------------------
# Sampler objects (`method.sampler(net)`) against the closed forms of Gaussian data N(MU, S^2 I)

F64 = torch.float64
HALF_PI = math.pi / 2


def _noise(n, seed=0, dim=4):
    return torch.randn(n, dim, dtype=F64, generator=torch.Generator().manual_seed(seed))


def _q(t, s=S, sd=SD):
    return s ** 2 * torch.cos(t) ** 2 + sd ** 2 * torch.sin(t) ** 2


class GuidedConsistencyOracle(ConsistencyOracle):
    """The exact consistency network of N(w MU, S^2 I): a student that takes the CFG scale w as an
    input (`guidance_input`) and whose guided data law is known."""

    guidance_input = True

    def forward(self, y, t, labels=None, guidance=None):
        x, w = self.sd * y, 1.0 if guidance is None else guidance
        return (per_sample(torch.cos(t), x) * x - f_star(x, t, w * self.mu, self.s, self.sd)) / (
            self.sd * per_sample(torch.sin(t), x))


class ExactAverageVelocity(torch.nn.Module):
    """`F(x / sd, t, r=r) = u*(x, r, t) / sd` with `u* = (x - Phi_{t->r}(x)) / (t - r)` and the exact
    Gaussian flow map `Phi_{t->r}(x) = cos r MU + (x - cos t MU) sqrt(q(r) / q(t))`; u* = v* at r = t."""

    num_classes = 0

    def forward(self, y, t, labels=None, r=None):
        x = SD * y
        r = t if r is None else r
        dt, tt, rr = per_sample(t - r, x), per_sample(t, x), per_sample(r, x)
        phi = torch.cos(rr) * MU + (x - torch.cos(tt) * MU) * (_q(rr) / _q(tt)).sqrt()
        apart = dt > 1e-12
        return torch.where(apart, (x - phi) / (dt + (~apart).to(x.dtype)), v_star(x, t)) / SD


class VelocityOracle(torch.nn.Module):
    """A TrigFlow network `F = v* / sd` of class-conditional data N(mu_k, S^2 I), mu_k = (k + 1) MU,
    with the null label (k = num_classes) the unconditional mean 0 (no labels: mu_0 = MU)."""

    def __init__(self, num_classes=0):
        super().__init__()
        self.num_classes = num_classes
        self.calls = 0

    def forward(self, y, t, labels=None):
        self.calls += 1
        x = SD * y
        if labels is None:
            return v_star(x, t) / SD
        k = labels.to(F64)[:, None]
        mu = torch.where(k == self.num_classes, torch.zeros_like(k), k + 1) * MU
        return v_star(x, t, mu=mu) / SD


class OracleVENet(torch.nn.Module):
    """An EDM consistency network (boundary at eps) whose consistency function is the exact VE f*."""

    num_classes = 0

    def __init__(self, eps):
        super().__init__()
        self.eps = eps

    def forward(self, y, c_noise, labels=None):
        sigma = torch.exp(4 * c_noise)
        c_skip, c_out, c_in, _ = consistency_precond(sigma, SD, self.eps)
        x = y / per_sample(c_in, y)
        return (f_star_edm(x, sigma, self.eps) - per_sample(c_skip, x) * x) / per_sample(c_out, x).clamp_min(1e-300)


def _moments_close(x, mean, std, atol=4e-3):
    torch.testing.assert_close(x.mean(0), torch.as_tensor(mean, dtype=F64).expand(x.shape[1]), rtol=0, atol=atol)
    torch.testing.assert_close(x.std(0), torch.full((x.shape[1],), std, dtype=F64), rtol=0, atol=atol)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_trigflow_consistency_sampler_draws_the_data_law(steps):
    """With the exact consistency network, one step is the exact map z -> MU + S z, and every
    multistep schedule (re-noising in between) keeps N(MU, S^2 I); NFE = number of times."""
    sampler = TrigFlowConsistencySampler(ConsistencyOracle(), SD)
    schedule = sampler.schedule(steps)
    assert schedule.times[0] == HALF_PI and sampler.nfe(schedule) == steps
    noise = _noise(100_000)
    x = sampler.sample(noise, schedule, generator=torch.Generator().manual_seed(1))
    if steps == 1:
        torch.testing.assert_close(x, MU + S * noise, rtol=0, atol=1e-12)
    _moments_close(x, MU, S)
    fn = sampler.consistency_fn()
    t = torch.full((8,), 0.7, dtype=F64)
    torch.testing.assert_close(fn(noise[:8], t), f_star(noise[:8], t), rtol=0, atol=1e-12)


def test_trigflow_consistency_sampler_starts_at_t_max_like_edm():
    """ECT starts at sigma_max = 80, TrigFlow time t_max = arctan(80 / sd): the one-step sample is EDM's
    `f(80 z, 80)`, the exact VE consistency function of the data (boundary at 0). Times above t_max
    start at t_max. From pi/2 (the exact prior) the sample is MU + S z instead: off by ~MU S / 80."""
    t_max = math.atan(80.0 / SD)
    sampler = TrigFlowConsistencySampler(ConsistencyOracle(), SD, t_max=t_max)
    noise = _noise(1000)
    x = sampler.sample(noise, sampler.schedule(1))
    assert sampler.schedule(1).times == (t_max,) and sampler.schedule(3).times[0] == t_max
    torch.testing.assert_close(x, f_star_edm(80.0 * noise, 80.0, 0.0), rtol=0, atol=1e-12)
    torch.testing.assert_close(sampler.sample(noise, sampler.schedule(times=[HALF_PI])), x, rtol=0, atol=0)
    assert (x - (MU + S * noise)).abs().max() > 1e-3  # pi/2 would be a different sample


def test_consistency_guidance_goes_to_the_network_that_takes_it():
    """A student with a guidance input samples N(w MU, S^2 I) at scale w; one without it refuses w != 1."""
    noise = _noise(2000)
    sampler = TrigFlowConsistencySampler(GuidedConsistencyOracle(), SD, guidance_input=True)
    x = sampler.sample(noise, sampler.schedule(1), guidance=2.0)
    torch.testing.assert_close(x, 2 * MU + S * noise, rtol=0, atol=1e-12)
    plain = TrigFlowConsistencySampler(ConsistencyOracle(), SD)
    with pytest.raises(ValueError, match="guidance"):
        plain.sample(noise, plain.schedule(1), guidance=2.0)
    with pytest.raises(ValueError, match="multistep"):
        plain.schedule(2, sampler="heun")


@pytest.mark.parametrize("sigmas", [[1.0], [1.0, 0.5]])
def test_ve_consistency_sampler_is_algorithm_1(sigmas):
    """TrigFlow times arctan(sigma / sd) are the VE levels; with T = sigma_max = 1 and eps = 0.2 the
    sample moments are Algorithm 1's closed form (what a TrigFlow reading would miss by +15%)."""
    eps = 0.2
    sampler = VEConsistencySampler(OracleVENet(eps), SD, eps=eps, sigma_max=1.0)
    times = [HALF_PI] + [math.atan(s / SD) for s in sigmas[1:]]
    x = sampler.sample(_noise(100_000), sampler.schedule(times=times), generator=torch.Generator().manual_seed(1))
    mean, var = algorithm_1_moments(sigmas, eps)
    torch.testing.assert_close(x.mean(0), mean, rtol=0, atol=4e-3)
    torch.testing.assert_close(x.var(0), torch.full((4,), var, dtype=F64), rtol=0.025, atol=0)
    t = torch.full((8,), 0.9, dtype=F64)
    x_t = _noise(8, 3)
    sigma = SD * math.tan(0.9)  # the TrigFlow reading for editing: f(x_t / cos t, sd tan t)
    torch.testing.assert_close(sampler.consistency_fn()(x_t, t), f_star_edm(x_t / math.cos(0.9), sigma, eps),
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("times", [[HALF_PI], [HALF_PI, 1.1], [HALF_PI, 1.2, 0.5]])
def test_flow_map_sampler_is_the_exact_flow_map(times):
    """With the exact average velocity each jump is Phi_{t->s}; composed, any schedule is
    Phi_{pi/2->0}(sd z) = MU + S z, deterministically; its consistency function is Phi_{t->0} = f*."""
    sampler = FlowMapSampler(ExactAverageVelocity(), SD)
    noise = _noise(500)
    x = sampler.sample(noise, sampler.schedule(times=times), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x, MU + S * noise, rtol=0, atol=1e-12)
    assert sampler.nfe(sampler.schedule(times=times)) == len(times)
    t = torch.full((500,), 1.1, dtype=F64)
    torch.testing.assert_close(sampler.consistency_fn()(SD * noise, t), f_star(SD * noise, t), rtol=0, atol=1e-12)


@pytest.mark.parametrize("solver", ["heun", "euler", "dpmpp_2m", "ddim"])
def test_ode_sampler_solves_the_pf_ode_and_counts_its_nfe(solver):
    """The TrigFlow PF-ODE of the exact velocity ends at MU + S z (max error measured: Heun 4.5e-4 and
    DPM-Solver++(2M) 7.1e-4 at 128 steps, Euler 2.9e-3 and DDIM 4.0e-3 at 512); `nfe` is the number of
    network calls; an ODE solver has no consistency function."""
    net = VelocityOracle()
    sampler = ODESampler(net, SD, solver=solver, steps=128 if solver in ("heun", "dpmpp_2m") else 512)
    noise = _noise(64)
    schedule = sampler.schedule()
    assert schedule.sampler == solver and sampler.consistency_fn() is None
    x = sampler.sample(noise, schedule)
    assert net.calls == sampler.nfe(schedule) == (2 * schedule.steps - 1 if solver == "heun" else schedule.steps)
    torch.testing.assert_close(x, MU + S * noise, rtol=0, atol=6e-3 if solver in ("euler", "ddim") else 1.5e-3)
    with pytest.raises(ValueError, match="consistency models"):
        sampler.schedule(times=[HALF_PI])


def test_ode_sampler_guidance_is_cfg_and_samples_the_guided_gaussian():
    """v* is affine in the mean, so CFG at scale w of class k (mean (k + 1) MU) against the null class
    (mean 0) is the exact flow of N(w (k + 1) MU, S^2 I)."""
    net = VelocityOracle(num_classes=3)
    sampler = ODESampler(net, SD, num_classes=3, steps=128)
    noise, labels = _noise(64), torch.full((64,), 1)
    x = sampler.sample(noise, sampler.schedule(), labels=labels, guidance=1.5)
    torch.testing.assert_close(x, 1.5 * 2 * MU + S * noise, rtol=0, atol=1e-3)


def test_edm_ode_sampler_ends_at_the_exact_endpoint():
    """The EDM PF-ODE from sigma_max = 80 with the exact denoiser ends at f*(80 z, 80) (boundary 0)."""
    from helpers import OracleEDMNet

    sampler = ODESampler(OracleEDMNet(), SD, "edm", steps=128)
    noise = _noise(64)
    x = sampler.sample(noise, sampler.schedule())
    torch.testing.assert_close(x, f_star_edm(80.0 * noise, 80.0, 0.0), rtol=0, atol=1e-3)
    with pytest.raises(ValueError, match="uniform"):
        ODESampler(OracleEDMNet(), SD, "edm", grid="uniform")


KINDS = {"sct": TrigFlowConsistencySampler, "scd": TrigFlowConsistencySampler, "ect": TrigFlowConsistencySampler,
         "cd": VEConsistencySampler, "ct": VEConsistencySampler, "ict": VEConsistencySampler,
         "meanflow": FlowMapSampler, "flow": ODESampler, "edm": ODESampler, "pd": ODESampler}


def test_every_registered_method_hands_out_its_sampler():
    """Each method's sampler kind and defaults; a plain callable samples as a TrigFlow diffusion model."""
    assert set(KINDS) <= set(METHODS)
    net = ConsistencyOracle()
    for name, kind in KINDS.items():
        sampler = METHODS[name]().sampler(net)
        assert type(sampler) is kind, name
        assert sampler.net is net and sampler.sigma_d == METHODS[name]().sigma_d
    assert METHODS["ect"]().sampler(net).t_max == pytest.approx(math.atan(80.0 / SD), rel=1e-15)  # ECT's sigma_max
    assert METHODS["edm"]().sampler(net).formulation == "edm" and METHODS["flow"]().sampler(net).solver == "heun"
    pd = METHODS["pd"](start_steps=16, min_steps=2, total_steps=300)
    first, last = pd.sampler(net, step=1), pd.sampler(net)
    assert (first.solver, first.grid, first.steps, last.steps) == ("ddim", "uniform", 8, 2)
    plain = as_method(lambda net, x0, labels=None, step=0: (x0.sum(1), {})).sampler(net)
    assert type(plain) is ODESampler and (plain.formulation, plain.solver) == ("trigflow", "heun")
