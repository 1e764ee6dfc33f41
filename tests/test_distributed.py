"""Data-parallel training (fewstep.training.distributed): identical replicas, and a 2-process `torchrun`
run on CPU (Gloo) that resumes."""

import json
import os
import shutil
import subprocess

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fewstep.training import checkpoint as ckpt
from fewstep.training.distributed import DistInfo, broadcast_parameters, gather_objects
from fewstep.networks import MLP
from helpers import init_gloo


def _worker(rank: int, world: int, out_dir: str) -> None:
    init_gloo(rank, world, out_dir)
    info = DistInfo(rank, world)
    torch.manual_seed(100 + rank)  # different initial weights: broadcast must fix them
    net = MLP(3, 16, 2, adaptive_weight=False).double()
    broadcast_parameters(net, info)
    weights = [p.detach().sum().item() for p in net.parameters()]
    result = {"weights": weights, "gathered": gather_objects(rank, info)}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


def test_broadcast_makes_replicas_identical_and_gather_keeps_rank_order(tmp_path):
    """(The DDP gradient against the full-batch gradient: tests/test_scale.py.)"""
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["gathered"] == r1["gathered"] == [0, 1]
    assert r0["weights"] == r1["weights"]


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_torchrun_two_processes_train_and_resume(tmp_path):
    """`torchrun --nproc_per_node 2 -m fewstep train`: process 0 writes one log and checkpoints
    holding every process's RNG state; running again with more steps resumes."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [shutil.which("torchrun"), "--standalone", "--nproc_per_node=2", "-m", "fewstep", "train",
           "--preset", "8gaussians", "--out", str(out), "--no-progress", "--set", "network.width=32",
           "--set", "network.depth=1", "--set", "train.log_every=2", "--set", "train.sample_every=0",
           "--set", "train.ckpt_every=3"]
    first = subprocess.run(cmd + ["--steps", "4"], env=env, capture_output=True, text=True, timeout=240)
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout.count("fewstep train:") == 1  # process 0 reports
    tensors, state = ckpt.load_checkpoint(out)
    assert state["step"] == 4 and {"rng.cpu", "rng.cpu.rank1"} <= set(tensors)
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [2, 4]
    second = subprocess.run(cmd + ["--steps", "6"], env=env, capture_output=True, text=True, timeout=240)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resumed from" in second.stdout and ckpt.load_checkpoint(out)[1]["step"] == 6
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [2, 4, 6]
