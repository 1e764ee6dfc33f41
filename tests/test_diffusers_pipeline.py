"""diffusers models end to end, offline, with tiny randomly initialized models saved in the test:
distillation from a pipeline folder through the CLI (sCD, CD), export to a diffusers pipeline that
generates what fewstep generates, latent-space training with an AutoencoderKL, TensorBoard logs,
and the one-line errors (Hub offline, pickled weights)."""

import json
import math

import pytest
import torch

from fewstep.cli import main
from fewstep.apps.generate import load_model

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a Hub id must fail fast and clearly, never download
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))


def tiny_unet(**kw):
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(16, 32), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
                                 attention_head_dim=8, **kw)


@pytest.fixture(scope="module")
def ddpm_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("teachers") / "ddpm"
    diffusers.DDPMPipeline(unet=tiny_unet(), scheduler=diffusers.DDPMScheduler(num_train_timesteps=1000)
                           ).save_pretrained(folder)
    return folder


TRAIN = ["--steps", "4", "--set", "train.batch_size=8", "--set", "train.sample_every=0", "--set",
         "train.num_samples=8", "--set", "train.progress=false", "--device", "cpu"]


@pytest.mark.parametrize("method", ["scd", "cd", "dmd2", "rcm"])
def test_distil_a_diffusers_pipeline_through_the_cli(ddpm_folder, tmp_path, method, capsys):
    out = tmp_path / method
    assert main(["train", "--method", method, "--teacher", str(ddpm_folder), "--out", str(out), *TRAIN]) == 0
    assert "student initialized from the diffusers model" in capsys.readouterr().out
    state = json.loads(sorted((out / "checkpoints").glob("ckpt-*.json"))[-1].read_text())
    assert state["network"]["name"] == "diffusers" and state["network"]["kwargs"]["schedule"]["scheduler"] == "DDPMScheduler"
    assert main(["sample", str(out), "--steps", "1", "--num", "8", "--out", str(tmp_path / "s.png"),
                 "--device", "cpu"]) == 0
    assert (tmp_path / "s.png").exists()
    assert main(["eval", str(out), "--steps", "1,2", "--num", "16", "--features", "random", "--device", "cpu",
                 "--out", str(tmp_path / "eval.json")]) == 0
    rows = json.loads((tmp_path / "eval.json").read_text())["rows"]
    assert [r["nfe"] for r in rows] == [1, 2] and all(math.isfinite(r["fid"]) for r in rows)
    if method in ("dmd2", "rcm"):  # TrigFlow consistency students: exported as an LCMScheduler pipeline
        assert main(["export", str(out), "--out", str(tmp_path / "exported")]) == 0
        assert load_model(tmp_path / "exported").method_name == method


def test_the_student_starts_as_the_teacher(ddpm_folder):
    """At step 0 an sCD student is the teacher's model behind the same conversion: equal velocities."""
    from fewstep.training.build import build
    from fewstep.config import config_from_dict

    built = build(config_from_dict({"method": {"name": "scd"}, "train": {"teacher": str(ddpm_folder), "steps": 1}}))
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0.3, 1.0, 1.5])
    with torch.no_grad():
        assert torch.allclose(built.net(x, t), built.teacher.net(x, t), atol=1e-6)


def test_sample_and_eval_read_a_diffusers_teacher(ddpm_folder, tmp_path):
    model = load_model(ddpm_folder)
    assert model.method_name == "flow" and model.shape == (1, 8, 8) and model.sampler.consistency_fn() is None
    assert main(["sample", str(ddpm_folder), "--steps", "3", "--num", "4", "--out", str(tmp_path / "t.png"),
                 "--device", "cpu"]) == 0


@pytest.mark.parametrize("time_input", ["schedule", "smooth"])
def test_export_round_trip_generates_what_fewstep_generates(ddpm_folder, tmp_path, time_input):
    """The exported folder loads in diffusers' own DDPMPipeline (LCMScheduler) and its 1- and 2-step
    images equal fewstep's samples from the same noise; a smooth time input is written as a learned
    table of timesteps (time_embedding_type="learned")."""
    out = tmp_path / "scd"
    smooth = ["--set", "network.arch=diffusers", "--set", "network.time_input=smooth", "--set",
              "network.time_frequencies=8"] if time_input == "smooth" else []
    assert main(["train", "--method", "scd", "--teacher", str(ddpm_folder), "--out", str(out), *TRAIN, *smooth]) == 0
    assert main(["export", str(out), "--out", str(tmp_path / "exported")]) == 0
    pipe = diffusers.DDPMPipeline.from_pretrained(tmp_path / "exported")
    assert type(pipe.scheduler).__name__ == "LCMScheduler"
    assert pipe.unet.config.time_embedding_type == ("learned" if smooth else "positional")
    student = load_model(tmp_path / "exported")
    assert student.sampler.consistency_fn() is not None and student.method_name == "scd"
    ours_model = load_model(out)
    for steps in (1, 2):
        images = pipe(batch_size=4, generator=torch.Generator().manual_seed(7), num_inference_steps=steps,
                      output_type="pt").images
        gen = torch.Generator().manual_seed(7)
        noise = torch.randn((4, 1, 8, 8), generator=gen)
        pipe.scheduler.set_timesteps(steps)
        sched = ours_model.net.schedule
        times = [math.pi / 2] + [float(sched.trigflow_time(k)) for k in pipe.scheduler.timesteps[1:]]
        with torch.no_grad():
            x = ours_model.sampler.sample(noise, ours_model.sampler.schedule(times=times), generator=gen)
            y = student.sampler.sample(noise, student.sampler.schedule(times=times),
                                       generator=torch.Generator().manual_seed(7).manual_seed(7))
        ours = (x / 2 + 0.5).clamp(0, 1)
        # a smooth input's table holds cos(2 f t) rounded once in float32, where fewstep's sampler computes it
        assert torch.allclose(images, ours, atol=1e-4 if smooth else 2e-5), (steps, (images - ours).abs().max())
        if steps == 1:  # fewstep's reading of the exported folder is the same network (float32 rounding)
            assert torch.allclose(x, y, atol=1e-6 * max(1.0, float(x.abs().max())))


def test_export_refuses_fewstep_networks(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--preset", "8gaussians", "--out", str(out), *TRAIN]) == 0
    with pytest.raises(ValueError, match="diffusers model"):
        from fewstep.interop.diffusers.export import export_diffusers

        export_diffusers(load_model(out), tmp_path / "x")


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                                  latent_channels=2, norm_num_groups=4, sample_size=8, layers_per_block=1)
    folder = tmp_path_factory.mktemp("vae") / "vae"
    vae.save_pretrained(folder)
    return folder


def test_latent_pipeline_encode_train_sample_decode(vae_folder, tmp_path, capsys):
    from fewstep.interop.diffusers.latents import LatentDataset

    latents = tmp_path / "digits-latents.safetensors"
    assert main(["encode", "--data", "digits", "--vae", str(vae_folder), "--out", str(latents), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "sigma_d = " in printed
    ds = LatentDataset(latents)
    assert ds.shape == (2, 4, 4) and len(ds) == 1797 and ds.num_classes == 10
    # The measured sigma_d is the std of model-space latents drawn from the stored posteriors.
    x = torch.cat([ds.__getitems__(list(range(i, min(i + 512, len(ds)))))[0] for i in range(0, len(ds), 512)])
    assert abs(float(x.std()) - ds.sigma_d) < 0.02 * ds.sigma_d
    # Two reads of the same batch draw the same latents (resumable); different batches differ.
    assert torch.equal(ds.__getitems__([0, 1])[0], ds.__getitems__([0, 1])[0])

    out = tmp_path / "run"
    assert main(["train", "--data", str(latents), "--out", str(out), "--steps", "20", "--set", "train.batch_size=16",
                 "--set", "train.sample_every=0", "--set", "train.num_samples=8", "--set", "train.progress=false",
                 "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert f"sigma_d = {ds.sigma_d:.4f} measured" in printed
    model = load_model(out)
    assert model.latents["vae"] == str(vae_folder) and abs(model.sigma_d - ds.sigma_d) < 1e-5
    assert model.output_shape == (1, 8, 8)
    assert main(["sample", str(out), "--steps", "1", "--num", "4", "--out", str(tmp_path / "s.png"),
                 "--npz", str(tmp_path / "s.npz"), "--device", "cpu"]) == 0
    import numpy as np

    assert np.load(tmp_path / "s.npz")["x"].shape == (4, 1, 8, 8)  # decoded to pixels
    assert main(["eval", str(out), "--steps", "1", "--num", "16", "--features", "random", "--device", "cpu",
                 "--out", str(tmp_path / "e.json")]) == 0  # against the pixel digits
    assert json.loads((tmp_path / "e.json").read_text())["reference"]["name"] == "digits"
    assert main(["edit", str(out), "--task", "sdedit", "--num", "2", "--device", "cpu",
                 "--out", str(tmp_path / "ed.png")]) == 0
    assert main(["edit", str(out), "--task", "inpaint", "--num", "2", "--device", "cpu"]) == 2


def test_data_vae_encodes_once_into_the_cache(vae_folder, tmp_path, capsys):
    args = ["train", "--set", f"data.vae={vae_folder}", "--steps", "2", "--set", "train.batch_size=8", "--set",
            "train.sample_every=0", "--set", "train.progress=false", "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert "encoding 1797 images" in capsys.readouterr().out
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    assert "encoding" not in capsys.readouterr().out  # the cached latents
    assert main([*args, "--set", "data.xflip=true", "--out", str(tmp_path / "c")]) == 2


def test_tensorboard_logs_scalars_and_grids(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert main(["train", "--preset", "digits", "--out", str(out), "--steps", "4", "--set", "train.batch_size=8",
                 "--set", "train.log_every=2", "--set", "train.num_samples=8", "--set", "train.tensorboard=true",
                 "--set", "train.progress=false", "--set", "network.model_channels=8", "--set",
                 "network.channel_mult=[1]", "--set", "network.attn_resolutions=[]", "--device", "cpu"]) == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = events.Tags()
    assert {"loss", "lr", "grad_norm"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("loss")] == [2, 4]
    assert "samples/1-step" in tags["images"]


def test_one_line_errors(tmp_path, capsys):
    # A Hub id offline: one line, naming the id.
    assert main(["train", "--method", "scd", "--teacher", "no-such-org/no-such-model", "--steps", "1",
                 "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no-such-org/no-such-model" in err and "offline" in err
    # Pickled weights only: refused, not unpickled.
    folder = tmp_path / "pickled"
    tiny_unet().save_pretrained(folder, safe_serialization=False)
    (folder / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDPMScheduler"}))
    assert main(["sample", str(folder), "--num", "2", "--device", "cpu"]) == 2
    assert "reads no pickled weights" in capsys.readouterr().err


def test_the_conversion_carries_exact_tangents():
    """The tangent engine through the schedule conversion (log-SNR interpolation, clamps, table
    lookups) against float64 finite differences, with a smooth stand-in for the model."""
    from fewstep.networks import check_tangent
    from fewstep.interop.diffusers.schedules import TrigFlowSchedule

    for name, cfg in (("DDPMScheduler", {"prediction_type": "v_prediction"}),
                      ("FlowMatchEulerDiscreteScheduler", {})):
        sched = TrigFlowSchedule.from_scheduler(name, cfg, 0.5)

        def net(x, t):
            return sched.velocity(lambda xm, k: torch.tanh(xm * (1 + k.view(-1, 1, 1, 1) / 700))
                                  + torch.sin(k / 300).view(-1, 1, 1, 1), x, t)

        x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
        t = torch.tensor([0.2, 0.9, 1.4], dtype=torch.float64)
        report = check_tangent(net, (x, t))
        assert report["rel_err_fd"] < 1e-6 and report["first_bad_op"] is None, (name, report)


def test_class_conditional_teacher_with_guidance(tmp_path):
    """A class-conditional UNet2DModel (10 classes + the null label) distils with CFG: the student's
    target uses the guided teacher velocity v_u + w (v_c - v_u)."""
    from fewstep.training.build import build
    from fewstep.config import config_from_dict

    folder = tmp_path / "cond"
    diffusers.DDPMPipeline(unet=tiny_unet(num_class_embeds=11), scheduler=diffusers.DDPMScheduler()
                           ).save_pretrained(folder)
    built = build(config_from_dict({"method": {"name": "scd", "guidance": 2.0},
                                    "network": {"class_conditional": True},
                                    "train": {"teacher": str(folder), "steps": 1}}))
    teacher = built.teacher.net
    assert teacher.num_classes == 10 and built.net.num_classes == 10
    x, t, labels = torch.randn(4, 1, 8, 8) * 0.5, torch.tensor([0.3, 0.8, 1.2, 1.5]), torch.tensor([0, 3, 5, 9])
    with torch.no_grad():
        guided = built.method.teacher_velocity(x, t, labels)
        v_c, v_u = 0.5 * teacher(x / 0.5, t, labels), 0.5 * teacher(x / 0.5, t, torch.full_like(labels, 10))
    assert torch.allclose(guided, v_u + 2.0 * (v_c - v_u), atol=1e-5)
    assert main(["train", "--method", "scd", "--teacher", str(folder), "--set", "method.guidance=2",
                 "--set", "network.class_conditional=true", "--out", str(tmp_path / "run"), *TRAIN]) == 0
    assert main(["sample", str(tmp_path / "run"), "--steps", "1", "--num", "4", "--label", "3", "--device", "cpu",
                 "--out", str(tmp_path / "s.png")]) == 0


def test_model_folder_with_a_flow_scheduler_and_a_dit(tmp_path):
    """A model folder plus a separate scheduler config (train.teacher_scheduler): a rectified-flow
    UNet, and a DiT transformer (learned variance: the first half of its output)."""
    unet_dir, sched = tmp_path / "unet", tmp_path / "scheduler_config.json"
    tiny_unet().save_pretrained(unet_dir)
    diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0).save_config(tmp_path / "sched")
    sched.write_text((tmp_path / "sched" / "scheduler_config.json").read_text())
    assert main(["train", "--method", "scd", "--teacher", str(unet_dir), "--set", f"train.teacher_scheduler={sched}",
                 "--out", str(tmp_path / "run"), *TRAIN]) == 0
    assert load_model(tmp_path / "run").net.schedule.kind == "flow"

    from fewstep.interop.diffusers.pretrained import load_diffusers_network

    torch.manual_seed(0)
    dit = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=2,
                                          num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    dit.save_pretrained(tmp_path / "dit")
    diffusers.DDIMScheduler().save_config(tmp_path / "dit")
    net, _ = load_diffusers_network(tmp_path / "dit", 0.5)
    assert net.num_classes == 10
    with torch.no_grad():
        out = net(torch.randn(2, 1, 8, 8), torch.tensor([0.5, 1.5]), torch.tensor([1, 10]))
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()


def test_a_student_may_re_read_the_teachers_output(ddpm_folder, tmp_path):
    """network.prediction=v_prediction: the student keeps the teacher's weights and time input but
    reads its output as v (an epsilon model's x0 estimate divides by sqrt(alphas_cumprod)); the
    export carries the student's parameterization."""
    out = tmp_path / "v"
    assert main(["train", "--method", "scd", "--teacher", str(ddpm_folder), "--set", "network.arch=diffusers",
                 "--set", "network.prediction=v_prediction", "--out", str(out), *TRAIN]) == 0
    student = load_model(out)
    assert student.net.schedule.prediction == "v_prediction"
    assert load_model(ddpm_folder).net.schedule.prediction == "epsilon"
    assert main(["export", str(out), "--out", str(tmp_path / "exported")]) == 0
    cfg = json.loads((tmp_path / "exported" / "scheduler" / "scheduler_config.json").read_text())
    assert cfg["prediction_type"] == "v_prediction" and cfg["_class_name"] == "LCMScheduler"


@pytest.mark.parametrize("keep", [4, 5000])  # cut inside the header's length, and inside the header itself
def test_a_truncated_weights_file_is_a_one_line_error(ddpm_folder, tmp_path, keep, capsys):
    """Defect 2: a teacher whose unet/*.safetensors was cut short (an interrupted copy) is refused in
    one line naming the file, by `train --teacher` and by `sample`, not with safetensors' traceback."""
    import shutil

    folder = tmp_path / "ddpm"
    shutil.copytree(ddpm_folder, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:keep])
    for argv in (["train", "--method", "scd", "--teacher", str(folder), "--out", str(tmp_path / "r"), *TRAIN],
                 ["sample", str(folder), "--num", "2", "--device", "cpu"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(weights) in err and "damaged or truncated" in err, err


def test_a_truncated_latents_file_is_a_one_line_error(tmp_path, capsys):
    from safetensors.torch import save_file

    from fewstep.interop.diffusers.latents import RECORD_KEY

    path = tmp_path / "latents.safetensors"
    save_file({"mean": torch.zeros(8, 2, 4, 4), "std": torch.ones(8, 2, 4, 4)}, str(path),
              metadata={RECORD_KEY: "{}"})
    path.write_bytes(path.read_bytes()[:-64])
    assert main(["train", "--data", str(path), "--out", str(tmp_path / "r"), *TRAIN]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and "damaged or truncated" in err, err
