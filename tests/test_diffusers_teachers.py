"""diffusers teachers in TrigFlow time (`fewstep.interop.diffusers.schedules`), against closed forms.

For Gaussian data N(MU, S^2 I) the exact VP-epsilon, v-prediction, x0 and rectified-flow models are
written here in diffusers' conventions (a VP model at fractional timestep k reads its noise level by
interpolating the scheduler's log-SNR table with numpy, independently of the code under test).
Converted, each must equal the closed-form TrigFlow velocity (docs/math.md#gaussian-closed-forms) at continuous t between the
schedule's discrete timesteps.
"""

import math

import numpy as np
import pytest
import torch

from fewstep.interop.diffusers.schedules import TrigFlowSchedule, vp_log_snr
from helpers import MU, S, SD, v_star

diffusers = pytest.importorskip("diffusers")


def exact_vp_model(log_snr: torch.Tensor, prediction: str):
    """`model(x, k)`: the exact prediction of a VP model of N(MU, S^2 I) at fractional timestep k."""
    table = log_snr.numpy()

    def model(x, k):
        lam = torch.from_numpy(np.interp(k.numpy(), np.arange(len(table)), table)).view(-1, 1, 1, 1)
        a, b = torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()
        mu = MU.view(1, -1, 1, 1)
        x0 = mu + a * S ** 2 / (a ** 2 * S ** 2 + b ** 2) * (x - a * mu)
        eps = (x - a * x0) / b
        return {"epsilon": eps, "v_prediction": a * eps - b * x0, "sample": x0}[prediction]

    return model


def exact_flow_model(num_train_timesteps: int):
    """`model(x, k)`: the exact velocity eps - x0 of a rectified-flow model at timestep k = s N."""

    def model(x, k):
        s = (k / num_train_timesteps).view(-1, 1, 1, 1)
        mu = MU.view(1, -1, 1, 1)
        x0 = mu + (1 - s) * S ** 2 / ((1 - s) ** 2 * S ** 2 + s ** 2) * (x - (1 - s) * mu)
        eps = (x - (1 - s) * x0) / s
        return eps - x0

    return model


def _points(times):
    g = torch.Generator().manual_seed(0)
    t = torch.as_tensor(times, dtype=torch.float64)
    x0 = MU.view(1, -1, 1, 1) + S * torch.randn(len(t), 4, 2, 2, generator=g, dtype=torch.float64)
    x_t = torch.cos(t).view(-1, 1, 1, 1) * x0 + SD * torch.sin(t).view(-1, 1, 1, 1) * torch.randn(
        x0.shape, generator=g, dtype=torch.float64)
    return x_t, t


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_vp_teacher_equals_the_exact_velocity_between_timesteps(beta_schedule, prediction):
    cfg = {"num_train_timesteps": 1000, "beta_schedule": beta_schedule, "prediction_type": prediction}
    sched = TrigFlowSchedule.from_scheduler("DDPMScheduler", cfg, SD)
    table = vp_log_snr(diffusers.DDPMScheduler.from_config(cfg).alphas_cumprod)
    # TrigFlow times of fractional timesteps strictly inside the table (k = 0.37, 1.5, ..., 998.6)
    k = torch.tensor([0.37, 1.5, 10.25, 123.4, 500.5, 876.9, 998.6], dtype=torch.float64)
    t = sched.trigflow_time(k)
    x_t, t = _points(t)
    F = sched.velocity(exact_vp_model(table, prediction), x_t / SD, t)
    expected = v_star(x_t, t, mu=MU.view(1, -1, 1, 1))
    assert torch.allclose(SD * F, expected, rtol=0, atol=1e-6), (SD * F - expected).abs().max()
    # The timestep the model was asked at is the fractional one the time was made from.
    _, timestep, _, _ = sched.model_inputs(x_t / SD, t)
    assert torch.allclose(timestep, k, atol=1e-9)


@pytest.mark.parametrize("scheduler", ["FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"])
def test_rectified_flow_teacher_equals_the_exact_velocity(scheduler):
    sched = TrigFlowSchedule.from_scheduler(scheduler, {"num_train_timesteps": 1000, "shift": 3.0}, SD)
    x_t, t = _points([0.01, 0.3, 0.77, 1.2, 1.5, 1.57])
    F = sched.velocity(exact_flow_model(1000), x_t / SD, t)
    expected = v_star(x_t, t, mu=MU.view(1, -1, 1, 1))
    assert torch.allclose(SD * F, expected, rtol=0, atol=1e-6), (SD * F - expected).abs().max()


def test_time_maps_are_inverse_and_monotone():
    sched = TrigFlowSchedule.from_scheduler("DDPMScheduler", {"num_train_timesteps": 1000}, SD)
    k = torch.linspace(0, 999, 397, dtype=torch.float64)
    t = sched.trigflow_time(k)
    assert bool((t[1:] > t[:-1]).all()) and 0 < t[0] < t[-1] < math.pi / 2
    _, back, _, _ = sched.model_inputs(torch.zeros(len(t), 1, 1, 1, dtype=torch.float64), t)
    assert torch.allclose(back, k, atol=1e-8)


def test_the_velocity_is_finite_at_both_ends_in_float32():
    """At t = pi/2 (float32's cos(pi/2) < 0) and t = 0 the model is asked at the schedule's last
    and first timesteps, and the velocity stays finite."""
    sched = TrigFlowSchedule.from_scheduler("DDPMScheduler", {"num_train_timesteps": 1000}, SD)
    t = torch.tensor([0.0, math.pi / 2], dtype=torch.float32)
    asked = []

    def model(x, k):
        asked.append(k)
        return torch.ones_like(x)

    F = sched.velocity(model, torch.randn(2, 1, 2, 2), t)
    assert torch.isfinite(F).all()
    assert torch.allclose(asked[0], torch.tensor([0.0, 999.0]), atol=1e-3)


def test_unsupported_schedulers_and_predictions_are_one_line_errors():
    with pytest.raises(ValueError, match="not supported"):
        TrigFlowSchedule.from_scheduler("os.system", {}, SD)
    with pytest.raises(ValueError, match="prediction_type"):
        TrigFlowSchedule.from_scheduler("DDPMScheduler", {"prediction_type": "flow_prediction"}, SD)
