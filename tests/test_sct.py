"""Continuous-time consistency training (sCT, docs/math.md#sct-and-scd), checked against math:

- the rearranged JVP (docs/math.md#the-jvp-rearrangement) against central finite differences along the trajectory;
- the loss gradient (docs/math.md#the-loss) against the analytic continuous-time gradient, with the tangent
  computed independently by finite differences of the consistency function;
- Gaussian data (docs/math.md#gaussian-closed-forms), where the exact velocity and consistency function are known in
  closed form, both for the formulas themselves and for a short sCT training run.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fewstep.methods import SCT
from fewstep.methods.scm import (
    JVP_MODES,
    normalize_tangent,
    scm_jvp,
    scm_loss,
    scm_tangent,
    tangent_warmup,
)
from fewstep.networks import MLP, UNet
from fewstep.core.trigflow import (
    HALF_PI,
    consistency_from_velocity,
    trigflow_consistency,
    trigflow_noise,
    trigflow_velocity,
)
from helpers import ConsistencyOracle, d_star, f_star, randomize_zero_params_, v_star

SIGMA_D = 0.5


F64 = torch.float64




def _tiny_unet(**kw) -> UNet:
    cfg = dict(img_channels=2, img_resolution=8, model_channels=8, channel_mult=(1, 2), num_blocks=1,
               attn_resolutions=(4,), attn_heads=2, adaptive_weight=False)
    cfg.update(kw)
    return UNet(**cfg)


def _tiny_mlp(**kw) -> MLP:
    cfg = dict(dim=3, width=16, depth=2, adaptive_weight=False)
    cfg.update(kw)
    return MLP(**cfg)


def _net64(make, seed=0):
    torch.manual_seed(seed)
    return randomize_zero_params_(make(), seed=seed).double()


def _data(net, n, seed=0):
    """Fixed x0 (std ~1, wider than sigma_d on purpose) and z ~ N(0, sigma_d^2) in float64."""
    shape = (n, 2, 8, 8) if isinstance(net, UNet) else (n, 3)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=F64), torch.randn(shape, generator=g, dtype=F64) * SIGMA_D


def _rel_err(a, b):
    """Per-sample relative error ||a - b|| / ||b||."""
    return (torch.linalg.vector_norm((a - b).flatten(1), dim=1)
            / torch.linalg.vector_norm(b.flatten(1), dim=1))


# Times including both ends of (0, pi/2), where the cos t sin t factors are small.
T_GRID = [2e-3, 0.05, 0.4, 0.785, 1.2, 1.5, HALF_PI - 2e-3]
FD_H = 1e-5  # central differences in float64: truncation ~h^2, rounding ~1e-16/h, both << 1e-3


# ---------------------------------------------------------------------------------------------
# docs/math.md#the-jvp-rearrangement: the JVP tangent equals sigma_d cos t sin t d/dt F(x_t(t) / sigma_d, t)


@pytest.mark.parametrize("make", [_tiny_unet, _tiny_mlp], ids=["unet_attn", "mlp"])
def test_jvp_matches_finite_difference_along_trajectory(make):
    net = _net64(make)
    n = len(T_GRID)
    x0, z = _data(net, n)
    t = torch.tensor(T_GRID, dtype=F64)
    x_t, dxdt = trigflow_noise(x0, z, t), trigflow_velocity(x0, z, t)

    F_minus, jvp_out = scm_jvp(net, x_t, t, dxdt, SIGMA_D)

    def along(tt):  # t -> F(x_t(t) / sigma_d, t), same x0 and z
        with torch.no_grad():
            return net(trigflow_noise(x0, z, tt) / SIGMA_D, tt)

    dFdt = (along(t + FD_H) - along(t - FD_H)) / (2 * FD_H)
    cs = (torch.cos(t) * torch.sin(t)).reshape(-1, *[1] * (x0.ndim - 1))
    expect = SIGMA_D * cs * dFdt
    assert expect.abs().max() > 0
    assert _rel_err(jvp_out, expect).max() <= 1e-3, _rel_err(jvp_out, expect)
    # In practice the agreement is far tighter than the 1e-3 the spec asks for.
    assert _rel_err(jvp_out, expect).max() <= 1e-6
    # The primal output is the network itself at (x_t / sigma_d, t).
    with torch.no_grad():
        torch.testing.assert_close(F_minus, net(x_t / SIGMA_D, t), rtol=1e-12, atol=1e-12)

    # Every mode of fewstep.jvp.jvp gives the same primal and tangent; the primal carries a graph,
    # the tangent none.
    for mode in JVP_MODES:
        F_theta, jvp_mode = scm_jvp(net, x_t, t, dxdt, SIGMA_D, mode=mode)
        assert F_theta.requires_grad and not jvp_mode.requires_grad, mode
        torch.testing.assert_close(F_theta.detach(), F_minus.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(jvp_mode, jvp_out, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("make", [_tiny_unet, _tiny_mlp], ids=["unet_attn", "mlp"])
def test_tangent_is_cos_t_times_df_dt(make):
    """docs/math.md#the-loss: g (before normalization, r = 1) = cos(t) d/dt f^-(x_t(t), t), the derivative
    of the consistency function along the trajectory, here by finite differences."""
    net = _net64(make, seed=1)
    x0, z = _data(net, len(T_GRID), seed=1)
    t = torch.tensor(T_GRID, dtype=F64)
    x_t, dxdt = trigflow_noise(x0, z, t), trigflow_velocity(x0, z, t)
    F_minus, jvp_out = scm_jvp(net, x_t, t, dxdt, SIGMA_D)
    g = scm_tangent(x_t, t, dxdt, F_minus, jvp_out, SIGMA_D, r=1.0)

    def f_along(tt):
        with torch.no_grad():
            return trigflow_consistency(net, trigflow_noise(x0, z, tt), tt, SIGMA_D)

    dfdt = (f_along(t + FD_H) - f_along(t - FD_H)) / (2 * FD_H)
    expect = torch.cos(t).reshape(-1, *[1] * (x0.ndim - 1)) * dfdt
    assert _rel_err(g, expect).max() <= 1e-6, _rel_err(g, expect)

    # r = 0 (start of the tangent warmup) drops exactly the second term.
    g0 = scm_tangent(x_t, t, dxdt, F_minus, jvp_out, SIGMA_D, r=0.0)
    cos = torch.cos(t).reshape(-1, *[1] * (x0.ndim - 1))
    torch.testing.assert_close(g0, -cos.square() * (SIGMA_D * F_minus - dxdt), rtol=1e-14, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# docs/math.md#the-loss: the loss gradient equals the analytic continuous-time gradient


@pytest.mark.parametrize("jvp_mode", JVP_MODES)
@pytest.mark.parametrize("make", [_tiny_unet, _tiny_mlp], ids=["unet_attn", "mlp"])
def test_loss_gradient_equals_continuous_time_gradient(make, jvp_mode):
    net = _net64(make, seed=2)
    params = [p for p in net.parameters()]
    n = len(T_GRID)
    x0, z = _data(net, n, seed=2)
    t = torch.tensor(T_GRID, dtype=F64)
    x_t, dxdt = trigflow_noise(x0, z, t), trigflow_velocity(x0, z, t)
    D = x0[0].numel()
    bc = lambda v: v.reshape(-1, *[1] * (x0.ndim - 1))  # noqa: E731

    loss, _ = scm_loss(net, x_t, t, dxdt, SIGMA_D, r=1.0, tangent_norm="none", adaptive_weight=False,
                       jvp_mode=jvp_mode)
    grad_loss = torch.cat([gr.flatten() for gr in torch.autograd.grad(loss.mean(), params)])

    # df^-/dt by central differences of t -> f(x_t(t), t), independent of the JVP code.
    def f_along(tt):
        with torch.no_grad():
            return trigflow_consistency(net, trigflow_noise(x0, z, tt), tt, SIGMA_D)

    dfdt = (f_along(t + FD_H) - f_along(t - FD_H)) / (2 * FD_H)

    # L = (1/D)||F_theta - F^- - g||^2 with F_theta - F^- = 0 in value and g = cos t df^-/dt,
    # so grad L = -(2/D) cos t (df^-/dt) . dF_theta/dtheta: the gradient of this surrogate.
    F_theta = net(x_t / SIGMA_D, t)
    surrogate = (-(2.0 / D) * bc(torch.cos(t)) * F_theta * dfdt).flatten(1).sum(1).mean()
    grad_surrogate = torch.cat([gr.flatten() for gr in torch.autograd.grad(surrogate, params)])
    assert grad_surrogate.norm() > 0
    rel = (grad_loss - grad_surrogate).norm() / grad_surrogate.norm()
    assert rel < 1e-4, rel.item()

    # The paper's form: grad of E[(2/D) w(t) f_theta . df^-/dt] with w(t) = 1/(sigma_d tan t),
    # since d f_theta / d theta = -sin(t) sigma_d d F_theta / d theta.
    f_theta = trigflow_consistency(net, x_t, t, SIGMA_D)
    w = 1.0 / (SIGMA_D * torch.tan(t))
    paper = ((2.0 / D) * bc(w) * f_theta * dfdt).flatten(1).sum(1).mean()
    grad_paper = torch.cat([gr.flatten() for gr in torch.autograd.grad(paper, params)])
    rel_paper = (grad_paper - grad_surrogate).norm() / grad_surrogate.norm()
    assert rel_paper < 1e-10, rel_paper.item()


def test_loss_value_is_mse_of_normalized_tangent():
    """F_theta - F^- is zero in value, so the per-sample loss is ||normalize(g)||^2 / D; with
    adaptive weighting it is exp(w) * that - w (docs/math.md#adaptive-weighting)."""
    net = _net64(lambda: _tiny_mlp(adaptive_weight=True), seed=3)
    x0, z = _data(net, len(T_GRID), seed=3)
    t = torch.tensor(T_GRID, dtype=F64)
    x_t, dxdt = trigflow_noise(x0, z, t), trigflow_velocity(x0, z, t)
    F_minus, jvp_out = scm_jvp(net, x_t, t, dxdt, SIGMA_D)
    g = scm_tangent(x_t, t, dxdt, F_minus, jvp_out, SIGMA_D)
    for kind, c in [("l2", 0.1), ("rms", 0.1), ("clip", 0.1), ("none", 0.1), ("l2", 0.0)]:
        gn = normalize_tangent(g, kind, c)
        mse = gn.square().mean(1)
        loss, stats = scm_loss(net, x_t, t, dxdt, SIGMA_D, tangent_norm=kind, norm_const=c,
                               adaptive_weight=False)
        torch.testing.assert_close(loss, mse, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(stats["tangent_norm"], g.norm(dim=1).mean(), rtol=1e-12, atol=0)
        loss_w, stats_w = scm_loss(net, x_t, t, dxdt, SIGMA_D, tangent_norm=kind, norm_const=c,
                                   adaptive_weight=True)
        w = net.adaptive_weight(t)
        assert w.abs().min() > 0  # randomized head
        torch.testing.assert_close(loss_w, torch.exp(w) * mse - w, rtol=1e-12, atol=1e-14)


def test_normalize_tangent_formulas():
    g = torch.tensor([[3.0, 4.0, 0.0, 0.0], [0.5, -2.0, 1.0, 0.2]], dtype=F64)
    norms = torch.tensor([5.0, math.sqrt(0.25 + 4 + 1 + 0.04)], dtype=F64)
    torch.testing.assert_close(normalize_tangent(g, "l2", 0.1), g / (norms[:, None] + 0.1))
    torch.testing.assert_close(normalize_tangent(g, "rms", 0.1), g / (norms[:, None] / 2 + 0.1))
    torch.testing.assert_close(normalize_tangent(g, "clip"), g.clamp(-1, 1))
    assert torch.equal(normalize_tangent(g, "none"), g)
    # With c = 0 every l2-normalized tangent has unit norm; c > 0 keeps it below 1.
    assert torch.allclose(normalize_tangent(g, "l2", 0.0).norm(dim=1), torch.ones(2, dtype=F64))
    assert (normalize_tangent(g, "l2", 0.1).norm(dim=1) < 1).all()
    with pytest.raises(ValueError, match="tangent_norm"):
        normalize_tangent(g, "bogus")


def test_tangent_warmup_schedule():
    assert tangent_warmup(0, 0) == 1.0 and tangent_warmup(5, 0) == 1.0
    assert tangent_warmup(0, 100) == 0.0
    assert tangent_warmup(25, 100) == 0.25
    assert tangent_warmup(100, 100) == 1.0 and tangent_warmup(10_000, 100) == 1.0


def test_sct_config_validation():
    for kw, key in [(dict(sigma_d=0.0), "method.sigma_d"), (dict(p_std=-1.0), "method.p_std"),
                    (dict(norm_const=-0.1), "method.norm_const"), (dict(warmup_steps=-1), "method.warmup_steps"),
                    (dict(tangent_norm="l3"), "method.tangent_norm"), (dict(jvp_mode="both"), "method.jvp_mode")]:
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            SCT(**kw)


@pytest.mark.parametrize("jvp_mode", ["separate", "single"])
def test_sct_call_returns_per_sample_loss(jvp_mode):
    torch.manual_seed(0)
    net = randomize_zero_params_(MLP(dim=2, width=16, depth=1))
    x0 = torch.randn(32, 2) * 0.5
    loss, stats = SCT(jvp_mode=jvp_mode)(net, x0, None, step=0)
    assert loss.shape == (32,) and torch.isfinite(loss).all()
    assert {"mse", "tangent_norm", "w_mean"} <= set(stats)
    assert all(v.ndim == 0 and not v.requires_grad for v in stats.values())
    loss.mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    # Tangent warmup: at step 0 of a 100-step warmup, r = 0, which changes the loss.
    torch.manual_seed(1)
    l_r0, _ = SCT(jvp_mode=jvp_mode, warmup_steps=100)(net, x0, None, step=0)
    torch.manual_seed(1)
    l_r1, _ = SCT(jvp_mode=jvp_mode, warmup_steps=100)(net, x0, None, step=100)
    assert not torch.allclose(l_r0, l_r1)


# ---------------------------------------------------------------------------------------------
# docs/math.md#gaussian-closed-forms: Gaussian data N(mu, s^2 I), where everything is known in closed form


def _bc(t, x):
    return t.reshape(-1, *[1] * (x.ndim - 1))


def _q(t, s, sd=SIGMA_D):
    return s**2 * torch.cos(t) ** 2 + sd**2 * torch.sin(t) ** 2


def posterior_mean(x, t, mu, s, sd=SIGMA_D):
    """E[x0 | x_t = x] by Gaussian conditioning: Cov(x0, x_t) = s^2 cos t, Var(x_t) = q(t)."""
    t = _bc(t, x)
    return mu + s**2 * torch.cos(t) / _q(t, s, sd) * (x - torch.cos(t) * mu)


class VelocityOracle(nn.Module):
    """`F(x / sigma_d, t)` with `sigma_d F = v*`: the exact diffusion model (docs/math.md#trigflow)."""

    def __init__(self, mu, s, sd=SIGMA_D):
        super().__init__()
        self.register_buffer("mu", mu)
        self.s, self.sd = s, sd

    def forward(self, x, t, labels=None):
        return v_star(x * self.sd, t, mu=self.mu, s=self.s, sd=self.sd) / self.sd


GAUSS_CASES = [(0.0, 0.3), (0.0, 0.8), (0.7, 0.3), (-0.4, 1.1)]  # (mu scale, s), s != sigma_d


def _gauss(mu_scale, s, dim=3, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = mu_scale * torch.tensor([1.0, -0.5, 2.0][:dim], dtype=F64)
    t = 0.05 + (HALF_PI - 0.1) * torch.rand(n, generator=g, dtype=F64)  # t in (0.05, pi/2 - 0.05)
    x = torch.cos(t)[:, None] * (mu + s * torch.randn(n, dim, generator=g, dtype=F64)) \
        + torch.sin(t)[:, None] * SIGMA_D * torch.randn(n, dim, generator=g, dtype=F64)
    return mu, t, x


@pytest.mark.parametrize("mu_scale,s", GAUSS_CASES)
def test_gaussian_velocity_is_conditional_expectation(mu_scale, s):
    """v*(x, t) = E[cos t z - sin t x0 | x_t = x] (the flow-matching target's regression), and
    one DDIM step with v* gives the posterior mean, i.e. the exact EDM denoiser (docs/math.md#trigflow and 9)."""
    mu, t, x = _gauss(mu_scale, s)
    tb = _bc(t, x)
    m = posterior_mean(x, t, mu, s)
    v_cond = torch.cos(tb) * (x - torch.cos(tb) * m) / torch.sin(tb) - torch.sin(tb) * m  # E[z|x] = (x - cos t m)/sin t
    torch.testing.assert_close(v_star(x, t, mu=mu, s=s), v_cond, rtol=1e-12, atol=1e-12)

    d_trig = consistency_from_velocity(x, t, v_star(x, t, mu=mu, s=s))
    torch.testing.assert_close(d_trig, m, rtol=1e-12, atol=1e-12)
    # docs/math.md#trigflow conversion: D(x_t / cos t, sigma_d tan t) with the EDM denoiser of docs/math.md#gaussian-closed-forms gives
    # the same, and v = (cos t x - D) / sin t recovers v*.
    d_edm = d_star(x / torch.cos(tb), SIGMA_D * torch.tan(t), mu=mu, s=s)
    torch.testing.assert_close(d_edm, m, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close((torch.cos(tb) * x - d_edm) / torch.sin(tb), v_star(x, t, mu=mu, s=s),
                               rtol=1e-11, atol=1e-11)
    # ... and it is NOT the consistency function when s != sigma_d (f* = D* only if cos t s/q = 1/sqrt(q)).
    assert (d_trig - f_star(x, t, mu, s)).abs().max() > 1e-3


@pytest.mark.parametrize("mu_scale,s", GAUSS_CASES)
def test_gaussian_consistency_function_matches_edm_form(mu_scale, s):
    """TrigFlow f*(x, t) equals docs/math.md#gaussian-closed-forms's EDM consistency function (boundary eps = 0) at
    x_sigma = x / cos t, sigma = sigma_d tan t, and satisfies f*(x, 0) = x."""
    mu, t, x = _gauss(mu_scale, s)
    tb = _bc(t, x)
    sig = SIGMA_D * torch.tan(tb)
    f_edm = mu + (x / torch.cos(tb) - mu) * s / torch.sqrt(s**2 + sig**2)
    torch.testing.assert_close(f_star(x, t, mu, s), f_edm, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(f_star(x, torch.zeros_like(t), mu, s), x, rtol=1e-15, atol=1e-15)
    # The consistency oracle network reproduces f* through the library's consistency function.
    net = ConsistencyOracle(mu, s)
    torch.testing.assert_close(trigflow_consistency(net, x, t, SIGMA_D), f_star(x, t, mu, s),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mu_scale,s", GAUSS_CASES)
def test_gaussian_consistency_function_constant_along_ode(mu_scale, s):
    """Integrate dx/dt = v*(x, t) from pi/2 to 0 with fine RK4 in float64: f*(x(t), t) stays
    constant and equals x(0)."""
    mu, _, _ = _gauss(mu_scale, s)
    g = torch.Generator().manual_seed(5)
    x = SIGMA_D * torch.randn(16, 3, generator=g, dtype=F64)  # x(pi/2) ~ N(0, sigma_d^2)
    n_steps = 400
    ts = torch.linspace(HALF_PI, 0.0, n_steps + 1, dtype=F64)
    f0 = f_star(x, torch.full((16,), HALF_PI, dtype=F64), mu, s)
    v = lambda xx, tt: v_star(xx, torch.full((16,), float(tt), dtype=F64), mu=mu, s=s)  # noqa: E731
    max_dev = 0.0
    for i in range(n_steps):
        t0, t1 = ts[i].item(), ts[i + 1].item()
        h = t1 - t0
        k1 = v(x, t0)
        k2 = v(x + h / 2 * k1, t0 + h / 2)
        k3 = v(x + h / 2 * k2, t0 + h / 2)
        k4 = v(x + h * k3, t1)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        max_dev = max(max_dev, (f_star(x, torch.full((16,), t1, dtype=F64), mu, s) - f0).abs().max().item())
    assert max_dev < 1e-9, max_dev
    torch.testing.assert_close(x, f0, rtol=0, atol=1e-9)


@pytest.mark.parametrize("jvp", JVP_MODES)
@pytest.mark.parametrize("mu_scale,s", GAUSS_CASES)
def test_gaussian_tangent_vanishes_along_exact_ode(mu_scale, s, jvp):
    """With the exact consistency model and dx/dt = v* (the PF-ODE), df/dt = 0, so the sCM
    tangent g = cos t df/dt computed through the JVP is ~0 (docs/math.md#sct-and-scd, issue 2 item 9)."""
    mu, t, x = _gauss(mu_scale, s, n=256, seed=6)
    net = ConsistencyOracle(mu, s)
    dxdt = v_star(x, t, mu=mu, s=s)
    F_minus, jvp_out = scm_jvp(net, x, t, dxdt, SIGMA_D, mode=jvp)
    g = scm_tangent(x, t, dxdt, F_minus, jvp_out, SIGMA_D)
    assert g.abs().max() < 1e-8, g.abs().max()
    # Not vacuous: each of the two terms of g is O(1) on its own ...
    cos = _bc(torch.cos(t), x)
    assert (cos.square() * (SIGMA_D * F_minus - dxdt)).abs().max() > 0.05
    # ... a wrong direction gives a clearly non-zero tangent ...
    F2, jvp2 = scm_jvp(net, x, t, dxdt + 0.3, SIGMA_D)
    assert scm_tangent(x, t, dxdt + 0.3, F2, jvp2, SIGMA_D).abs().max() > 1e-2
    # ... and so does the exact diffusion model (whose one-step f is the posterior mean).
    vnet = VelocityOracle(mu, s)
    F3, jvp3 = scm_jvp(vnet, x, t, dxdt, SIGMA_D)
    assert scm_tangent(x, t, dxdt, F3, jvp3, SIGMA_D).abs().max() > 1e-2


@pytest.mark.parametrize("mu_scale,s", [(0.0, 0.3), (0.7, 0.8)])
def test_gaussian_sct_tangent_is_unbiased(mu_scale, s):
    """sCT replaces v* by the conditional velocity cos t z - sin t x0. Given x_t, drawing
    x0 | x_t from the Gaussian posterior (and z = (x_t - cos t x0) / sin t), the sCT tangents
    of the exact consistency model average to ~0 (their mean is the tangent along v*), while
    each one alone is far from 0."""
    mu, t, x = _gauss(mu_scale, s, n=4, seed=7)
    n = 20_000
    g = torch.Generator().manual_seed(8)
    net = ConsistencyOracle(mu, s)
    for i in range(4):
        ti = t[i].expand(n).clone()
        xi = x[i].expand(n, 3).clone()
        tb = _bc(ti, xi)
        post_std = s * SIGMA_D * torch.sin(tb) / torch.sqrt(_q(tb, s))
        x0 = posterior_mean(xi, ti, mu, s) + post_std * torch.randn(n, 3, generator=g, dtype=F64)
        z = (xi - torch.cos(tb) * x0) / torch.sin(tb)
        torch.testing.assert_close(trigflow_noise(x0, z, ti), xi, rtol=1e-12, atol=1e-12)
        dxdt = trigflow_velocity(x0, z, ti)
        F_minus, jvp_out = scm_jvp(net, xi, ti, dxdt, SIGMA_D)
        gi = scm_tangent(xi, ti, dxdt, F_minus, jvp_out, SIGMA_D)
        se = gi.std(0) / math.sqrt(n)
        assert gi.abs().mean() > 20 * se.max()  # individual tangents are not small
        assert (gi.mean(0).abs() < 5 * se).all(), (gi.mean(0), se)


# ---------------------------------------------------------------------------------------------
# sCT training on Gaussian data approaches the closed-form consistency function


def _relative_error_to_f_star(net, s, t, n=4096, seed=123):
    """E||f_theta(x, t) - f*(x, t)||^2 / E||f*(x, t)||^2 with x ~ p_t = N(0, q(t) I), mu = 0."""
    g = torch.Generator().manual_seed(seed)
    tt = torch.full((n,), t)
    x = torch.randn(n, 2, generator=g) * torch.sqrt(_q(tt[:1], s)).item()
    with torch.no_grad():
        f = trigflow_consistency(net, x, tt, SIGMA_D)
    fs = f_star(x, tt, torch.zeros(2), s)  # linear here: x s / sqrt(q(t))
    return ((f - fs).square().sum(1).mean() / fs.square().sum(1).mean()).item()


@pytest.mark.parametrize("s", [0.3, 0.8])
def test_sct_training_learns_gaussian_consistency_function(s):
    """A short sCT run (adaptive weighting on, l2 tangent normalization, separate JVP) on
    N(0, s^2 I) in 2-D brings f_theta close to the closed-form f*(x, t) = x s / sqrt(q(t)).

    Thresholds. Measured with this setup (400 Adam steps, lr 3e-3 decayed linearly to 0,
    batch 256) over seeds 0-5 for s = 0.3 and seeds 0-2 for s = 0.8: relative error at most
    0.005 (s = 0.3) and 0.012 (s = 0.8) at t = pi/2, smaller at smaller t; the untrained model
    has ~1 at t = pi/2, ~0.25 at t = 1 and ~0.05 at t = 0.5 (near t = 0 every model is close
    to f* because f(x, 0) = x). Ratios untrained/trained were >= 15 at t = 0.5 and >= 80 at
    t >= 1. The bounds below (0.05 everywhere; ratio > 3 at t = 0.5, > 10 at t >= 1) leave a
    4x margin on the worst measured error and on the worst measured ratio.
    """
    torch.manual_seed(0)
    net = MLP(dim=2, width=64, depth=2)  # with the adaptive-weight head
    ts = [0.5, 1.0, 1.3, HALF_PI]
    before = [_relative_error_to_f_star(net, s, t) for t in ts]
    method = SCT(sigma_d=SIGMA_D)  # defaults: P_mean -1.0, P_std 1.4, l2 norm c = 0.1, adaptive weight
    assert method.adaptive_weight and method.tangent_norm == "l2"
    steps = 400
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1 - k / steps)
    for step in range(steps):
        loss, stats = method(net, torch.randn(256, 2) * s, None, step)
        opt.zero_grad(set_to_none=True)
        loss.mean().backward()
        opt.step()
        sched.step()
    assert torch.isfinite(loss).all()
    assert stats["w_mean"].abs() > 0.1  # the adaptive weighting did learn something

    after = [_relative_error_to_f_star(net, s, t) for t in ts]
    for t, b, a in zip(ts, before, after):
        assert a < 0.05, (t, a)
        assert a < b / (3 if t < 1 else 10), (t, b, a)
    # One-step samples f(sigma_d z, pi/2) have the data's spread s.
    with torch.no_grad():
        x1 = trigflow_consistency(net, SIGMA_D * torch.randn(8192, 2), torch.full((8192,), HALF_PI), SIGMA_D)
    assert abs(x1.std().item() / s - 1) < 0.1


@pytest.mark.parametrize("name", ["flow", "sct", "scd", "edm", "ict", "ct"])
def test_objectives_run_in_float64(name):
    """Times are drawn in the data's precision when it is float64 (float32 otherwise), so a
    float64 network trains with every objective (the math tests rely on it)."""
    from fewstep.methods import METHODS, make_teacher_velocity

    net = MLP(dim=3, width=16, depth=1).double()
    kwargs = {"teacher": make_teacher_velocity(MLP(dim=3, width=16, depth=1).double())} if name == "scd" else {}
    loss, _ = METHODS[name](**kwargs)(net, torch.randn(8, 3, dtype=torch.float64))
    assert loss.dtype == torch.float64 and torch.isfinite(loss).all()
    loss.mean().backward()
