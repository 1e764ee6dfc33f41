"""ODE samplers against the closed-form PF-ODE of Gaussian data (docs/math.md#gaussian-closed-forms), in float64.

For data `N(mu, s^2 I)` the exact TrigFlow velocity `v*` and EDM denoiser `D*` are known, and
so is the exact ODE endpoint from any start (the consistency function `f*`). Each sampler's
error against it must shrink at its order on a step-halving sequence.
"""

import math

import pytest
import torch

from fewstep.core.edm import karras_grid
from fewstep.networks import MLP
from fewstep.core.ode import (SAMPLERS, EDMODE, TrigFlowODE, cfg_combine, guided, sample_dpmpp_2m, sample_euler,
                         sample_heun, solve, trigflow_net_velocity, trigflow_times)
from helpers import MU, SD, d_star, f_star_edm, v_star
from helpers import f_star as f_star_trigflow

ORDER = {"euler": 1.0, "heun": 2.0, "dpmpp_2m": 2.0, "ddim": 1.0}
STEPS = [16, 32, 64, 128]


def _noise(n=8):
    return torch.randn(n, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _observed_orders(errors):
    return [math.log2(a / b) for a, b in zip(errors, errors[1:])]


# ---------------------------------------------------------------------------------------------
# Convergence order


def _trigflow_errors(name, grid):
    ode = TrigFlowODE(v_star, SD)
    x_T = SD * _noise()
    exact = f_star_trigflow(x_T, math.pi / 2)
    errors = []
    for n in STEPS:
        # (float32 linspace: its first time, float32 pi/2, lies slightly above pi/2.)
        times = trigflow_times(n, SD) if grid == "karras" else torch.linspace(math.pi / 2, 0, n + 1)
        x, _ = SAMPLERS[name](ode, x_T, times)
        errors.append((x - exact).abs().max().item())
    return errors


@pytest.mark.parametrize("name,grid", [(name, grid) for name in sorted(SAMPLERS) for grid in ("karras", "uniform")
                                       if (name, grid) != ("dpmpp_2m", "uniform")])
def test_trigflow_samplers_converge_at_their_order(name, grid):
    errors = _trigflow_errors(name, grid)
    orders = _observed_orders(errors)
    # Measured (max error, N = 16..128): euler 8.4e-2 -> 1.1e-2 (order 1.00); heun 2.3e-2 -> 2.9e-4
    # (2.08-2.10); dpmpp_2m 4.3e-2 -> 5.2e-4 (2.06-2.18); ddim 9.0e-2 -> 1.2e-2 (0.97-0.99; uniform
    # grid 4.9e-2 -> 6.4e-3, 0.96-0.99).
    assert all(abs(p - ORDER[name]) < 0.25 for p in orders), (errors, orders)
    assert errors[-1] < (2e-2 if name in ("euler", "ddim") else 1e-3)


def test_dpmpp_2m_converges_on_uniform_t():
    """DPM-Solver++(2M) is second order in the log-SNR; on a uniform grid in t its first step spans
    log-SNR -inf (t = pi/2) to ln(cot h), and the order only approaches 2 as N grows. Measured max
    error N = 16..128: 5.6e-3, 3.0e-3, 1.9e-3, 7.5e-4 (orders 0.92, 0.63, 1.36). Starting at float32
    pi/2 (above pi/2, where cos t < 0) must not break its log-SNR."""
    errors = _trigflow_errors("dpmpp_2m", "uniform")
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert math.log2(errors[0] / errors[-1]) / (len(errors) - 1) > 0.8, errors  # > first order overall
    assert errors[-1] < 1e-3 and errors[-1] < 0.5 * _trigflow_errors("ddim", "uniform")[-1]


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_edm_samplers_converge_at_their_order(name):
    """Karras grid from T = 80 down to eps (no final 0): compare with f*(x_T, T) at boundary eps."""
    ode = EDMODE(d_star)
    T, eps = 80.0, 0.002
    x_T = T * _noise()
    exact = f_star_edm(x_T, T, eps)
    errors = []
    for n in STEPS:
        x, _ = SAMPLERS[name](ode, x_T, karras_grid(n + 1, eps, T).flip(0))
        errors.append((x - exact).abs().max().item())
    orders = _observed_orders(errors)
    # Measured: euler 8.5e-2 -> 1.2e-2 (0.93-0.98); heun 3.9e-2 -> 5.3e-4 (2.03-2.11);
    # dpmpp_2m 3.9e-2 -> 5.4e-4 (2.01-2.11); ddim 8.5e-2 -> 1.2e-2 (0.93-0.98).
    assert all(abs(p - ORDER[name]) < 0.25 for p in orders), (errors, orders)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_edm_default_schedule_reaches_the_data_endpoint(name):
    """The full schedule ending at sigma = 0 (Heun's last step is Euler) converges to f* at 0."""
    ode = EDMODE(d_star)
    x_T = 80.0 * _noise()
    exact = f_star_edm(x_T, 80.0, 0.0)
    errors = [(SAMPLERS[name](ode, x_T, ode.times(n))[0] - exact).abs().max().item() for n in (32, 64)]
    assert errors[1] < errors[0] * (0.6 if name in ("euler", "ddim") else 0.35), errors


# ---------------------------------------------------------------------------------------------
# NFE and schedules


def test_nfe_counts():
    ode = EDMODE(d_star)
    x = 80.0 * _noise(2)
    assert sample_euler(ode, x, ode.times(18))[1] == 18
    assert sample_heun(ode, x, ode.times(18))[1] == 35  # EDM's CIFAR-10 setting: 18 steps, last Euler
    assert sample_heun(ode, x, karras_grid(19).flip(0))[1] == 36  # no final 0: Heun every step
    assert sample_dpmpp_2m(ode, x, ode.times(18))[1] == 18
    assert solve(TrigFlowODE(v_star, SD), _noise(2), 1, "euler")[1] == 1


def test_schedules():
    sig = EDMODE(d_star).times(18)
    assert sig.shape == (19,) and sig[0] == 80.0 and sig[-1] == 0 and math.isclose(sig[-2], 0.002)
    assert (sig[1:] < sig[:-1]).all()
    t = trigflow_times(18, SD)
    assert t.shape == (19,) and t[0] == math.pi / 2 and t[-1] == 0 and (t[1:] < t[:-1]).all()
    assert torch.allclose(SD * torch.tan(t[1:-1]), sig[1:-1])


def test_solve_scales_the_noise_to_the_start():
    """`solve` starts TrigFlow at sigma_d n (t = pi/2) and EDM at sigma_max n."""
    n = _noise()
    seen = {}

    def spy(key):
        def model(x, s):
            seen.setdefault(key, x.clone())
            return torch.zeros_like(x)
        return model

    solve(TrigFlowODE(spy("trig"), SD), n, 4, "euler")
    solve(EDMODE(spy("edm")), n, 4, "dpmpp_2m")
    assert torch.equal(seen["trig"], SD * n) and torch.equal(seen["edm"], 80.0 * n)
    with pytest.raises(ValueError, match="sampler"):
        solve(EDMODE(d_star), n, 4, "rk45")


def test_one_step_dpmpp_is_the_x0_prediction():
    """One DPM-Solver++ step from pi/2 to 0 returns E[x0 | pure noise] = mu."""
    x, nfe = solve(TrigFlowODE(v_star, SD), _noise(), 1, "dpmpp_2m")
    assert nfe == 1 and torch.allclose(x, MU.expand_as(x), atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Classifier-free guidance


def test_cfg_combination_formula():
    g = torch.Generator().manual_seed(1)
    uncond, cond = (torch.randn(5, 3, generator=g, dtype=torch.float64) for _ in range(2))
    assert torch.allclose(cfg_combine(uncond, cond, 1.0), cond, atol=1e-15)
    assert torch.equal(cfg_combine(uncond, cond, 0.0), uncond)
    # Affine in w: the value at a w1 + (1 - a) w2 is the same mix of the values.
    w1, w2, a = 0.5, 3.0, 0.3
    mix = a * cfg_combine(uncond, cond, w1) + (1 - a) * cfg_combine(uncond, cond, w2)
    assert torch.allclose(cfg_combine(uncond, cond, a * w1 + (1 - a) * w2), mix, atol=1e-14)
    assert torch.allclose(cfg_combine(uncond, cond, 2.0), 2 * cond - uncond, atol=1e-14)


def test_guided_binds_labels_batched_or_not():
    calls = []
    null = 3

    def model(x, s, labels):
        calls.append(None if labels is None else labels.clone())
        lab = torch.full((x.shape[0],), null) if labels is None else labels
        return x * (lab.to(x.dtype)[:, None] + 1) + s[:, None]

    x, s = _noise(4), torch.full((4,), 0.7, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 1])
    cond, uncond = model(x, s, labels), model(x, s, None)
    calls.clear()
    for w in (0.0, 1.5, 4.0):
        expected = uncond + w * (cond - uncond)
        assert torch.allclose(guided(model, labels, w, null_label=null)(x, s), expected, atol=1e-13)
        assert torch.allclose(guided(model, labels, w)(x, s), expected, atol=1e-13)
    assert len(calls) == 3 * (1 + 2)  # one batched call, or two calls, per guided evaluation
    calls.clear()
    assert torch.equal(guided(model, labels, 1.0, null)(x, s), cond) and len(calls) == 1
    assert torch.equal(guided(model, None, 5.0, null)(x, s), uncond)


def test_guided_network_velocity_null_label_is_labels_none():
    """For fewstep nets the null index `num_classes` and `labels=None` are the same model."""
    torch.manual_seed(0)
    net = MLP(4, 32, 2, num_classes=3).double()
    for p in net.time_emb.label.parameters():
        torch.nn.init.normal_(p)
    v = trigflow_net_velocity(net, SD)
    x, t, labels = _noise(4), torch.full((4,), 0.9, dtype=torch.float64), torch.tensor([0, 2, 1, 0])
    batched = guided(v, labels, 2.5, net.num_classes)(x, t)
    separate = guided(v, labels, 2.5)(x, t)
    manual = v(x, t, None) + 2.5 * (v(x, t, labels) - v(x, t, None))
    assert torch.allclose(batched, manual, atol=1e-12) and torch.allclose(separate, manual, atol=1e-12)
    assert not torch.allclose(v(x, t, labels), v(x, t, None))
