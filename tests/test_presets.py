"""The paper presets (fewstep/presets.py, docs/reproduce.md) and what they need of the rest of fewstep:
sCM's sampling start t_max, EDM2's latent normalization, a student's own dropout over its teacher's
network, the teacher check, and the smoke run of `benchmarks/reproduce.py`."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fewstep.cli import main
from fewstep.config import ConfigError, config_from_dict
from fewstep.methods import SCD, SCT
from fewstep.networks import UNet, network_spec
from fewstep.presets import GPUS, PAPER_PRESETS, PRESETS, TEACHERS

ROOT = Path(__file__).resolve().parents[1]


def test_paper_presets_hold_the_cited_values():
    # The global batch is the paper's over the GPUs of docs/reproduce.md; the rest as cited in presets.py.
    ecm = PAPER_PRESETS["cifar10-ecm-1h"]
    assert ecm["train"]["batch_size"] * GPUS == 128 and ecm["train"]["ema_decay"] == 0.9993
    assert (ecm["method"]["q"], ecm["method"]["stages"], ecm["method"]["p_mean"], ecm["method"]["p_std"]) == (256, 1, -1.1, 2.0)
    assert ecm["optim"]["betas"] == [0.9, 0.999] and ecm["network"]["dropout"] == 0.2
    assert ecm["train"]["sample_times"][1] == pytest.approx(math.atan(0.821 / 0.5))  # ECT's sigma 0.821 in TrigFlow
    for name, (p_mean, p_std) in {"cifar10-sct": (-1.0, 1.4), "imagenet64-sct-s": (-1.0, 1.6),
                                  "imagenet512-scd-s": (-0.8, 1.6)}.items():
        method = PAPER_PRESETS[name]["method"]
        assert (method["p_mean"], method["p_std"], method["norm_const"], method["warmup_steps"]) == (p_mean, p_std, 0.1, 10_000)
        assert method["sigma_max"] == 80.0
    assert PAPER_PRESETS["cifar10-sct"]["optim"]["betas"] == [0.9, 0.99]
    assert PAPER_PRESETS["imagenet512-scd-s"]["method"]["guidance_range"] == [1.0, 2.0]
    for name, preset in PAPER_PRESETS.items():
        config_from_dict(preset)  # plain-data checks (the registries' in test_config.test_presets_are_valid)
        assert PRESETS[name] is preset and (name in TEACHERS) == ("scd" in name or "ecm" in name)


def test_teacher_presets_refuse_to_start_without_a_teacher(capsys):
    assert main(["train", "--preset", "cifar10-scd", "--out", "/nonexistent/run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "preset 'cifar10-scd' starts from a teacher: give --teacher PATH" in err


def test_sigma_max_is_where_scm_sampling_starts():
    net = UNet(img_channels=1, img_resolution=8, model_channels=8, channel_mult=(1,), num_blocks=1)
    for method in (SCT(sigma_max=80.0), SCD(sigma_max=80.0)):
        sampler = method.sampler(net)
        assert sampler.t_max == pytest.approx(math.atan(80.0 / 0.5))
        assert sampler.schedule(2).times[0] == pytest.approx(sampler.t_max)
    assert SCT().sampler(net).t_max == math.pi / 2
    with pytest.raises(ValueError, match="method.sigma_max"):
        SCT(sigma_max=0.0)


def _latents_file(path: Path, mean: torch.Tensor) -> Path:
    from safetensors.torch import save_file

    from fewstep.interop.diffusers.latents import RECORD_KEY

    record = {"vae": "none", "scaling_factor": 0.18215, "shift_factor": 0.0, "pixel_shape": [3, 16, 16],
              "latent_shape": list(mean.shape[1:]), "count": len(mean), "sigma_d": 1.0, "source": {"name": "x"},
              "class_names": None, "num_classes": 0}
    save_file({"mean": mean.contiguous(), "std": torch.zeros_like(mean)}, str(path),
              metadata={RECORD_KEY: json.dumps(record)})
    return path


def test_latent_normalization_is_edm2s(tmp_path):
    from fewstep.data import DataError
    from fewstep.interop.diffusers.latents import LatentDataset, channel_factor

    g = torch.Generator().manual_seed(0)
    mu, sd = torch.tensor([1.5, -0.7, 0.5, 0.7]), torch.tensor([5.3, 5.9, 4.2, 4.3])
    raw = torch.randn(64, 4, 4, 4, generator=g) * sd.view(1, 4, 1, 1) + mu.view(1, 4, 1, 1)
    ds = LatentDataset(_latents_file(tmp_path / "l.safetensors", raw))
    ds.normalize(mu.tolist(), sd.tolist())
    x = ds.__getitems__(list(range(64)))[0]  # zero posterior std: the stored means, normalized
    expected = (raw - mu.view(1, 4, 1, 1)) / sd.view(1, 4, 1, 1) * 0.5
    assert torch.allclose(x, expected, atol=1e-5)
    assert ds.latents["sigma_d"] == pytest.approx(float(expected.double().std(unbiased=False)), rel=1e-5)
    # what a checkpoint records decodes back: z = x / scale + shift, per channel
    scale, shift = channel_factor(ds.latents["scaling_factor"]), channel_factor(ds.latents["shift_factor"])
    assert torch.allclose(x / scale + shift, raw, atol=1e-4)
    with pytest.raises(DataError, match="4 means"):
        ds.normalize([0.0, 0.0], [1.0, 1.0])
    with pytest.raises(ConfigError, match="latent_std"):
        config_from_dict({"data": {"latent_mean": [0.0] * 4}})
    with pytest.raises(ConfigError, match="normalize latents"):
        from fewstep.training.build import load_data

        load_data(config_from_dict({"data": {"name": "digits", "latent_mean": [0.0], "latent_std": [1.0]}}))


def test_a_student_takes_its_own_dropout_over_its_teachers_network():
    from fewstep.training.build import _student_network

    teacher = SimpleNamespace(net=UNet(img_channels=1, img_resolution=8, model_channels=8, channel_mult=(1,),
                                       num_blocks=1, dropout=0.0))
    cfg = config_from_dict({"network": {"dropout": 0.2}})
    student = _student_network(cfg, teacher, SCT())
    spec, teacher_spec = network_spec(student), network_spec(teacher.net)
    assert spec["kwargs"].pop("dropout") == 0.2 and teacher_spec["kwargs"].pop("dropout") == 0.0
    assert spec == teacher_spec  # the rest is the teacher's architecture
    with pytest.raises(ConfigError, match="dropout_res"):
        _student_network(config_from_dict({"network": {"dropout_res": 16}}), teacher, SCT())


def test_reproduce_smoke_of_one_preset(tmp_path, monkeypatch):
    from fewstep.networks import NETWORKS

    if "ddpmpp" not in NETWORKS:
        pytest.skip("needs the paper networks (ddpmpp)")
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))  # restored after the smoke's own setting
    import reproduce

    threads = torch.get_num_threads()
    try:
        seconds = reproduce.smoke(["cifar10-sct"], tmp_path)
    finally:
        torch.set_num_threads(threads)
    result = json.loads((tmp_path / "cifar10-sct" / "eval.json").read_text())
    assert set(seconds) == {"cifar10-sct"} and result["step"] == 2 and math.isfinite(result["rows"][0]["fid"])
    sys.modules.pop("reproduce", None)


def test_the_guide_shows_the_commands_the_script_prints(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import reproduce

    guide = (ROOT / "docs" / "reproduce.md").read_text()
    assert set(reproduce.PLAN) == set(PAPER_PRESETS)
    for name in PAPER_PRESETS:
        assert reproduce.train_command(name) in guide and reproduce.eval_command(name) in guide
        if "teacher" in reproduce.PLAN[name]:
            assert reproduce.PLAN[name]["teacher"][1] in guide
    sys.modules.pop("reproduce", None)
