"""MeanFlow (docs/math.md#meanflow), checked against the closed forms of Gaussian data (docs/math.md#gaussian-closed-forms):

- the exact average velocity `u*(x, r, t) = (x - Phi_{t->r}(x)) / (t - r)` as a network: the MeanFlow
  loss and its gradient vanish there (exactly with the exact velocity, in expectation with the
  conditional one), and move away from it when the network is perturbed;
- the MeanFlow JVP against float64 central finite differences, for every JVP mode;
- 1- and 2-step sampling with u* reproduces the exact flow map;
- a short training run brings a small MLP close to u*;
- the second-time input of fewstep's networks, classifier-free guidance in training, the config
  checks, and a train / sample round trip through `fewstep.training.build` and the CLI.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fewstep.apps.generate import batch_seed
from fewstep.apps.generate import sample as generate_sample
from fewstep.methods import MeanFlow
from fewstep.methods.meanflow import (JVP_MODES, PY_MEANFLOW_CIFAR10, guided_velocity, meanflow_jvp, meanflow_loss,
                                      meanflow_times)
from fewstep.networks import DiT, MLP, UNet, check_tangent
from fewstep.core.trigflow import HALF_PI, lognormal_times, trigflow_noise
from helpers import MU, SD, S, f_star, randomize_zero_params_, v_star

F64 = torch.float64


def q(t, s=S, sd=SD):
    return s ** 2 * torch.cos(t) ** 2 + sd ** 2 * torch.sin(t) ** 2


def col(t, x):
    return torch.as_tensor(t, dtype=x.dtype).expand(x.shape[0]).reshape(-1, *[1] * (x.ndim - 1))


def phi(x, r, t, mu=MU, s=S, sd=SD):
    """The exact TrigFlow flow map `Phi_{t->r}(x) = cos r mu + (x - cos t mu) sqrt(q(r) / q(t))` (docs/math.md#gaussian-closed-forms)."""
    r, t = col(r, x), col(t, x)
    return torch.cos(r) * mu + (x - torch.cos(t) * mu) * (q(r, s, sd) / q(t, s, sd)).sqrt()


class ExactU(nn.Module):
    """The exact average velocity of N(mu, s^2 I) data as a MeanFlow network
    `F(x / sd, t, r=r) = u*(x, r, t) / sd`, with mu and log s as parameters (so that the loss has a
    gradient), and `u*(x, t, t) = v*(x, t)` at r = t."""

    num_classes = 0
    second_time = True

    def __init__(self, mu=MU, s=S, sd=SD):
        super().__init__()
        self.mu = nn.Parameter(mu.clone())
        self.log_s = nn.Parameter(torch.tensor(math.log(s), dtype=F64))
        self.sd = sd

    def forward(self, y, t, labels=None, r=None):
        x, s = self.sd * y, self.log_s.exp()
        r = t if r is None else r
        dt = col(t - r, x)
        apart = dt > 1e-9
        jump = (x - phi(x, r, t, self.mu, s, self.sd)) / (dt + (~apart).to(dt.dtype))  # no 0 / 0 where r = t
        return torch.where(apart, jump, v_star(x, t, mu=self.mu, s=s, sd=self.sd)) / self.sd


def gaussian_batch(n, seed=0, mu=MU, s=S):
    g = torch.Generator().manual_seed(seed)
    x0 = mu + s * torch.randn(n, mu.numel(), generator=g, dtype=F64)
    return x0, SD * torch.randn(n, mu.numel(), generator=g, dtype=F64)


def pairs(n, seed=0):
    """(r, t) with r < t across (0, pi/2), some r = 0 and some t = pi/2."""
    g = torch.Generator().manual_seed(seed)
    t = 0.05 + (HALF_PI - 0.05) * torch.rand(n, generator=g, dtype=F64)
    r = t * torch.rand(n, generator=g, dtype=F64)
    t[:2], r[2:4] = HALF_PI, 0.0
    return r, t


# ---------------------------------------------------------------------------------------------
# The oracle itself


def test_exact_u_is_the_average_velocity():
    x0, z = gaussian_batch(64)
    r, t = pairs(64)
    x = trigflow_noise(x0, z, t)
    u = ExactU()
    with torch.no_grad():
        torch.testing.assert_close(x - col(t - r, x) * SD * u(x / SD, t, r=r), phi(x, r, t), rtol=0, atol=1e-12)
        # at r = t the instantaneous velocity, also as the limit r -> t
        torch.testing.assert_close(SD * u(x / SD, t), v_star(x, t), rtol=0, atol=1e-14)
        near = SD * u(x / SD, t, r=t - 1e-6)
        torch.testing.assert_close(near, v_star(x, t), rtol=0, atol=1e-5)
        # the flow map to 0 is the consistency function f*
        torch.testing.assert_close(phi(x, torch.zeros_like(t), t), f_star(x, t), rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# The loss and its gradient vanish at the exact u


def _grads(net):
    return torch.cat([p.grad.reshape(-1) for p in net.parameters()])


@pytest.mark.parametrize("jvp_mode", JVP_MODES)
def test_loss_and_gradient_vanish_at_exact_u_with_exact_velocity(jvp_mode):
    """With the exact velocity v* as v (distillation from an exact teacher), u* satisfies the MeanFlow
    identity exactly: every per-sample residual is zero, so loss and gradient are zero. Perturbing
    mu or s moves both away from zero (the check is not vacuous)."""
    x0, z = gaussian_batch(256, seed=1)
    r, t = pairs(256, seed=1)
    r[::3] = t[::3]  # r = t samples: the flow-matching part
    x_t = trigflow_noise(x0, z, t)
    v = v_star(x_t, t)
    for p in (0.0, 1.0):
        net = ExactU()
        loss, stats = meanflow_loss(net, x_t, r, t, v, SD, adaptive_p=p, jvp_mode=jvp_mode)
        assert stats["mse"] < 1e-24, stats
        loss.mean().backward()
        assert _grads(net).abs().max() < 1e-10

        bad = ExactU(mu=MU + 0.1, s=S * 1.2)
        loss, stats = meanflow_loss(bad, x_t, r, t, v, SD, adaptive_p=p, jvp_mode=jvp_mode)
        assert stats["mse"] > 1e-3
        loss.mean().backward()
        assert _grads(bad).abs().max() > 1e-2


@pytest.mark.parametrize("adaptive_p", [0.0, 1.0])
def test_gradient_vanishes_in_expectation_from_data(adaptive_p):
    """Training from data, v is the conditional velocity `cos t z - sin t x0`: the per-sample residual
    is not zero, but given x_t it is a zero-mean Gaussian (the target is affine in v, and E[v | x_t] = v*),
    so the expected gradient vanishes at u*, with or without the adaptive weight (a function of the
    residual's norm: even). A Monte Carlo batch of 2^17 shows it against a perturbed u."""
    n = 2 ** 17
    x0, _ = gaussian_batch(n, seed=2)
    method = MeanFlow(adaptive_p=adaptive_p)
    grads = {}
    for name, net in (("exact", ExactU()), ("perturbed", ExactU(mu=MU + 0.05, s=S * 1.1))):
        torch.manual_seed(3)
        loss, _ = method(net, x0)
        loss.mean().backward()
        grads[name] = _grads(net)
    assert grads["perturbed"].norm() > 0.05
    assert grads["exact"].norm() < 0.05 * grads["perturbed"].norm(), grads


# ---------------------------------------------------------------------------------------------
# The JVP


def _tiny(kind):
    torch.manual_seed(0)
    if kind == "mlp":
        net = MLP(4, 16, 2, second_time=True, adaptive_weight=False)
    else:
        net = UNet(2, 8, 8, (1, 2), 1, attn_resolutions=(4,), attn_heads=2, adaptive_weight=False, second_time=True)
    return randomize_zero_params_(net).double()


@pytest.mark.parametrize("jvp_mode", JVP_MODES)
@pytest.mark.parametrize("kind", ["mlp", "unet"])
def test_jvp_matches_finite_differences(kind, jvp_mode):
    """`(t - r) dF/dt` along (v, 0, 1) on (x_t, r, t) against a float64 central difference of
    `h -> F((x_t + h v) / sd, t + h, r)` (r held fixed), on networks whose every weight is nonzero."""
    net = _tiny(kind)
    shape = (6, 4) if kind == "mlp" else (6, 2, 8, 8)
    g = torch.Generator().manual_seed(4)
    x_t, v = torch.randn(shape, generator=g, dtype=F64), torch.randn(shape, generator=g, dtype=F64)
    t = torch.tensor([0.3, 0.7, 1.0, 1.2, 1.5, HALF_PI], dtype=F64)
    r = t * torch.tensor([0.0, 0.5, 0.9, 0.2, 1.0, 0.4], dtype=F64)  # r = 0, r = t, and between

    F_theta, jvp_out = meanflow_jvp(net, x_t, r, t, v, SD, mode=jvp_mode)
    assert F_theta.requires_grad and not jvp_out.requires_grad
    h = 1e-5

    def F_at(k):
        with torch.no_grad():
            return net((x_t + k * v) / SD, t + k, r=r)

    expect = col(t - r, x_t) * (F_at(h) - F_at(-h)) / (2 * h)
    err = (jvp_out - expect).flatten(1).norm(dim=1) / expect.flatten(1).norm(dim=1).clamp_min(1e-30)
    assert err[torch.arange(6) != 4].max() < 1e-6, err
    assert jvp_out[4].abs().max() == 0  # r = t: no correction
    with torch.no_grad():
        torch.testing.assert_close(F_theta.detach(), net(x_t / SD, t, r=r), rtol=1e-12, atol=1e-12)
    # r carries no tangent, even when the caller passes t itself as r
    _, same = meanflow_jvp(net, x_t, t, t, v, SD, mode=jvp_mode)
    assert same.abs().max() == 0


@pytest.mark.parametrize("jvp_mode", JVP_MODES)
def test_split_batch_is_one_pass(jvp_mode):
    """`meanflow_loss` sends only the r != t samples through the pass with tangents and the others
    through a plain forward: per-sample losses (in the batch's order) and gradients equal one pass
    of the whole batch."""
    net = _tiny("mlp")
    g = torch.Generator().manual_seed(6)
    x_t, v = torch.randn(10, 4, generator=g, dtype=F64), torch.randn(10, 4, generator=g, dtype=F64)
    t = 0.1 + 1.4 * torch.rand(10, generator=g, dtype=F64)
    r = torch.where(torch.rand(10, generator=g) < 0.4, t * 0.3, t)
    assert 0 < (r != t).sum() < 10
    loss, _ = meanflow_loss(net, x_t, r, t, v, SD, jvp_mode=jvp_mode)
    loss.sum().backward()
    split_grads = _grads(net)
    net.zero_grad()
    F_theta, jvp_out = meanflow_jvp(net, x_t, r, t, v, SD, mode=jvp_mode)  # the whole batch at once
    mse = (F_theta - (v / SD - jvp_out)).square().mean(1)
    expect = mse / (mse.detach() + 1e-3)
    expect.sum().backward()
    torch.testing.assert_close(loss, expect, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(split_grads, _grads(net), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Sampling


@pytest.mark.parametrize("times", [[HALF_PI], [HALF_PI, 1.1], [HALF_PI, 1.2, 0.6]])
def test_sampling_with_exact_u_is_the_exact_flow_map(times):
    """Each jump x <- x - (t - s) u*(x, s, t) is exactly Phi_{t->s}; composed, they are Phi_{pi/2->0}
    whatever the intermediate times (and no noise is drawn)."""
    noise = torch.randn(512, 4, dtype=F64, generator=torch.Generator().manual_seed(5))
    sampler = MeanFlow().sampler(ExactU())
    x = sampler.sample(noise, sampler.schedule(times=times), generator=torch.Generator().manual_seed(0))
    expect = phi(SD * noise, 0.0, HALF_PI)
    torch.testing.assert_close(x, expect, rtol=0, atol=1e-12)
    assert abs(x.std(0) / S - 1).max() < 0.15 and (x.mean(0) - MU).abs().max() < 0.05  # the data's law
    # the consistency function (editing) is the flow map to 0
    t = torch.full((512,), 1.1, dtype=F64)
    torch.testing.assert_close(sampler.consistency_fn()(SD * noise, t), f_star(SD * noise, t), rtol=0,
                               atol=1e-12)


@pytest.mark.parametrize("steps", [1, 2])
def test_public_sample_api_with_exact_u(steps):
    """`fewstep.apps.generate.sample` (what `fewstep sample` and the previews run) samples MeanFlow through
    its own `sample`: the exact flow map of the same noise (float32 samples)."""
    x = generate_sample(ExactU(), MeanFlow(), (4,), 300, steps=steps, seed=7, batch_size=300)
    noise = torch.randn((300, 4), generator=torch.Generator().manual_seed(batch_seed(7, 0)))
    torch.testing.assert_close(x, phi(SD * noise.double(), 0.0, HALF_PI).float(), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Training approaches the exact u


def test_training_brings_an_mlp_close_to_exact_u():
    """400 Adam steps of MeanFlow (paper defaults) on N(mu, 0.2^2 I) in 2-D.

    Measured over seeds 0-4: relative error of u_theta against u* at (r, t) = (0, pi/2) at most 0.018,
    (0, 1) at most 0.033, (0.5, 1.2) and (1, 1.1) at most 0.01; the untrained network has 0.5-1.7.
    Bounds: 3x the worst measured error, and at least a 10x reduction.
    """
    torch.manual_seed(0)
    mu, s = MU[:2].float(), S
    net = MLP(2, 64, 2, second_time=True, adaptive_weight=False)
    cases = {(0.0, HALF_PI): 0.06, (0.0, 1.0): 0.1, (0.5, 1.2): 0.03, (1.0, 1.1): 0.03}
    g = torch.Generator().manual_seed(1)
    x0, z = mu + s * torch.randn(4096, 2, generator=g), SD * torch.randn(4096, 2, generator=g)

    def rel_errors():
        out = {}
        for (r0, t0) in cases:
            t, r = torch.full((4096,), t0), torch.full((4096,), r0)
            x = trigflow_noise(x0, z, t)
            with torch.no_grad():
                u = SD * net(x / SD, t, r=r)
            us = (x - phi(x, r, t, mu, s)) / (t0 - r0)
            out[(r0, t0)] = ((u - us).square().sum(1).mean() / us.square().sum(1).mean()).item()
        return out

    before = rel_errors()
    method, steps = MeanFlow(), 400
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1 - k / steps)
    for step in range(steps):
        loss, stats = method(net, mu + s * torch.randn(256, 2), None, step)
        opt.zero_grad(set_to_none=True)
        loss.mean().backward()
        opt.step()
        sched.step()
    assert torch.isfinite(loss).all()
    after = rel_errors()
    for key, bound in cases.items():
        assert after[key] < bound and after[key] < before[key] / 10, (key, before[key], after[key])


# ---------------------------------------------------------------------------------------------
# The networks' second time


@pytest.mark.parametrize("make, shape", [
    (lambda **k: MLP(3, 16, 2, **k), (5, 3)),
    (lambda **k: UNet(2, 8, 8, (1, 2), 1, attn_resolutions=(4,), **k), (5, 2, 8, 8)),
    (lambda **k: DiT(2, 8, 2, 32, 2, 4, **k), (5, 2, 8, 8)),
], ids=["mlp", "unet", "dit"])
def test_second_time_input(make, shape):
    torch.manual_seed(0)
    plain = make()
    two = make(second_time=True)
    assert two.second_time and not plain.second_time
    # weights without the r embedding load (it keeps its zero init): the same function for every r
    missing, unexpected = two.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == [] and all(k.startswith("time_emb.interval.") for k in missing) and missing
    x, t = torch.randn(shape), torch.rand(5) * HALF_PI
    r = t * torch.rand(5)
    torch.testing.assert_close(two(x, t, r=r), plain(x, t), rtol=0, atol=0)
    randomize_zero_params_(two)
    assert (two(x, t, r=r) - two(x, t)).abs().max() > 1e-3  # r matters once trained
    torch.testing.assert_close(two(x, t), two(x, t, r=t.clone()), rtol=0, atol=0)  # r=None means r = t
    with pytest.raises(ValueError, match="second_time=True"):
        plain(x, t, r=r)
    # the tangent engine carries d(t - r)/dt = 1 through the network (r has no tangent)
    report = check_tangent(two, (x, t), kwargs={"r": r})
    assert report["rel_err_fd"] < 1e-6 and report["first_bad_op"] is None, report


# ---------------------------------------------------------------------------------------------
# (r, t) sampling, CFG, config


def test_time_pairs():
    torch.manual_seed(0)
    r, t = meanflow_times(20000, -0.4, 1.0, 0.25, SD)
    assert (r <= t).all() and (t < HALF_PI).all() and (r > 0).all()
    assert (r < t).sum() == 5000  # exactly a quarter (the same forward passes on every process)
    # the noise level of each draw is log-normal(-0.4, 1.0): the paper's logit-normal, in sigma
    a, _ = meanflow_times(20000, -0.4, 1.0, 0.0, SD)
    log_sigma = (SD * torch.tan(a)).log()
    # t is the max of two draws: P(log sigma <= m) = Phi((m + 0.4) / 1)^2
    for m in (-1.0, -0.4, 0.5):
        expect = (0.5 * (1 + math.erf((m + 0.4) / math.sqrt(2)))) ** 2
        assert abs((log_sigma <= m).float().mean().item() - expect) < 0.015


class _ClassVelocity(nn.Module):
    """A velocity network u(x, t, t | c) = c (a constant per class; the null class is 3)."""

    num_classes, second_time = 3, True

    def forward(self, y, t, labels=None, r=None):
        return torch.zeros_like(y) + labels.to(y.dtype)[:, None] / SD


def test_cfg_target():
    """v~ = w v + kappa u(x, t, t | c) + (1 - w - kappa) u(x, t, t | null) (paper Eq. 16, 21); samples
    with the null label (dropped) and outside the interval keep v."""
    net, w, kappa = _ClassVelocity(), 2.5, 0.3
    labels = torch.tensor([0, 1, 2, 3, 1])
    x_t, t, v = torch.randn(5, 2), torch.rand(5), torch.randn(5, 2)
    out = guided_velocity(net, x_t, t, v, labels, SD, w, kappa)
    expect = w * v + kappa * labels[:, None].float() + (1 - w - kappa) * 3.0
    expect[3] = v[3]
    torch.testing.assert_close(out, expect)
    active = torch.tensor([True, False, True, True, True])
    out = guided_velocity(net, x_t, t, v, labels, SD, w, kappa, active=active)
    expect[1] = v[1]
    torch.testing.assert_close(out, expect)


def test_cfg_target_does_not_depend_on_dropout():
    """Defect 3: the guided target comes from the network in eval mode (the official code, FastGen),
    so two dropout seeds give the same target, that of the eval-mode network; the modes are restored."""
    net = randomize_zero_params_(MLP(2, 32, 2, dropout=0.5, num_classes=3, second_time=True), seed=4).double()
    net.train()
    net.blocks[0].eval()  # a mixed-mode network comes back as it was, module by module
    before = [m.training for m in net.modules()]
    g = torch.Generator().manual_seed(0)
    x_t, v = torch.randn(6, 2, generator=g, dtype=F64), torch.randn(6, 2, generator=g, dtype=F64)
    t, labels = torch.rand(6, generator=g, dtype=F64), torch.tensor([0, 1, 2, 0, 1, 2])
    targets = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        targets.append(guided_velocity(net, x_t, t, v, labels, SD, 2.0))
    assert [m.training for m in net.modules()] == before
    torch.testing.assert_close(targets[0], targets[1], rtol=0, atol=0)
    torch.testing.assert_close(targets[0], guided_velocity(net.eval(), x_t, t, v, labels, SD, 2.0), rtol=0, atol=0)
    # Not vacuous: in train mode this network's velocities do depend on the dropout draws.
    net.train()
    with torch.no_grad():
        a, b = (net(x_t / SD, t, labels, r=t) for _ in range(2))
    assert (a - b).abs().max() > 1e-3


def test_py_meanflow_cifar10_time_mapping():
    """Defect 4: py-meanflow draws t = sigmoid(N(P_mean, P_std)) with z_t = (1 - t) x + t e (t = 1 is
    noise); its noise level is sigma = t / (1 - t), TrigFlow time arctan(sigma / sigma_d). With the
    same normal draws, fewstep's times for `PY_MEANFLOW_CIFAR10` are those times; +2 would mirror them."""
    n, p_mean, p_std = 20000, -2.0, 2.0
    g = torch.Generator().manual_seed(0)
    t_lin = torch.sigmoid(torch.randn(n, generator=g, dtype=F64) * p_std + p_mean)  # py-meanflow's sampler
    as_trigflow = torch.atan(t_lin / (1 - t_lin) / SD)
    g = torch.Generator().manual_seed(0)
    ours = lognormal_times(n, PY_MEANFLOW_CIFAR10["p_mean"], PY_MEANFLOW_CIFAR10["p_std"], SD, dtype=F64,
                           generator=g)
    torch.testing.assert_close(ours, as_trigflow, rtol=1e-12, atol=1e-14)
    # The distributions, from independent draws (the mapping, not the shared draws, is what matters):
    q = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=F64)
    mirrored = torch.atan((1 - t_lin) / t_lin / SD)  # the reversed time, which p_mean = +2 would match
    ours_q = torch.quantile(lognormal_times(n, -2.0, 2.0, SD, dtype=F64), q)
    assert (ours_q - torch.quantile(as_trigflow, q)).abs().max() < 0.03
    assert (ours_q - torch.quantile(mirrored, q)).abs().max() > 0.3
    method = MeanFlow(**PY_MEANFLOW_CIFAR10)
    assert (method.p_mean, method.p_std, method.ratio_r_neq_t, method.adaptive_p) == (-2.0, 2.0, 0.75, 0.75)


def test_cfg_training_runs_and_config_checks():
    net = MLP(2, 16, 2, num_classes=3, second_time=True)
    method = MeanFlow(guidance=2.0, guidance_kappa=0.5, label_dropout=0.1, guidance_interval=[0.0, 1.2])
    loss, _ = method(net, torch.randn(32, 2), torch.randint(0, 3, (32,)))
    loss.mean().backward()
    assert loss.shape == (32,) and torch.isfinite(loss).all()
    with pytest.raises(ValueError, match="class labels"):
        method(net, torch.randn(8, 2))
    with pytest.raises(ValueError, match="label_dropout"):
        MeanFlow(guidance=2.0)
    with pytest.raises(ValueError, match="jvp_mode"):
        MeanFlow(jvp_mode="fd")
    with pytest.raises(ValueError, match="network.second_time=true"):
        MeanFlow()(MLP(2, 16, 2), torch.randn(8, 2))


# ---------------------------------------------------------------------------------------------
# Build, train, sample: the Python API and the CLI


def test_build_fit_and_cli_sample(tmp_path, capsys):
    from fewstep.apps.train import train
    from fewstep.cli import main
    from fewstep.config import config_from_dict
    from fewstep.apps.generate import Schedule, generate, load_model

    cfg = config_from_dict({
        "data": {"name": "8gaussians"}, "network": {"width": 32, "depth": 2, "second_time": True},
        "method": {"name": "meanflow"}, "optim": {"lr": 2e-3},
        "train": {"steps": 15, "batch_size": 64, "sample_every": 0, "ckpt_every": 0, "progress": False,
                  "num_samples": 16, "log_every": 5}})
    summary = train(cfg, tmp_path / "run")
    assert set(summary["metrics"]) == {"1-step", "2-step"}
    model = load_model(tmp_path / "run")
    assert model.sampler.consistency_fn() is not None and model.net.second_time and model.method.name == "meanflow"
    for steps, times in ((1, (HALF_PI,)), (2, (HALF_PI, 1.1))):
        x, nfe, _ = generate(model, Schedule("multistep", steps, times), 64, progress=False)
        assert x.shape == (64, 2) and nfe == steps and torch.isfinite(x).all()
    out = tmp_path / "one.png"
    assert main(["sample", str(tmp_path / "run"), "--steps", "1", "--num", "16", "--device", "cpu",
                 "--out", str(out), "--npz", str(tmp_path / "one.npz")]) == 0
    assert out.exists() and "NFE 1" in capsys.readouterr().out
