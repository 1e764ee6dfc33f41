"""Students of diffusers teachers of every output type (issue 19): the exact start, the output gain
that makes an epsilon reading ill-conditioned near pure noise, and the conversion stage that moves a
student to a bounded reading. Offline, tiny random models."""

import math

import pytest
import torch

from fewstep.config import ConfigError, config_from_dict
from fewstep.interop.diffusers.schedules import TrigFlowSchedule
from fewstep.networks.convert import match_teacher
from fewstep.training.build import build

diffusers = pytest.importorskip("diffusers")

SIGMA_D = 0.5
TYPES = ["epsilon", "v_prediction", "sample", "flow"]


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def teacher_folder(root, prediction: str):
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    if prediction == "flow":
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    else:
        scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction)
    folder = root / prediction
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder)
    return folder


def scd_config(folder, **train):
    return config_from_dict({"method": {"name": "scd"}, "network": train.pop("network", {}),
                             "train": {"teacher": str(folder), "steps": 1, "batch_size": 8, **train}})


@pytest.mark.parametrize("prediction", TYPES)
def test_every_output_type_starts_exactly_at_its_teacher(tmp_path, prediction):
    """At step 0 the student's TrigFlow velocity is the teacher's, up to pi/2 itself."""
    built = build(scd_config(teacher_folder(tmp_path, prediction)))
    t = torch.tensor([0.01, 0.7, 1.3, 1.55, math.pi / 2 - 1e-4, math.pi / 2])
    x_t = SIGMA_D * torch.randn(len(t), 1, 8, 8)
    with torch.no_grad():
        student = SIGMA_D * built.net(x_t / SIGMA_D, t)
        teacher = built.method.teacher_velocity(x_t, t)
    assert torch.isfinite(teacher).all()
    torch.testing.assert_close(student, teacher, rtol=1e-6, atol=1e-6)


def test_the_epsilon_reading_has_a_gain_of_hundreds_at_pure_noise_and_v_is_bounded():
    """The diagnosis, in closed form: F = c eps - s x0 / sigma_d with x0 = (x - b eps) / a gains
    c + s b / (sigma_d a) on the output, sqrt(1 - ab) / (sigma_d sqrt(ab)) at pi/2; the v reading
    (x0 = a x - b v, eps = b x + a v) gains c a + s b / sigma_d <= sqrt(1 + 1 / sigma_d^2)."""
    cfg = diffusers.DDPMScheduler(num_train_timesteps=1000).config
    t = torch.linspace(0, math.pi / 2, 200, dtype=torch.float64)
    eps = TrigFlowSchedule.from_scheduler("DDPMScheduler", cfg, SIGMA_D, "epsilon")
    v = TrigFlowSchedule.from_scheduler("DDPMScheduler", cfg, SIGMA_D, "v_prediction")
    ab_last = float(diffusers.DDPMScheduler(num_train_timesteps=1000).alphas_cumprod[-1])
    assert eps.output_gain(t)[-1].item() == pytest.approx(math.sqrt((1 - ab_last) / ab_last) / SIGMA_D, rel=1e-6)
    assert eps.output_gain(t)[-1] > 300
    _, _, a, b = v.model_inputs(torch.zeros(len(t), 1, 1, 1, dtype=torch.float64), t)
    c, s = torch.cos(t).clamp_min(0), torch.sin(t)
    torch.testing.assert_close(v.output_gain(t), (c * a.flatten() + s * b.flatten() / SIGMA_D).abs())
    assert v.output_gain(t).max() <= math.sqrt(1 + 1 / SIGMA_D ** 2)


def test_the_conversion_stage_is_zero_at_the_exact_start_and_moves_a_re_read_student(tmp_path):
    folder = teacher_folder(tmp_path, "epsilon")
    exact = build(scd_config(folder))
    data = lambda: (exact.data.sample(8)[0], None)  # noqa: E731
    before = {k: v.clone() for k, v in exact.net.state_dict().items()}
    done = match_teacher(exact.net, exact.method.teacher_velocity, data, SIGMA_D, steps=5)
    assert done == {"convert_error_before": 0.0, "convert_error_after": 0.0}
    assert all(torch.equal(before[k], v) for k, v in exact.net.state_dict().items())

    torch.manual_seed(0)
    reread = build(scd_config(folder, network={"arch": "diffusers", "prediction": "v_prediction"}))
    gain = lambda t: exact.teacher.net.schedule.output_gain(t)  # noqa: E731
    done = match_teacher(reread.net, reread.method.teacher_velocity, data, SIGMA_D, steps=25, lr=3e-3, gain=gain)
    assert done["convert_error_before"] > 0.3  # the v reading of an epsilon model is another velocity
    assert done["convert_error_after"] < 0.8 * done["convert_error_before"]


def test_the_conversion_stage_through_the_config(tmp_path, capsys):
    folder = teacher_folder(tmp_path, "epsilon")
    build(scd_config(folder, network={"arch": "diffusers", "prediction": "v_prediction"}, convert_steps=2))
    assert "conversion stage: 2 steps" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="convert_steps regresses a student onto its teacher"):
        config_from_dict({"method": {"name": "sct"}, "train": {"convert_steps": 5}}).validate()
    with pytest.raises(ConfigError, match="for TrigFlow students"):
        build(config_from_dict({"method": {"name": "cd"}, "train": {"teacher": str(folder), "convert_steps": 2}}))
