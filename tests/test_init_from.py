"""`train.init_from`: fine-tuning starts from another run's network and EMA weights."""

import pytest
import torch

from fewstep.build import build
from fewstep.cli import main
from fewstep.config import ConfigError, config_from_dict
from fewstep.generate import load_model

FAST = ["--steps", "5", "--set", "train.sample_every=0", "--set", "train.progress=false", "--device", "cpu"]


def test_init_from_copies_the_network_and_weights(tmp_path):
    assert main(["train", "--preset", "8gaussians", "--method", "flow", "--set", "network.width=32",
                 "--out", str(tmp_path / "flow"), *FAST]) == 0
    built = build(config_from_dict({"data": {"name": "8gaussians"}, "method": {"name": "sct"},
                                    "train": {"init_from": str(tmp_path / "flow"), "steps": 1}}))
    flow = load_model(tmp_path / "flow")
    from fewstep.networks import network_spec

    assert network_spec(built.net)["kwargs"]["width"] == 32  # the architecture of the run it starts from, not the config's default
    for a, b in zip(built.net.state_dict().values(), flow.net.state_dict().values()):
        assert torch.equal(a, b)
    assert main(["train", "--preset", "8gaussians", "--method", "sct", "--set", f"train.init_from={tmp_path / 'flow'}",
                 "--out", str(tmp_path / "sct"), *FAST]) == 0


def test_init_from_errors(tmp_path):
    with pytest.raises(ConfigError, match="init_from"):
        config_from_dict({"train": {"init_from": "a", "teacher": "b"}, "method": {"name": "scd"}}).validate()
    assert main(["train", "--set", "train.init_from=/no/such/run", "--out", str(tmp_path / "x"), *FAST]) == 2
