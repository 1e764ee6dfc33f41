"""Configs validate themselves and name the offending key; the config is plain data, and `build`
leaves it unchanged."""

import copy
import json
import subprocess
import sys

import pytest

from fewstep.cli import main
from fewstep.cli.train import build_train_config
from fewstep.config import ConfigError, apply_overrides, config_from_dict, merge, parse_override
from fewstep.presets import PRESETS
from fewstep.training.registries import validate_against_registries


def checked(data: dict):
    """What `fewstep train` checks: the plain data, then the method and network registries."""
    return validate_against_registries(config_from_dict(data))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid(name):
    from fewstep.presets import TEACHERS

    # a teacher preset is checked as run, with --teacher (the path is only read when training starts)
    checked(merge(PRESETS[name], {"train": {"teacher": "teacher-run"}}) if name in TEACHERS else PRESETS[name])


@pytest.mark.parametrize("data, key", [
    ({"train": {"stepz": 1}}, "train.stepz"),
    ({"train": {"steps": 0}}, "train.steps"),
    ({"train": {"steps": 1.5}}, "train.steps"),
    ({"train": {"precision": "fp8"}}, "train.precision"),
    ({"optim": {"lr": -1}}, "optim.lr"),
    ({"optim": {"betas": [0.9]}}, "optim.betas"),
    ({"optim": {"name": "sgd"}}, "optim.name"),
    ({"network": {"dropout": 1.5}}, "network.dropout"),
    ({"network": {"channel_mult": []}}, "network.channel_mult"),
    ({"network": {"arch": "vit"}}, "network.arch"),
    ({"network": {"arch": "mlp", "model_channels": 8}}, "network.model_channels"),
    ({"network": {"width": "wide"}}, "network.width"),
    ({"data": {"channels": 2}}, "data.channels"),
    ({"method": {"name": "nope"}}, "method.name"),
    ({"method": {"name": "sct", "p_std": -1}}, "method.p_std"),
    ({"method": {"name": "sct", "jvp_mode": "fd"}}, "method.jvp_mode"),
    ({"method": {"name": "sct", "warmup_steps": "x"}}, "method.warmup_steps"),
    ({"train": {"sample_times": [2.0]}}, "train.sample_times"),
    ({"train": {"ema_sigma_rel": 0.5}}, "train.ema_sigma_rel"),
    ({"extra": {}}, "extra"),
])
def test_bad_values_name_the_key(data, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        checked(data)


def test_the_config_imports_nothing_of_fewstep():
    """The config is plain data: importing it loads no other fewstep module (nor torch)."""
    code = "import sys, fewstep.config; print(sorted(m for m in sys.modules if m.startswith(('fewstep.', 'torch'))))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(loaded.replace("'", '"')) == ["fewstep.config"]


def test_default_sample_times_are_the_samplers_two_step_schedule():
    from fewstep.config import TrainConfig
    from fewstep.core.samplers import TWO_STEP_TIMES

    assert TrainConfig().sample_times == list(TWO_STEP_TIMES)


def test_overrides_parse_json_values():
    assert parse_override("train.steps=12") == (["train", "steps"], 12)
    assert parse_override("network.attn_resolutions=[4,8]") == (["network", "attn_resolutions"], [4, 8])
    assert parse_override("train.device=cuda:1") == (["train", "device"], "cuda:1")
    data = apply_overrides({"train": {"steps": 1, "seed": 3}}, ["train.steps=5"])
    assert data == {"train": {"steps": 5, "seed": 3}}
    with pytest.raises(ConfigError, match="section.key"):
        parse_override("steps=3")


def test_cli_flags_override_preset_and_file(tmp_path):
    import argparse

    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text('[train]\nsteps = 77\nbatch_size = 16\n[method]\nname = "sct"\ntangent_norm = "rms"\n')
    args = argparse.Namespace(preset="digits", config=str(cfg_file), out=None, data=None, method=None, steps=None,
                              batch_size=32, lr=None, device=None, precision=None, seed=None,
                              set=["optim.lr=5e-4"], no_progress=True, teacher=None)
    cfg, out = build_train_config(args)
    assert cfg.train.steps == 77 and cfg.train.batch_size == 32 and cfg.optim.lr == 5e-4
    assert cfg.method == {"name": "sct", "tangent_norm": "rms"}
    assert cfg.data.name == "digits" and str(out) == "runs/digits"
    args.method = "flow"  # switching method drops the other method's fields
    cfg, _ = build_train_config(args)
    assert cfg.method == {"name": "flow"}


def test_preset_adjusts_to_the_chosen_method():
    """`--method scd` on the digits preset: distillation's smaller lr and its tangent warmup;
    explicit flags still win."""
    import argparse

    args = argparse.Namespace(preset=None, config=None, out=None, data=None, method="scd", steps=None,
                              batch_size=None, lr=None, device=None, precision=None, seed=None, set=[],
                              no_progress=True, teacher="runs/teacher")
    cfg, _ = build_train_config(args)
    assert cfg.optim.lr == 5e-5 and cfg.method == {"name": "scd", "warmup_steps": 500} and cfg.train.steps == 2000
    assert cfg.network["model_channels"] == 32  # the rest of the preset stays
    args.lr, args.steps = 3e-4, 10
    cfg, _ = build_train_config(args)
    assert cfg.optim.lr == 3e-4 and cfg.train.steps == 10
    args.method, args.teacher, args.lr = "flow", None, None
    cfg, _ = build_train_config(args)
    assert cfg.optim.lr == 2e-3 and cfg.method == {"name": "flow"}


def test_help_shows_examples(capsys):
    for cmd in ("train", "sample", "edit"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        assert "examples:" in capsys.readouterr().out


def test_train_help_names_the_method_that_train_really_trains(capsys):
    """Defect 7: `fewstep train --help` said sCT while `fewstep train` trains the default preset's method."""
    from fewstep.cli import build_parser

    cfg, _ = build_train_config(build_parser().parse_args(["train"]))
    with pytest.raises(SystemExit):
        main(["--help"])
    assert f"train a model (default: {cfg.method['name']} " in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"the default demo: {cfg.method['name']} on" in text and f"({cfg.method['name']} for" in text


def _tiny(data="8gaussians", network=None, method=None, **train):
    return config_from_dict({
        "data": {"name": data}, "network": network or {"width": 16, "depth": 1}, "method": method or {"name": "sct"},
        "train": {"steps": 2, "batch_size": 16, "sample_every": 0, "ckpt_every": 0, "progress": False,
                  "num_samples": 4, "log_every": 1, "device": "cpu", **train}})


def test_build_leaves_the_config_unchanged(tmp_path):
    """`build` derives the config it trains (MeanFlow's second time input, the network of the run it
    starts from) and records that one; the caller's config compares equal before and after."""
    from fewstep.apps.generate import load_model
    from fewstep.apps.train import train
    from fewstep.training.build import build

    cfg = _tiny(method={"name": "meanflow"})
    before = copy.deepcopy(cfg)
    built = build(cfg)
    assert cfg == before and "second_time" not in cfg.network
    assert built.config.network["second_time"] is True and built.options["config"]["network"]["second_time"] is True
    # train.pretrain_steps: flow matching first, then sCT from it (init_from), each from a derived config.
    cfg = _tiny(network={"width": 24, "depth": 1}, pretrain_steps=2)
    before = copy.deepcopy(cfg)
    train(cfg, tmp_path / "run")
    assert cfg == before
    record = load_model(tmp_path / "run").config
    assert record["train"]["init_from"] == str(tmp_path / "run" / "pretrain") and record["train"]["pretrain_steps"] == 0
    assert record["method"] == {"name": "sct"} and record["network"]["width"] == 24
    assert load_model(tmp_path / "run" / "pretrain").config["method"] == {"name": "flow"}


def test_build_on_latents_takes_their_sigma_d_without_changing_the_config(tmp_path):
    import torch
    from safetensors.torch import save_file

    from fewstep.interop.diffusers.latents import RECORD_KEY
    from fewstep.training.build import build

    record = {"vae": "unused", "scaling_factor": 1.0, "shift_factor": 0.0, "pixel_shape": [1, 8, 8],
              "latent_shape": [2, 4, 4], "count": 8, "sigma_d": 0.75, "source": {"name": "digits"},
              "class_names": None, "num_classes": 0}
    path = tmp_path / "latents.safetensors"
    save_file({"mean": torch.zeros(8, 2, 4, 4), "std": torch.ones(8, 2, 4, 4)}, str(path),
              metadata={RECORD_KEY: json.dumps(record)})
    cfg = _tiny(str(path), {"model_channels": 8, "channel_mult": [1], "num_blocks": 1, "attn_resolutions": []})
    before = copy.deepcopy(cfg)
    built = build(cfg)
    assert cfg == before and "sigma_d" not in cfg.method
    assert built.method.sigma_d == 0.75 and built.config.method == {"name": "sct", "sigma_d": 0.75}
