"""Data-parallel training (fewstep.distributed): gradient averaging against the full-batch
gradient, all-or-none steps on a non-finite loss, and a 2-process `torchrun` run on CPU (Gloo)."""

import json
import os
import shutil
import socket
import subprocess

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fewstep import checkpoint as ckpt
from fewstep.distributed import DistInfo, average_gradients, broadcast_parameters, gather_objects
from fewstep.networks import MLP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    info = DistInfo(rank, world)
    torch.manual_seed(100 + rank)  # different initial weights: broadcast must fix them
    net = MLP(3, 16, 2, adaptive_weight=False).double()
    net.unused = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))  # no process gives it a gradient
    broadcast_parameters(net, info)
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(8, 3, generator=gen, dtype=torch.float64), torch.rand(8, generator=gen, dtype=torch.float64)

    def loss_of(rows):
        return net(x[rows], t[rows]).square().mean()

    # full batch, on this process alone
    net.zero_grad()
    loss_of(slice(None)).backward()
    full = [p.grad.clone() for p in net.parameters() if p is not net.unused]
    # each process its half, then the average
    net.zero_grad()
    loss_of(slice(4 * rank, 4 * rank + 4)).backward()
    ok = average_gradients(net.parameters(), info, True)
    used = [p for p in net.parameters() if p is not net.unused]
    err = max((p.grad - g).abs().max().item() for p, g in zip(used, full))
    unused_none = net.unused.grad is None
    # a non-finite loss on one process: every process skips
    skip = average_gradients(net.parameters(), info, rank == 0)
    weights = [p.detach().sum().item() for p in net.parameters()]
    result = {"ok": ok, "err": err, "skip": skip, "weights": weights, "gathered": gather_objects(rank, info),
              "unused_none": unused_none}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


def test_gradient_average_equals_the_full_batch_gradient(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    for r in (r0, r1):
        assert r["ok"] and r["err"] < 1e-12, r["err"]  # mean of half-batch means = full-batch mean
        assert r["skip"] is False  # rank 1 had a non-finite loss: both skip
        assert r["gathered"] == [0, 1] and r["unused_none"]  # no gradient anywhere: stays None
    assert r0["weights"] == r1["weights"]  # broadcast made the replicas identical


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
