"""Discrete-time consistency models (docs/math.md#cm-ct-and-ict): schedules, metrics, and the CD / CT / iCT losses
against the exact consistency function of Gaussian data (EDM/VE closed forms, float64)."""

import math

import pytest
import torch

from fewstep.data import EightGaussians
from fewstep.core.edm import consistency_precond, edm_consistency
from fewstep.methods import METHODS
from fewstep.methods.cm import (CD, CT, ICT, cm_distance, ct_num_scales, ct_target_decay, ict_num_scales,
                                lognormal_index_probs, make_teacher_denoiser, pseudo_huber_c)
from fewstep.metrics.toy import sliced_wasserstein
from fewstep.networks import MLP
from fewstep.core.samplers import multistep_sample
from helpers import MU, S, SD, algorithm_1_moments, d_star, f_star_edm, per_sample, randomize_zero_params_, tiny_mlp

EPS = 0.002


class OracleVENet(torch.nn.Module):
    """`F(c_in x, ln(sigma) / 4)` whose consistency parameterization (boundary at eps) is exactly the
    VE consistency function f* of N(MU, S^2 I) (docs/math.md#gaussian-closed-forms)."""

    num_classes = 0

    def __init__(self, eps=EPS):
        super().__init__()
        self.eps = eps

    def forward(self, y, c_noise, labels=None):
        sigma = torch.exp(4 * c_noise)
        c_skip, c_out, c_in, _ = consistency_precond(sigma, SD, self.eps)
        x = y / per_sample(c_in, y)
        return (f_star_edm(x, sigma, self.eps) - per_sample(c_skip, x) * x) / per_sample(c_out, x).clamp_min(1e-300)


def _data(n=4096, seed=0):
    g = torch.Generator().manual_seed(seed)
    return MU + S * torch.randn(n, 4, generator=g, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# Schedules and metrics


def test_ct_schedules():
    K = 1000
    assert ct_num_scales(0, K) == 2 and ct_num_scales(K, K) == 151 and ct_num_scales(2 * K, K) == 151
    assert all(ct_num_scales(k, K) <= ct_num_scales(k + 50, K) for k in range(0, K, 50))
    assert ct_target_decay(2) == pytest.approx(0.9) and ct_target_decay(151) == pytest.approx(0.9 ** (2 / 151))


def test_ict_curriculum_and_noise_distribution():
    K = 8000  # K' = floor(K / (log2(128) + 1)) = 1000
    assert [ict_num_scales(k, K) for k in (0, 999, 1000, 2000, 7999, 10_000)] == [11, 11, 21, 41, 1281, 1281]
    sigmas = CT(sigma_data=SD).grid(200)
    p = lognormal_index_probs(sigmas)
    assert p.shape == (199,) and float(p.sum()) == pytest.approx(1.0) and (p >= 0).all()
    mode = sigmas[p.argmax()]  # the log-normal's mode exp(P_mean - P_std^2) falls below eps; mass is near small sigma
    assert float(sigmas[:-1][p.cumsum(0) >= 0.5][0]) == pytest.approx(math.exp(-1.1), rel=0.15)  # the median
    assert float(mode) < math.exp(-1.1)


def test_metrics():
    a, b = torch.randn(5, 3, 4, 4, dtype=torch.float64), torch.randn(5, 3, 4, 4, dtype=torch.float64)
    d = (a - b).flatten(1)
    torch.testing.assert_close(cm_distance(a, b, "l2"), d.square().mean(1))
    torch.testing.assert_close(cm_distance(a, b, "l1"), d.abs().mean(1))
    torch.testing.assert_close(cm_distance(a, b, "pseudo_huber", c=0.0), d.norm(dim=1))
    small = 1e-6 * (a - b)
    c = pseudo_huber_c(48)
    assert c == pytest.approx(0.00054 * math.sqrt(48))
    torch.testing.assert_close(cm_distance(a + small, a, "pseudo_huber"), small.flatten(1).square().sum(1) / (2 * c),
                               rtol=1e-4, atol=0)
    with pytest.raises(ValueError, match="lpips"):
        cm_distance(a, b, "lpips")
    with pytest.raises(ValueError, match="lpips"):
        CT(metric="lpips")


# ---------------------------------------------------------------------------------------------
# The losses at the exact consistency function


def test_boundary_condition():
    x = torch.randn(6, 4, dtype=torch.float64)
    net = MLP(4, 16, 1).double()
    torch.testing.assert_close(edm_consistency(net, x, EPS, None, SD, EPS), x, rtol=0, atol=0)
    torch.testing.assert_close(edm_consistency(OracleVENet(), x, torch.full((6,), 3.0, dtype=torch.float64),
                                               None, SD, EPS), f_star_edm(x, 3.0, EPS))


def _mean_loss(method, n_seed=0):
    torch.manual_seed(n_seed)
    return method(OracleVENet(), _data())[0].mean().item()


def test_cd_loss_at_the_exact_function_vanishes_at_the_solvers_order():
    """With the exact teacher D* and target f*, the CD loss is the squared local error of one
    teacher step: Heun O(h^3) -> loss O(h^6), Euler O(h^2) -> O(h^4). Measured loss ratios per
    doubling of N (10 -> 80): Heun 113, 80, 69; Euler 17, 16, 16."""
    losses = {}
    for solver in ("heun", "euler"):
        for N in (20, 40, 80):
            cd = CD(teacher=d_star, num_scales_fixed=N, sigma_data=SD, solver=solver)
            cd.target = OracleVENet()
            losses[solver, N] = _mean_loss(cd)
    for N in (20, 40):
        assert losses["heun", N] / losses["heun", 2 * N] > 40  # -> 64
        assert 10 < losses["euler", N] / losses["euler", 2 * N] < 25  # -> 16
    assert losses["heun", 80] < 1e-9


def test_ct_loss_at_the_exact_function_is_order_dt_squared():
    """CT's pair shares z but not an ODE trajectory, so even f* pays O(dsigma^2): the loss falls
    4x per doubling of N (measured 4.3, 4.0, 4.1), the bias CT trades for needing no teacher."""
    losses = []
    for N in (10, 20, 40, 80):
        ct = CT(sigma_data=SD, s0=N, s1=N, total_steps=1)
        ct.target = OracleVENet()
        losses.append(_mean_loss(ct))
    ratios = [a / b for a, b in zip(losses, losses[1:])]
    assert all(3.3 < r < 4.8 for r in ratios), ratios


def test_cd_with_a_trigflow_teacher_matches_the_edm_teacher():
    """A TrigFlow velocity teacher enters CD as an EDM denoiser (`trigflow_to_edm`): with the exact
    TrigFlow velocity it is the exact D*."""
    from helpers import v_star

    x = _data(16)
    sigma = torch.linspace(0.01, 50, 16, dtype=torch.float64)
    trig = make_teacher_denoiser(lambda y, t, labels=None: v_star(SD * y, t) / SD, "trigflow", SD)
    torch.testing.assert_close(trig(x, sigma), d_star(x, sigma), rtol=1e-10, atol=1e-10)


def test_target_networks_and_config():
    net = MLP(4, 16, 1)
    ct = METHODS["ct"](total_steps=10)
    loss, stats = ct(net, torch.randn(8, 4))
    assert loss.shape == (8,) and ct.target is not None and float(stats["num_scales"]) == 2
    before = [p.clone() for p in ct.target.parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ct.after_step(net, 0)  # mu = 0.9 at N = 2: the target moves 10% of the way
    for b, p, q in zip(before, ct.target.parameters(), net.parameters()):
        torch.testing.assert_close(p, 0.9 * b + 0.1 * q)
    assert set(ct.state_tensors()) == set(net.state_dict())
    ict = METHODS["ict"](total_steps=100)
    assert ict.after_step(net, 0) is False and ict.state_tensors() == {} and ict.metric == "pseudo_huber"
    with pytest.raises(ValueError, match="teacher"):
        METHODS["cd"]()(net, torch.randn(8, 4))


# ---------------------------------------------------------------------------------------------
# The online and target evaluations share their dropout masks (as in the official code)


def _dropout_net():
    net = randomize_zero_params_(tiny_mlp(dim=4, dropout=0.5)).double()
    x = torch.randn(8, 4, dtype=torch.float64)
    t = torch.ones(8, dtype=torch.float64)
    assert not torch.equal(net(x, t), net(x, t)), "dropout must be active for the test to mean anything"
    return net


def _one_level(method, sigmas):
    """Make every drawn pair (sigma_n, sigma_{n+1}) the given two levels."""
    method.grid = lambda num_scales: torch.tensor(sigmas, dtype=torch.float64)
    return method


@pytest.mark.parametrize("make", [lambda: CT(sigma_data=SD, total_steps=1),
                                  lambda: CD(teacher=d_star, num_scales_fixed=2, sigma_data=SD)],
                         ids=["ct", "cd"])
def test_online_and_target_see_the_same_dropout_masks(make):
    """CT and CD with both levels equal (so x at both levels is the same) and the EMA target equal
    to the network (its first call copies it): the two evaluations differ only by their dropout
    masks, and the loss is exactly 0 because the target pass replays the online pass's RNG."""
    method = _one_level(make(), [1.0, 1.0])
    loss, stats = method(_dropout_net(), _data(64))
    assert torch.equal(loss, torch.zeros_like(loss)), loss


def test_ict_online_and_target_see_the_same_dropout_masks():
    """iCT (theta^- = stopgrad(theta)) with levels 1 and 1 + 1e-9, weight 1 / 1e-9: the shared masks
    leave a loss of 3e-7 (the 1e-9 step squared, times the weight); different masks give 7e8."""
    method = _one_level(ICT(sigma_data=SD, total_steps=1), [1.0, 1.0 + 1e-9])
    loss, stats = method(_dropout_net(), _data(64))
    assert loss.max() < 1e-3, loss.max()


# ---------------------------------------------------------------------------------------------
# Sampling: CM paper Algorithm 1 in the VE formulation


def test_sample_is_algorithm_1():
    """`method.sampler(net)` at TrigFlow times (pi/2, arctan(0.5 / sigma_d)) = VE levels (T, 0.5), with the
    exact consistency network of N(MU, S^2 I), T = 1 and eps = 0.2 (so that the start `T z` and the
    re-noising std `sqrt(tau^2 - eps^2)` matter): 1- and 2-step sample moments are Algorithm 1's
    closed form. The TrigFlow route (`multistep_sample` of `consistency_fn`, which starts from
    `sqrt(T^2 + sigma_d^2) z` and re-noises with std tau) is measurably off: variance +25%, +20%."""
    eps, n = 0.2, 100_000
    method, net = CT(sigma_data=SD, eps=eps, sigma_max=1.0), OracleVENet(eps)
    noise = torch.randn(n, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for times, sigmas in (([math.pi / 2], [1.0]), ([math.pi / 2, math.atan(0.5 / SD)], [1.0, 0.5])):
        sampler = method.sampler(net)
        x = sampler.sample(noise, sampler.schedule(times=times), generator=torch.Generator().manual_seed(1))
        mean, var = algorithm_1_moments(sigmas, eps)
        # Standard errors: mean sqrt(var / n) < 1e-3, variance var sqrt(2 / n) = 0.45%.
        torch.testing.assert_close(x.mean(0), mean, rtol=0, atol=4e-3)
        torch.testing.assert_close(x.var(0), torch.full((4,), var, dtype=torch.float64), rtol=0.025, atol=0)
        old = multistep_sample(sampler.consistency_fn(), noise, times, SD, torch.Generator().manual_seed(1))
        assert (old.var(0) / var - 1).min() > 0.15


# ---------------------------------------------------------------------------------------------
# Short trainings


@pytest.mark.slow
def test_ict_trains_on_8_gaussians():
    """iCT from scratch, 400 steps (MLP 128 x 3, batch 512, lr 2e-3): one-step sliced W2 measured
    0.080 against 0.406 untrained (2 steps at t = pi/2, 1.0: 0.134; a 400-step iCT model is not yet
    consistent at small t); floor of two data draws 0.048."""
    torch.manual_seed(0)
    data = EightGaussians()
    net = MLP(2, 128, 3)
    method = ICT(sigma_data=SD, total_steps=400)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    noise = torch.randn(2000, 2, generator=torch.Generator().manual_seed(1))
    ref = data.all()[0][:2000]
    sampler = method.sampler(net)
    with torch.no_grad():
        untrained = sliced_wasserstein(sampler.sample(noise, sampler.schedule(1)), ref)
    for step in range(400):
        loss, _ = method(net, data.sample(512)[0], None, step)
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
    with torch.no_grad():
        one = sliced_wasserstein(sampler.sample(noise, sampler.schedule(1)), ref)
        two = sliced_wasserstein(sampler.sample(noise, sampler.schedule(times=[math.pi / 2, 1.0]),
                                                generator=torch.Generator().manual_seed(2)), ref)
    print(f"iCT SW2: untrained {untrained:.3f}, 1 step {one:.3f}, 2 steps {two:.3f}")
    assert one < 0.12 and two < 0.25 and one < untrained / 3


# ---------------------------------------------------------------------------------------------
# Through the CLI


def test_discrete_cms_via_cli(tmp_path, capsys):
    """`--method ict` / `ct` train, sample and resume (CT's EMA target is checkpointed); `--method cd`
    distils a flow teacher, starting from its weights through the time-embedding conversion."""
    from fewstep.training import checkpoint as ckpt
    from fewstep.cli import main

    common = ["--preset", "8gaussians", "--batch-size", "64", "--no-progress", "--set", "network.width=32",
              "--set", "network.depth=1", "--set", "train.sample_every=0"]
    assert main(["train", *common, "--method", "ict", "--steps", "3", "--out", str(tmp_path / "ict")]) == 0
    assert main(["sample", str(tmp_path / "ict"), "--steps", "2", "--num", "16",
                 "--out", str(tmp_path / "ict.png")]) == 0
    ct = tmp_path / "ct"
    assert main(["train", *common, "--method", "ct", "--steps", "2", "--out", str(ct)]) == 0
    tensors, state = ckpt.load_checkpoint(ct)
    assert any(k.startswith("target.") for k in tensors) and state["config"]["method"]["name"] == "ct"
    assert main(["train", *common, "--method", "ct", "--steps", "4", "--out", str(ct)]) == 0
    assert "resumed from" in capsys.readouterr().out
    teacher = tmp_path / "teacher"
    assert main(["train", *common, "--method", "flow", "--steps", "3", "--out", str(teacher)]) == 0
    assert main(["train", *common, "--method", "cd", "--teacher", str(teacher), "--steps", "2",
                 "--set", "method.num_scales_fixed=10", "--out", str(tmp_path / "cd")]) == 0
    assert "time_embedding_fit_error" in capsys.readouterr().out
    assert main(["train", *common, "--method", "cd", "--steps", "2", "--out", str(tmp_path / "x")]) == 2
    assert "--teacher" in capsys.readouterr().err
