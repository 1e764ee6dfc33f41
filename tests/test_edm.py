"""EDM / VE formulation (docs/math.md#edm-parameterization), the EDM -> TrigFlow conversion (docs/math.md#trigflow) and the EDM
diffusion objective, against the closed forms of Gaussian data (docs/math.md#gaussian-closed-forms), in float64."""

import math

import pytest
import torch

from fewstep.core.edm import (EPS, T_CAP, consistency_precond, edm_consistency, edm_denoiser, edm_precond,
                         edm_to_trigflow, karras_grid, karras_sigmas, trigflow_to_edm)
from fewstep.methods import METHODS, EDMDiffusion, FlowMatching
from fewstep.methods.flow import drop_labels
from fewstep.networks import MLP
from fewstep.core.ode import EDMODE, TrigFlowODE, sample_heun
from helpers import MU, S, SD, OracleEDMNet, d_star, f_star_edm, v_star


def edm_trajectory(x_start, sigma_start, sigma):
    """Exact EDM PF-ODE solution through (x_start, sigma_start), at noise level sigma."""
    return f_star_edm(x_start, sigma_start, sigma)


def _x(n=6, d=4, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# Preconditioning and grids


def test_edm_precond_values():
    sigma = torch.tensor([0.002, 0.5, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = edm_precond(sigma, SD)
    torch.testing.assert_close(c_skip, SD ** 2 / (sigma ** 2 + SD ** 2))
    torch.testing.assert_close(c_out, sigma * SD / (sigma ** 2 + SD ** 2).sqrt())
    torch.testing.assert_close(c_in, 1 / (sigma ** 2 + SD ** 2).sqrt())
    torch.testing.assert_close(c_noise, sigma.log() / 4)
    # EDM's design: unit-variance network input and effective target for data of std sigma_data,
    # Var[(x0 - c_skip (x0 + sigma n)) / c_out] = ((1 - c_skip)^2 sigma_data^2 + c_skip^2 sigma^2) / c_out^2 = 1.
    torch.testing.assert_close(c_in ** 2 * (SD ** 2 + sigma ** 2), torch.ones_like(sigma))
    torch.testing.assert_close(((1 - c_skip) ** 2 * SD ** 2 + c_skip ** 2 * sigma ** 2) / c_out ** 2,
                               torch.ones_like(sigma))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_consistency_boundary_is_exact(dtype):
    torch.manual_seed(0)
    net = MLP(4, 32, 2).to(dtype)
    x = _x().to(dtype) * 3
    assert torch.equal(edm_consistency(net, x, EPS), x)  # c_skip(eps) = 1, c_out(eps) = 0 exactly
    assert torch.equal(edm_consistency(net, x, torch.full((6,), EPS, dtype=dtype)), x)
    assert not torch.allclose(edm_consistency(net, x, 1.0), x)
    c_skip, c_out, _, _ = consistency_precond(torch.tensor([EPS, 80.0], dtype=torch.float64), SD, EPS)
    assert c_skip[0] == 1 and c_out[0] == 0
    assert math.isclose(c_out[1], SD * (80 - EPS) / math.sqrt(SD ** 2 + 80 ** 2), rel_tol=1e-15)


def test_karras_grid():
    g = karras_grid(18)
    assert g.shape == (18,) and math.isclose(g[0], EPS, rel_tol=1e-12) and math.isclose(g[-1], 80.0, rel_tol=1e-12)
    assert (g[1:] > g[:-1]).all()
    i = 5  # t_i = (eps^(1/rho) + (i-1)/(N-1) (T^(1/rho) - eps^(1/rho)))^rho, 1-based
    expected = (EPS ** (1 / 7) + (i - 1) / 17 * (80 ** (1 / 7) - EPS ** (1 / 7))) ** 7
    assert math.isclose(g[i - 1], expected, rel_tol=1e-12)
    s = karras_sigmas(18)
    assert s.shape == (19,) and s[-1] == 0 and torch.equal(s[:-1], g.flip(0))
    assert torch.equal(karras_sigmas(1), torch.tensor([80.0, 0.0], dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# EDM -> TrigFlow (docs/math.md#trigflow)


def test_converted_exact_denoiser_is_the_exact_trigflow_velocity():
    x = _x(64)
    t = torch.linspace(1e-3, math.pi / 2 - 1e-3, 64, dtype=torch.float64)
    v = edm_to_trigflow(d_star, SD)(x, t)
    torch.testing.assert_close(v, v_star(x, t), rtol=1e-10, atol=1e-12)
    # Its consistency function `cos t x_t - sin t v` is exactly D* at the matching point.
    f = torch.cos(t)[:, None] * x - torch.sin(t)[:, None] * v
    torch.testing.assert_close(f, d_star(x / torch.cos(t)[:, None], SD * torch.tan(t)), rtol=1e-10, atol=1e-12)
    # And the inverse map gives D* back from v*.
    sigma = torch.logspace(-3, 2, 64, dtype=torch.float64)
    torch.testing.assert_close(trigflow_to_edm(v_star, SD)(x, sigma), d_star(x, sigma), rtol=1e-10, atol=1e-12)


def test_conversion_is_finite_and_close_at_half_pi():
    """t = pi/2 (sigma = inf) is capped just below; the velocity stays finite and ~ v*(pi/2)."""
    x = _x()
    for dtype in (torch.float32, torch.float64):
        t = torch.full((6,), math.pi / 2, dtype=dtype)
        v = edm_to_trigflow(d_star, SD)(x.to(dtype), t)
        assert torch.isfinite(v).all()
        torch.testing.assert_close(v.double(), v_star(x, math.pi / 2), rtol=0, atol=1e-3)
    assert math.pi / 2 - T_CAP < 1e-3


def test_conversion_matches_finite_difference_of_the_converted_trajectory():
    """Map an exact EDM trajectory to TrigFlow, `x_t(t) = cos t x(sigma_d tan t)`: its central
    difference in t equals the converted velocity (independent of the closed-form v*)."""
    x_start, sigma_start = 10.0 * _x(), 10.0

    def x_t(t):
        return math.cos(t) * edm_trajectory(x_start, sigma_start, SD * math.tan(t))

    velocity = edm_to_trigflow(d_star, SD)
    h = 1e-5
    for t in (0.05, 0.4, 0.9, 1.3, 1.55):
        fd = (x_t(t + h) - x_t(t - h)) / (2 * h)
        v = velocity(x_t(t), torch.full((6,), t, dtype=torch.float64))
        err = ((fd - v).norm() / v.norm()).item()
        assert err < 1e-7, (t, err)


def test_edm_network_converted_is_a_trigflow_network():
    """For an EDM-preconditioned net, the docs/math.md#trigflow conversion is `v = -sigma_d F(x_t / sigma_d,
    ln(sigma_d tan t) / 4)`: the same parameterization with a flipped sign and another time input."""
    torch.manual_seed(0)
    net = MLP(4, 32, 2).double()
    velocity = edm_to_trigflow(lambda x, s, labels=None: edm_denoiser(net, x, s, labels, SD), SD)
    x, t = _x(), torch.linspace(0.1, 1.5, 6, dtype=torch.float64)
    expected = -SD * net(x / SD, torch.log(SD * torch.tan(t)) / 4)
    torch.testing.assert_close(velocity(x, t), expected, rtol=1e-9, atol=1e-10)


def test_converted_teacher_sampled_in_trigflow_reaches_the_edm_endpoint():
    """Heun in TrigFlow time on the converted D* lands where Heun in sigma does (the exact endpoint)."""
    noise = _x()
    x_trig, _ = sample_heun(TrigFlowODE(edm_to_trigflow(d_star, SD), SD), SD * noise,
                            torch.linspace(math.pi / 2, 0, 129, dtype=torch.float64))
    torch.testing.assert_close(x_trig, MU + S * noise, rtol=0, atol=1e-3)  # f*(x, pi/2) = mu + s z
    x_edm, _ = sample_heun(EDMODE(d_star), 80.0 * noise, karras_sigmas(128))
    torch.testing.assert_close(x_edm, edm_trajectory(80.0 * noise, 80.0, 0.0), rtol=0, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# EDM diffusion objective


def test_edm_loss_of_the_exact_denoiser_is_one():
    """With EDM weighting and data of std sigma_data, the optimal denoiser's expected loss is
    lambda(sigma) * sigma_data^2 sigma^2 / (sigma_data^2 + sigma^2) = 1 at every sigma."""
    mu = torch.tensor([0.4, -0.2, 0.0, 0.7], dtype=torch.float64)
    oracle = OracleEDMNet(mu=mu, s=SD)
    x0 = mu + SD * torch.randn(40_000, 4, dtype=torch.float64)
    torch.manual_seed(1)
    loss, stats = EDMDiffusion(adaptive_weight=False)(oracle, x0)
    assert loss.shape == (40_000,)
    # Per-sample loss is chi^2_4 / 4 (variance 1/2): the mean's std is 0.0035.
    assert abs(loss.mean().item() - 1.0) < 0.02, loss.mean().item()
    # A denoiser with the wrong mean (off by 0.3, same sigmas and noise) pays
    # lambda(sigma) (1 - c_skip)^2 0.3^2 = 0.09 sigma^2 / (sigma_data^2 (sigma^2 + sigma_data^2)) more.
    torch.manual_seed(1)
    worse, _ = EDMDiffusion(adaptive_weight=False)(OracleEDMNet(mu=mu + 0.3, s=SD), x0)
    assert worse.mean() > loss.mean() + 0.02
    assert set(stats) == {"mse", "weighted_mse"}


def test_edm_objective_trains_a_network():
    torch.manual_seed(0)
    net = MLP(4, 32, 2, num_classes=3)
    method = METHODS["edm"](adaptive_weight=True, label_dropout=0.2)
    x0, labels = torch.randn(16, 4) * 0.5, torch.randint(0, 3, (16,))
    loss, stats = method(net, x0, labels, 0)
    assert loss.shape == (16,) and torch.isfinite(loss).all() and "w_mean" in stats
    loss.mean().backward()
    assert all(p.grad is not None for p in net.parameters())
    assert all(v.ndim == 0 and not v.requires_grad for v in stats.values())


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="method.p_std"):
        EDMDiffusion(p_std=0.0)
    with pytest.raises(ValueError, match="method.label_dropout"):
        EDMDiffusion(label_dropout=1.5)
    with pytest.raises(ValueError, match="method.sigma_data"):
        EDMDiffusion(sigma_data=-1.0)
    with pytest.raises(ValueError, match="method.label_dropout"):
        FlowMatching(label_dropout=-0.1)


def test_label_dropout():
    class Net:
        num_classes = 10

    labels = torch.randint(0, 10, (20_000,))
    assert drop_labels(labels, 0.0, Net) is labels and drop_labels(None, 0.5, Net) is None
    assert (drop_labels(labels, 1.0, Net) == 10).all()
    dropped = drop_labels(labels, 0.3, Net)
    kept = dropped != 10
    assert abs((~kept).float().mean().item() - 0.3) < 0.02
    assert torch.equal(dropped[kept], labels[kept])


def test_flow_label_dropout_reaches_the_network():
    seen = []

    class Net(torch.nn.Module):
        num_classes = 5

        def forward(self, x, t, labels=None):
            seen.append(labels)
            return torch.zeros_like(x)

    FlowMatching(adaptive_weight=False, label_dropout=1.0)(Net(), torch.randn(8, 2), torch.zeros(8, dtype=torch.long))
    assert (seen[-1] == 5).all()
    FlowMatching(adaptive_weight=False)(Net(), torch.randn(8, 2), torch.zeros(8, dtype=torch.long))
    assert (seen[-1] == 0).all()
