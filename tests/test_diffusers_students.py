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
    """At step 0 the student's TrigFlow velocity is the teacher's, up to pi/2 itself; with sCM's
    adaptive-weight head (network.adaptive_weight) too, whose weight starts at exp(0) = 1."""
    from fewstep.networks.contract import network_info

    head = prediction == "flow"
    built = build(scd_config(teacher_folder(tmp_path, prediction),
                             network={"arch": "diffusers", "adaptive_weight": True} if head else {}))
    t = torch.tensor([0.01, 0.7, 1.3, 1.55, math.pi / 2 - 1e-4, math.pi / 2])
    assert network_info(built.net).adaptive_weight == head
    if head:
        assert torch.equal(built.net.adaptive_weight(t), torch.zeros(len(t)))
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


# ---------------------------------------------------------------------------------------------
# A smooth time input (network.time_input=smooth, docs/math.md#smooth-time-input)

def smooth_student(folder, frequencies=16):
    return build(scd_config(folder, network={"arch": "diffusers", "time_input": "smooth",
                                             "time_frequencies": frequencies}))


@pytest.mark.parametrize("prediction", ["epsilon", "flow"])
def test_the_smooth_time_embedding_is_the_least_squares_fit_of_the_teachers(tmp_path, prediction):
    """Every weight but the time embedding is the teacher's; the embedding is linear in cos(2 f t),
    and its residual against the teacher's embedding at the teacher's timesteps is orthogonal to
    every feature (the normal equations of least squares)."""
    built = smooth_student(teacher_folder(tmp_path, prediction))
    student, teacher = built.net, built.teacher.net
    own = ("model.time_proj.", "model.time_embedding.")
    t_state = teacher.state_dict()
    for key, value in student.state_dict().items():
        if not key.startswith(own):
            assert torch.equal(value, t_state[key]), key
    t = torch.linspace(0, math.pi / 2, 4097, dtype=torch.float64)
    features = torch.cos(t[:, None] * 2 * torch.arange(16, dtype=torch.float64))
    with torch.no_grad():
        target = teacher.model.time_embedding(teacher.model.time_proj(teacher.timestep(t).float())).double()
        fit = student.model.time_embedding(student.model.time_proj(t).float()).double()
    residual = fit - target
    assert (features.T @ residual).abs().max() <= 1e-4 * (features.T @ target).abs().max()
    # and no other cosine series of this length fits better
    other = features @ (torch.linalg.lstsq(features, target).solution + 1e-3 * torch.randn(16, target.shape[1],
                                                                                         dtype=torch.float64))
    assert residual.square().sum() < (other - target).square().sum()


def test_a_smooth_time_input_is_slow_along_t_and_its_tangent_is_exact(tmp_path):
    """dF/dt of the smooth student is bounded by its cosines (frequencies <= 2 (n - 1)), while the
    teacher's positional embedding of timestep k(t) swings ~1,000 times faster; the JVP along t is
    exact against float64 central differences."""
    from fewstep.jvp import jvp

    built = smooth_student(teacher_folder(tmp_path, "flow"), frequencies=8)
    student = built.net.double()
    teacher = built.teacher.net.double()
    t = torch.linspace(0.1, 1.5, 64, dtype=torch.float64)
    k = teacher.timestep(t).float()
    with torch.no_grad():  # the time embeddings along t: the teacher's jumps between neighbouring t
        e_teacher = teacher.model.time_embedding(teacher.model.time_proj(k).double())
        e_student = student.model.time_embedding(student.model.time_proj(t))
    roughness = lambda e: (e[1:] - e[:-1]).square().sum(1).sqrt().mean()  # noqa: E731
    assert roughness(e_student) < 0.2 * roughness(e_teacher)
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    tt = torch.tensor([0.2, 0.7, 1.1, 1.5], dtype=torch.float64)
    _, tangent = jvp(student, (x, tt), (torch.zeros_like(x), torch.ones_like(tt)), mode="tangent")
    h = 1e-6
    with torch.no_grad():
        fd = (student(x, tt + h) - student(x, tt - h)) / (2 * h)
    torch.testing.assert_close(tangent, fd, rtol=1e-5, atol=1e-6)


def test_a_smooth_time_student_trains_and_exports_as_a_table_of_timesteps(tmp_path):
    """The exported UNet2DModel reads a learned row per timestep; fewstep reads it back between rows
    by linear interpolation, whose tangent along t is exact against float64 central differences."""
    from fewstep.apps.generate import load_model
    from fewstep.cli import main
    from fewstep.jvp import jvp

    folder = teacher_folder(tmp_path, "epsilon")
    out = tmp_path / "run"
    args = ["train", "--method", "scd", "--teacher", str(folder), "--out", str(out), "--data", "digits",
            "--steps", "2", "--batch-size", "8", "--set", "network.arch=diffusers", "--set",
            "network.time_input=smooth", "--set", "network.time_frequencies=8", "--set", "network.prediction=v_prediction",
            "--set", "train.sample_every=0", "--no-progress", "--device", "cpu"]
    assert main(args) == 0
    model = load_model(out)
    assert model.net.time_input == "smooth" and model.net.model.time_embedding.linear.in_features == 8
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([0.3, 1.2])
    with torch.no_grad():
        assert torch.isfinite(model.net(x, t)).all()
    assert main(["export", str(out), "--out", str(tmp_path / "pipe")]) == 0
    exported = load_model(tmp_path / "pipe").net.double()
    assert exported.model.config.time_embedding_type == "learned"
    x, t = torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.tensor([0.3, 1.2], dtype=torch.float64)
    _, tangent = jvp(exported, (x, t), (torch.zeros_like(x), torch.ones_like(t)), mode="tangent")
    h = 1e-7  # inside one segment of the table
    with torch.no_grad():
        fd = (exported(x, t + h) - exported(x, t - h)) / (2 * h)
    assert fd.abs().max() > 1e-2  # the rows differ: a table read at the nearest row would have no tangent
    torch.testing.assert_close(tangent, fd, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="time_input must be one of"):
        build(scd_config(folder, network={"arch": "diffusers", "time_input": "fourier"}))


def test_a_diffusers_student_run_is_a_starting_point_for_another_method(tmp_path):
    """rCM after sCD: `train.init_from` a smooth-time student of a diffusers teacher starts from its
    weights exactly, also under the digits preset's zero dropout, which a diffusers network has no use for."""
    from fewstep.apps.generate import load_model
    from fewstep.cli import main

    folder = teacher_folder(tmp_path, "flow")
    first = tmp_path / "scd"
    assert main(["train", "--method", "scd", "--teacher", str(folder), "--out", str(first), "--data", "digits",
                 "--steps", "2", "--batch-size", "8", "--set", "network.arch=diffusers", "--set",
                 "network.time_input=smooth", "--set", "network.time_frequencies=8", "--set", "train.sample_every=0",
                 "--no-progress", "--device", "cpu"]) == 0
    source = load_model(first)  # init_from takes the EMA weights
    start = build(config_from_dict({"method": {"name": "rcm"}, "data": {"name": "digits"}, "network": {"dropout": 0.0},
                                    "train": {"teacher": str(folder), "init_from": str(first),
                                              "init_from_teacher": False, "batch_size": 8}})).net
    assert start.time_input == "smooth"
    for (name, a), b in zip(start.state_dict().items(), source.net.state_dict().values()):
        assert torch.equal(a, b), name
    def rcm(network):
        return build(config_from_dict({"method": {"name": "rcm"}, "data": {"name": "digits"}, "network": network,
                                       "train": {"teacher": str(folder), "init_from": str(first),
                                                 "init_from_teacher": False, "batch_size": 8}})).net

    with pytest.raises(ConfigError, match="network.dropout"):  # a dropout the network cannot take is still refused
        rcm({"dropout": 0.1})
    # more cosines contain the run's 8: the refitted time input is the run's function of t
    wider = rcm({"arch": "diffusers", "time_frequencies": 16})
    assert wider.model.time_embedding.linear.in_features == 16
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([0.1, 0.6, 1.1, 1.5])
    with torch.no_grad():
        assert torch.allclose(wider(x, t), source.net(x, t), atol=1e-4)
    assert rcm({"arch": "diffusers", "adaptive_weight": True}).weight_head is not None  # not the run's (none)
    with pytest.raises(ConfigError, match="time_input=schedule cannot start from .* smooth"):
        rcm({"arch": "diffusers", "time_input": "schedule"})
