"""Configs validate themselves and name the offending key."""

import pytest

from fewstep.cli import main
from fewstep.cli.train import build_train_config
from fewstep.config import ConfigError, apply_overrides, config_from_dict, parse_override
from fewstep.presets import PRESETS


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid(name):
    config_from_dict(PRESETS[name])


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
        config_from_dict(data)


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
