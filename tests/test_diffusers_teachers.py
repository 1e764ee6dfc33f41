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


# ---------------------------------------------------------------------------------------------
# DiffusersNetwork passes the timestep by keyword: diffusers builds this Transformer2DModel config
# (norm_type ada_norm_single) as a PixArtTransformer2DModel, whose second positional parameter is
# encoder_hidden_states (a learned-variance model without text: its output has 2C channels).

PIXART_LIKE = {"num_attention_heads": 2, "attention_head_dim": 4, "in_channels": 2, "out_channels": 4,
               "num_layers": 1, "sample_size": 4, "patch_size": 2, "norm_type": "ada_norm_single",
               "cross_attention_dim": None}


@pytest.mark.parametrize("mode", ["tangent", "traced"])
def test_a_model_whose_second_parameter_is_not_the_timestep(mode):
    from fewstep.interop.diffusers.network import DiffusersNetwork
    from fewstep.jvp import jvp
    from fewstep.jvp.traced import repeated_calls, runner_of

    torch.manual_seed(0)
    cfg = {"num_train_timesteps": 1000, "prediction_type": "epsilon"}
    net = DiffusersNetwork("Transformer2DModel", PIXART_LIKE, schedule={"scheduler": "DDPMScheduler", "config": cfg})
    net = net.double()
    assert type(net.model).__name__ == "PixArtTransformer2DModel"
    x, t = torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.tensor([0.3, 1.1, 1.5], dtype=torch.float64)

    # the exact TrigFlow conversion of the diffusers model called with timestep= by keyword
    sched = TrigFlowSchedule.from_scheduler("DDPMScheduler", cfg, SD)
    seen = []

    def by_keyword(x_model, k):
        seen.append(k)
        return net.model(x_model, timestep=k, return_dict=False)[0][:, :2]

    with torch.no_grad():
        want, got = sched.velocity(by_keyword, x, t), net(x, t)
        other = net.model(x, timestep=seen[0] / 2, return_dict=False)[0][:, :2]
    assert torch.equal(got, want)
    assert (other - net.model(x, timestep=seen[0], return_dict=False)[0][:, :2]).abs().max() > 1e-3  # t is read

    # the JVP along x against float64 central finite differences (diffusers embeds t in float32)
    x_dot = torch.randn_like(x)
    with repeated_calls():
        out, out_dot = jvp(net, (x, t), (x_dot, None), mode=mode)
    if mode == "traced":
        assert runner_of(net).traces == 1, "fell back to the eager engine"
    with torch.no_grad():
        fd = (net(x + 1e-6 * x_dot, t) - net(x - 1e-6 * x_dot, t)) / 2e-6
    assert torch.equal(out.detach(), got)
    assert ((out_dot - fd).abs().max() / fd.abs().max()).item() < 1e-7


def test_a_hub_pixart_folder_saved_as_transformer2dmodel_takes_text(tmp_path):
    """Hub PixArt folders say `"_class_name": "Transformer2DModel"` (diffusers' legacy class, which
    `from_pretrained` builds as `PixArtTransformer2DModel`): loaded as fewstep loads a pipeline
    folder, the network takes the prompt embeddings, and equals diffusers' own model called with
    `encoder_hidden_states=` them (through the exact TrigFlow conversion of its scheduler)."""
    import json

    from fewstep.interop.diffusers.pretrained import load_diffusers_network
    from fewstep.networks import network_info

    torch.manual_seed(0)
    config = dict(PIXART_LIKE, cross_attention_dim=8, caption_channels=6, num_embeds_ada_norm=1000)
    diffusers.Transformer2DModel(**config).save_pretrained(tmp_path / "transformer")
    diffusers.DDPMScheduler(prediction_type="epsilon").save_pretrained(tmp_path / "scheduler")
    (tmp_path / "model_index.json").write_text(json.dumps({
        "_class_name": "PixArtAlphaPipeline", "transformer": ["diffusers", "Transformer2DModel"],
        "scheduler": ["diffusers", "DDPMScheduler"]}))
    assert json.loads((tmp_path / "transformer" / "config.json").read_text())["_class_name"] == "Transformer2DModel"

    net, source = load_diffusers_network(tmp_path, SD)
    net = net.double()
    assert source.model == "Transformer2DModel" and type(net.model).__name__ == "PixArtTransformer2DModel"
    assert network_info(net).text_input
    ref = diffusers.Transformer2DModel.from_pretrained(tmp_path / "transformer").double()
    sched = TrigFlowSchedule.from_scheduler(source.scheduler, source.scheduler_config, SD)

    x, t = torch.randn(2, 2, 4, 4, dtype=torch.float64), torch.tensor([0.4, 1.2], dtype=torch.float64)
    text, other = torch.randn(2, 5, 6, dtype=torch.float64), torch.randn(2, 5, 6, dtype=torch.float64)
    mask = torch.tensor([[1] * 5, [1] * 3 + [0] * 2])

    def diffusers_model(x_model, k):
        return ref(x_model, timestep=k, encoder_hidden_states=text, encoder_attention_mask=mask,
                   added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0][:, :2]

    with torch.no_grad():
        got, want = net(x, t, text=text, text_mask=mask), sched.velocity(diffusers_model, x, t)
        moved = net(x, t, text=other, text_mask=mask)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert (moved - got).abs().max() > 1e-3 * got.abs().max()  # the prompt is read
    with pytest.raises(ValueError, match="text-conditioned"):
        net(x, t)


def test_a_model_without_a_timestep_is_a_one_line_error(monkeypatch):
    """UVit2DModel (aMUSEd) predicts masked VQ tokens and takes no timestep: not a denoiser of
    (x, t), and so not in MODELS; were it admitted, the forward's signature refuses it."""
    from fewstep.interop.diffusers import network

    monkeypatch.setattr(network, "MODELS", network.MODELS + ("UVit2DModel",))
    cfg = {"hidden_size": 16, "cond_embed_dim": 8, "micro_cond_encode_dim": 2, "micro_cond_embed_dim": 10,
           "encoder_hidden_size": 8, "vocab_size": 10, "codebook_size": 8, "in_channels": 8, "block_out_channels": 8,
           "num_res_blocks": 1, "block_num_heads": 2, "num_hidden_layers": 1, "num_attention_heads": 2}
    with pytest.raises(ValueError, match="UVit2DModel's forward takes no timestep") as e:
        network.DiffusersNetwork("UVit2DModel", cfg)
    assert "\n" not in str(e.value)
