"""Text-to-image, offline, with the tiny random Stable Diffusion pipeline of examples/tiny_text_to_image.py
(CLIP text encoder, UNet2DConditionModel, AutoencoderKL) and captioned digits: sCD end to end through
the CLI (train, resume, sample with prompts, export, reload in diffusers), cached prompt embeddings,
guidance against the empty prompt, exact tangents through the text-conditioned models, one-line errors."""

import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from fewstep.cli import main

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

_spec = importlib.util.spec_from_file_location("tiny_t2i", Path(__file__).parents[1] / "examples" / "tiny_text_to_image.py")
tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny)


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i")
    return tiny.tiny_pipeline(root / "sd"), tiny.captioned_digits(root / "digits", count=12)


def train_args(files, out, steps):
    sd, digits = files
    return ["train", "--method", "scd", "--teacher", str(sd), "--data", str(digits), "--set", f"data.vae={sd}",
            "--set", "method.guidance=2", "--steps", str(steps), "--set", "train.batch_size=4", "--set",
            "train.sample_every=0", "--set", "train.num_samples=2", "--set", "train.progress=false",
            "--set", "train.ckpt_every=1", "--device", "cpu", "--out", str(out)]


def assert_pipeline_samples_as_fewstep(pipe, ours, prompts, cond, atol, **call):
    """The exported pipeline's 1- and 2-step images (LCMScheduler, no CFG) equal fewstep's multistep
    sampling at the TrigFlow times of the scheduler's timesteps, from the same latents and noise."""
    for steps in (1, 2):
        noise = torch.randn((2, 4, 4, 4), generator=torch.Generator().manual_seed(3))
        images = pipe(prompt=prompts, latents=noise.clone(), num_inference_steps=steps, guidance_scale=1.0, height=8,
                      width=8, output_type="pt", generator=torch.Generator().manual_seed(5), **call).images
        pipe.scheduler.set_timesteps(steps)
        times = [math.pi / 2] + [float(ours.net.schedule.trigflow_time(k)) for k in pipe.scheduler.timesteps[1:]]
        with torch.no_grad():
            x = ours.sampler.sample(noise, ours.sampler.schedule(times=times), cond=cond,
                                    generator=torch.Generator().manual_seed(5))
        mine = (ours.decode(x) / 2 + 0.5).clamp(0, 1)
        assert torch.allclose(images, mine, atol=atol), (steps, (images - mine).abs().max())


def test_end_to_end_train_resume_sample_export_reload(files, tmp_path, capsys):
    from fewstep.apps.generate import load_model

    out = tmp_path / "run"
    assert main(train_args(files, out, 1)) == 0
    assert main(train_args(files, out, 2)) == 0  # resumes at step 1
    log = capsys.readouterr().out
    assert "resum" in log.lower(), log
    state = json.loads(sorted((out / "checkpoints").glob("ckpt-*.json"))[-1].read_text())
    assert state["config"]["data"]["text_encoder"] == str(files[0])

    assert main(["sample", str(out), "--prompt", "a handwritten digit three", "--steps", "1", "--num", "2",
                 "--out", str(tmp_path / "s.png"), "--npz", str(tmp_path / "s.npz"), "--device", "cpu"]) == 0
    import numpy as np
    saved = np.load(tmp_path / "s.npz")
    assert saved["x"].shape == (2, 1, 8, 8) and list(saved["prompts"]) == ["a handwritten digit three"] * 2

    assert main(["export", str(out), "--out", str(tmp_path / "exported")]) == 0
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "exported")
    assert type(pipe.scheduler).__name__ == "LCMScheduler"
    ours = load_model(out)
    prompts = ["a handwritten digit three", "a handwritten digit seven"]
    cond = ours.text_cond(prompts)
    assert_pipeline_samples_as_fewstep(pipe, ours, prompts, cond, atol=1e-4)
    # fewstep reads the exported folder back as the same text-to-image consistency model
    back = load_model(tmp_path / "exported")
    assert back.method_name == "scd" and back.takes_text and back.latents
    assert main(["sample", str(tmp_path / "exported"), "--prompt", "a handwritten digit one", "--steps", "1",
                 "--num", "2", "--out", str(tmp_path / "e.png"), "--device", "cpu"]) == 0


def test_cached_prompt_embeddings_equal_fresh_ones_and_follow_the_encoder(files, tmp_path):
    from fewstep.interop.diffusers.text import PromptEncoder, cached_prompt_table

    sd = tmp_path / "sd"
    shutil.copytree(files[0], sd)
    prompts = ["a handwritten digit one", "a handwritten digit two"]
    first, path = cached_prompt_table(sd, prompts)
    again, path2 = cached_prompt_table(sd, prompts)
    assert path2 == path and path.exists()
    fresh = PromptEncoder(sd).table(prompts)
    for a in (first, again):
        assert torch.equal(a.text, fresh.text) and torch.equal(a.mask, fresh.mask)
        assert torch.equal(a.null_text, fresh.null_text)
    assert not torch.allclose(fresh.text[0], fresh.text[1])  # a random encoder still separates prompts

    # new encoder weights: a new cache entry with the new embeddings
    enc = transformers.CLIPTextModel.from_pretrained(sd / "text_encoder")
    with torch.no_grad():
        enc.get_input_embeddings().weight.mul_(1.5)
    enc.save_pretrained(sd / "text_encoder", safe_serialization=True)
    changed, path3 = cached_prompt_table(sd, prompts)
    assert path3 != path
    assert torch.equal(changed.text, PromptEncoder(sd).table(prompts).text)
    assert not torch.allclose(changed.text, first.text)


def test_guidance_against_the_empty_prompt(files):
    from fewstep.config import config_from_dict
    from fewstep.training.build import build

    sd, digits = files
    built = build(config_from_dict({"method": {"name": "scd", "guidance": 3.0},
                                    "data": {"name": str(digits), "vae": str(sd)},
                                    "train": {"teacher": str(sd), "steps": 1}}))
    method, teacher = built.method, built.teacher.net
    table = method.prompts
    assert table.prompts == sorted(set(table.prompts)) and len(table.prompts) == 10
    labels = torch.tensor([0, 3, 5])
    cond = table.cond(labels)
    null = table.null_cond(3)
    s = method.sigma_d
    x, t = torch.randn(3, 4, 4, 4) * s, torch.tensor([0.3, 0.9, 1.5])
    with torch.no_grad():
        v = method.text_teacher_velocity(x, t, cond)
        v_c = s * teacher(x / s, t, text=cond["text"], text_mask=cond["text_mask"])
        v_u = s * teacher(x / s, t, text=null["text"], text_mask=null["text_mask"])
    assert torch.allclose(v, v_u + 3.0 * (v_c - v_u), atol=1e-5)
    assert not torch.allclose(v_c, v_u, atol=1e-4)
    loss, stats = method(built.net, x, labels)  # the loss runs on prompt indices
    assert loss.shape == (3,) and torch.isfinite(loss).all()


def _finite_difference(fn, x, v, eps):
    return (fn(x + eps * v) - fn(x - eps * v)) / (2 * eps)


def timestep_embedding_float64(timesteps, embedding_dim, flip_sin_to_cos=False, downscale_freq_shift=1, scale=1,
                               max_period=10000):
    """diffusers' `get_timestep_embedding`, which computes in float32 whatever the model's dtype, in float64."""
    half = embedding_dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float64) / (half - downscale_freq_shift)
    emb = scale * timesteps[:, None].double() * torch.exp(exponent)[None]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    return torch.nn.functional.pad(emb, (0, embedding_dim % 2))


@pytest.mark.parametrize("name", ["UNet2DConditionModel", "PixArtTransformer2DModel"])
def test_the_tangent_through_a_text_conditioned_model_is_exact(name, monkeypatch):
    """The JVP in x and in t against float64 finite differences, with the text cond fixed. diffusers
    embeds the timestep in float32 even in a float64 model: the test embeds it in float64 (the
    tangent engine differentiates whatever the model computes; float32 would only blur the check)."""
    from fewstep.interop.diffusers.network import DiffusersNetwork
    from fewstep.jvp import jvp

    monkeypatch.setattr(diffusers.models.embeddings, "get_timestep_embedding", timestep_embedding_float64)
    configs = {
        "UNet2DConditionModel": dict(sample_size=4, in_channels=4, out_channels=4, layers_per_block=1,
                                     block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                     norm_num_groups=8, attention_head_dim=8),
        "PixArtTransformer2DModel": dict(sample_size=4, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
                                         num_attention_heads=2, caption_channels=32, cross_attention_dim=16,
                                         patch_size=2, use_additional_conditions=False)}
    torch.manual_seed(0)
    net = DiffusersNetwork(name, configs[name], schedule={"scheduler": "DDPMScheduler",
                                                          "config": {"prediction_type": "v_prediction"}}).double()
    assert net.text_input
    x, t = torch.randn(2, 4, 4, 4, dtype=torch.float64), torch.tensor([0.4, 1.2], dtype=torch.float64)
    cond = {"text": torch.randn(2, 6, 32, dtype=torch.float64), "text_mask": torch.tensor([[1] * 6, [1] * 3 + [0] * 3])}
    vx = torch.randn_like(x)
    with torch.no_grad():
        _, jx = jvp(net, (x, t, None), (vx, None, None), cond)
        fd = _finite_difference(lambda y: net(y, t, **cond), x, vx, 1e-6)
        assert (jx - fd).abs().max() <= 1e-7 * fd.abs().max()
        vt = torch.ones_like(t)
        _, jt = jvp(net, (x, t, None), (None, vt, None), cond)
        fd = _finite_difference(lambda s: net(x, s, **cond), t, vt, 1e-6)
        assert (jt - fd).abs().max() <= 1e-6 * fd.abs().max()
        with pytest.raises(ValueError, match="text-conditioned"):
            net(x, t)


def test_one_line_errors(files, tmp_path, capsys):
    sd, digits = files

    def error(*argv):
        assert main(list(argv)) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert err and "Traceback" not in "\n".join(err), err
        return err[-1]

    # a pipeline without a text encoder
    ddpm = tmp_path / "ddpm"
    diffusers.DDPMPipeline(unet=diffusers.UNet2DModel(sample_size=8, in_channels=4, out_channels=4,
                                                      block_out_channels=(8, 16), norm_num_groups=4,
                                                      down_block_types=("DownBlock2D",) * 2,
                                                      up_block_types=("UpBlock2D",) * 2),
                           scheduler=diffusers.DDPMScheduler()).save_pretrained(ddpm)
    base = ["train", "--method", "scd", "--data", str(digits), "--set", f"data.vae={sd}", "--steps", "1",
            "--device", "cpu", "--out", str(tmp_path / "r")]
    assert "no tokenizer" in error(*base, "--teacher", str(sd), "--set", f"data.text_encoder={ddpm}")
    # a tokenizer that does not match its text encoder
    bad = tmp_path / "bad"
    shutil.copytree(sd, bad)
    cfg = json.loads((bad / "text_encoder" / "config.json").read_text())
    small = transformers.CLIPTextModel(transformers.CLIPTextConfig(**{**cfg, "vocab_size": 20}))
    small.save_pretrained(bad / "text_encoder", safe_serialization=True)
    assert "do not belong together" in error(*base, "--teacher", str(sd), "--set", f"data.text_encoder={bad}")
    # a text-to-image teacher without a prompt dataset
    assert "prompt dataset" in error("train", "--method", "scd", "--teacher", str(sd), "--data", "digits",
                                     "--set", f"data.vae={sd}", "--steps", "1", "--device", "cpu", "--out", str(tmp_path / "r2"))
    # a mistake in metadata.jsonl
    broken = tmp_path / "broken"
    shutil.copytree(digits, broken)
    (broken / "metadata.jsonl").write_text('{"file_name": "00000.png", "text": "a digit"}\n{"file_name": 3}\n')
    assert "line 2" in error("train", "--method", "scd", "--teacher", str(sd), "--data", str(broken),
                             "--steps", "1", "--device", "cpu", "--out", str(tmp_path / "r3"))


def test_prompt_files(tmp_path):
    from fewstep.interop.diffusers.text import read_prompt_file

    good = tmp_path / "p.txt"
    good.write_text("a handwritten digit one\n\n  a handwritten digit two \n")
    assert read_prompt_file(good) == ["a handwritten digit one", "a handwritten digit two"]
    for content, match in ((b"\n \n", "no prompts"), (b"\xff\xfe digit", "not UTF-8")):
        (tmp_path / "bad.txt").write_bytes(content)
        with pytest.raises(ValueError, match=match):
            read_prompt_file(tmp_path / "bad.txt")
    with pytest.raises(ValueError, match="no such file"):
        read_prompt_file(tmp_path / "missing.txt")


def test_a_text_teacher_samples_with_prompts_and_guidance(files):
    """`generate` on a text-to-image diffusion teacher: one Euler step from t_max is
    `x_T + (0 - t_max) (v_u + w (v_c - v_u))`, with v_u at the empty prompt's embeddings."""
    from fewstep.apps.generate import batch_seed, generate, load_diffusers_model
    from fewstep.core.ode import TrigFlowODE

    model = load_diffusers_model(files[0], sigma_d=0.5)
    assert model.takes_text
    prompts = ["a handwritten digit two", "a handwritten digit six"]
    x, nfe, _ = generate(model, model.sampler.schedule(1, sampler="euler"), 2, seed=4, guidance=2.5,
                         progress=False, prompts=prompts)
    assert nfe == 1
    t0 = float(TrigFlowODE(None, 0.5).times(1)[0])
    noise = torch.randn((2, 4, 4, 4), generator=torch.Generator().manual_seed(batch_seed(4, 0)))
    x_T = TrigFlowODE(None, 0.5).alpha_sigma(t0)[1] * noise
    cond, null = model.text_cond(prompts), model.text_cond(["", ""])
    t = torch.full((2,), t0)
    with torch.no_grad():
        v_c, v_u = (0.5 * model.net(x_T / 0.5, t, **c) for c in (cond, null))
    expected = x_T - t0 * (v_u + 2.5 * (v_c - v_u))
    assert (x - expected).abs().max() <= 1e-5 * expected.abs().max()  # float32 rounding
    assert (x - (x_T - t0 * v_c)).abs().max() > 1e-2 * expected.abs().max()  # the guidance does something


def test_the_conversion_stage_regresses_onto_the_guided_text_teacher(files, tmp_path, capsys):
    """`train.convert_steps` on a text-to-image run: the student, read as v, is regressed onto the teacher's
    guided velocity under each prompt (its labels are prompt indices), and the error falls."""
    import re

    out = tmp_path / "convert"
    args = train_args(files, out, 1) + ["--set", "network.arch=diffusers", "--set", "network.prediction=v_prediction",
                                        "--set", "train.convert_steps=30", "--set", "train.convert_lr=1e-3"]
    assert main(args) == 0
    line = re.search(r"conversion stage: 30 steps, student velocity error relative to the teacher "
                     r"([0-9.]+) -> ([0-9.]+)", capsys.readouterr().out)
    assert line is not None
    before, after = map(float, line.groups())
    assert before > 0 and after < before


def test_a_pixart_student_exports_as_a_pixart_pipeline_that_samples_as_fewstep(tmp_path):
    """A PixArt-style teacher (T5 text encoder, PixArtTransformer2DModel with learned-variance channels):
    its sCD student, exported as a `PixArtAlphaPipeline` with an `LCMScheduler`, samples what fewstep
    samples at 1 and 2 steps. The pipeline lowercases prompts before T5, and so does fewstep."""
    from fewstep.apps.generate import load_model

    px, digits = tiny.tiny_pixart_pipeline(tmp_path / "pixart"), tiny.captioned_digits(tmp_path / "digits", count=12)
    out = tmp_path / "run"
    assert main(["train", "--method", "scd", "--teacher", str(px), "--data", str(digits), "--set", f"data.vae={px}",
                 "--set", "method.guidance=2", "--steps", "1", "--set", "train.batch_size=4", "--set",
                 "train.sample_every=0", "--set", "train.progress=false", "--device", "cpu", "--out", str(out)]) == 0
    assert main(["export", str(out), "--out", str(tmp_path / "exported")]) == 0
    pipe = diffusers.PixArtAlphaPipeline.from_pretrained(tmp_path / "exported")
    assert type(pipe.scheduler).__name__ == "LCMScheduler"
    ours = load_model(out)
    assert ours.net.text_input
    cond = ours.text_cond(["a handwritten digit three", "a handwritten digit seven"])
    prompts = ["A Handwritten Digit THREE ", "a handwritten digit seven"]  # the pipeline lowercases and strips
    assert_pipeline_samples_as_fewstep(pipe, ours, prompts, cond, atol=1e-5, use_resolution_binning=False)
    assert torch.equal(ours.text_cond(prompts[:1])["text"], cond["text"][:1])
    back = load_model(tmp_path / "exported")
    assert back.method_name == "scd" and back.takes_text and back.latents
