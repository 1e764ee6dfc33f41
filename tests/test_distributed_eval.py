"""Distributed evaluation (issue 11, item 5): `generate` split over processes draws the same
samples as one process, and `torchrun -m fewstep eval` on 2 CPU processes (Gloo) writes the
scores of a single-process run."""

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import fewstep
from fewstep.cli import build_parser
from fewstep.apps.generate import Model, Schedule, cm_times, generate
from fewstep.methods import SCT, FlowMatching
from fewstep.networks import MLP, UNet


def _split_equals_whole(model: Model, schedule: Schedule, num: int = 20, batch_size: int = 6) -> None:
    whole, nfe, _ = generate(model, schedule, num, batch_size, seed=3, progress=False)
    for world in (2, 3):
        parts = [generate(model, schedule, num, batch_size, seed=3, progress=False, rank=r, world_size=world)
                 for r in range(world)]
        batches = [p[0].split(batch_size) for p in parts]
        order = [batches[k % world][k // world] for k in range(math.ceil(num / batch_size))]
        assert torch.equal(torch.cat(order), whole)  # batch k depends on (seed, k) alone
        assert {p[1] for p in parts} == {nfe}


def test_generate_split_over_processes_equals_one_process():
    torch.manual_seed(0)
    cm = Model.from_net(MLP(2, 16, 1).eval(), SCT(), "vector", (2,))
    _split_equals_whole(cm, Schedule("multistep", 2, tuple(cm_times(2))))  # re-noising draws per batch too
    flow = Model.from_net(MLP(2, 16, 1).eval(), FlowMatching(), "vector", (2,))
    _split_equals_whole(flow, Schedule("euler", 3))
    a = generate(cm, Schedule("multistep", 1, (math.pi / 2,)), 12, 6, seed=3, progress=False)[0]
    b = generate(cm, Schedule("multistep", 1, (math.pi / 2,)), 12, 6, seed=4, progress=False)[0]
    assert not torch.equal(a[:6], b[:6]) and not torch.equal(a[:6], a[6:])  # seeds and batches differ


def _eval(run, ref, out, env, processes: int) -> dict:
    argv = ["eval", str(run), "--steps", "1,2", "--num", "40", "--batch-size", "8", "--ref", str(ref),
            "--device", "cpu", "--out", str(out), "--no-progress"]
    if run.name == "image":
        argv += ["--features", "random"]
    if processes == 1:  # in this process
        args = build_parser().parse_args(argv)
        assert args.func(args) == 0
    else:
        cmd = [shutil.which("torchrun"), "--standalone", f"--nproc_per_node={processes}", "-m", "fewstep", "--", *argv]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.count("wrote ") == 1 and done.stdout.count("N = 40 samples") == 1  # process 0 alone
    return json.loads(out.read_text())


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
@pytest.mark.parametrize("kind", ["vector", "image"])
def test_torchrun_eval_equals_one_process(kind, tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FEWSTEP_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join(sys.path)}
    torch.manual_seed(0)
    run, ref = tmp_path / kind, tmp_path / f"ref-{kind}.npy"
    if kind == "vector":
        data, net = torch.randn(64, 2), MLP(2, 16, 1)
    else:
        data = torch.rand(16, 1, 8, 8) * 2 - 1
        net = UNet(1, 8, model_channels=8, channel_mult=(1,), num_blocks=1)
    fewstep.fit(net, SCT(), [data], run, steps=2, progress=False, device="cpu")
    np.save(ref, data.numpy())
    two = _eval(run, ref, tmp_path / "two.json", env, 2)
    one = _eval(run, ref, tmp_path / "one.json", env, 1)
    assert two["processes"] == 2 and one["processes"] == 1
    assert len(one["rows"]) == 2 and [r["nfe"] for r in two["rows"]] == [1, 2]
    for a, b in zip(one["rows"], two["rows"]):
        for metric in one["metrics"]:
            assert a[metric] == b[metric], (metric, a[metric], b[metric])  # the same features, in the same order
