"""`train.init_from`: fine-tuning starts from another run's network and EMA weights."""

import pytest
import torch

from fewstep.training.build import build
from fewstep.cli import main
from fewstep.config import ConfigError, config_from_dict
from fewstep.apps.generate import load_model

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


@pytest.mark.parametrize("method, key", [("scd", "teacher"), ("sct", "init_from")])
def test_pretrain_steps_trains_the_flow_model_first(tmp_path, method, key):
    """train.pretrain_steps: one command trains flow matching into <out>/pretrain, then the method
    from it (the teacher of sCD, the start of sCT); a second run resumes both stages."""
    import json

    out = tmp_path / method
    args = ["train", "--preset", "8gaussians", "--method", method, "--set", "train.pretrain_steps=6",
            "--set", "network.width=32", "--out", str(out), *FAST]
    assert main(args) == 0
    pre = json.loads(sorted((out / "pretrain" / "checkpoints").glob("ckpt-*.json"))[-1].read_text())
    assert pre["step"] == 6 and pre["method"]["name"] == "flow"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["train"][key] == str(out / "pretrain") and cfg["method"]["name"] == method
    assert main(args) == 0  # both stages already done: resumes and ends
    assert main(["train", "--method", "scd", "--set", "train.pretrain_steps=5", "--teacher", "x",
                 "--out", str(tmp_path / "bad"), *FAST]) == 2
