"""Data-parallel training (fewstep.training.distributed): identical replicas, and a 2-process `torchrun`
run on CPU (Gloo) that resumes."""

import contextlib
import json
import os
import shutil
import subprocess

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

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


# ----------------------------------------------------------------------------------------------
# DDP with K micro-batches per step == one process with a batch 2K times larger


@contextlib.contextmanager
def draws_from_data():
    """Every random draw of flow matching, sCT and MeanFlow made a function of the sample it is for,
    so that a sample gets the same time and noise in whichever process or micro-batch it lands."""
    import fewstep.methods.flow as flow
    import fewstep.methods.meanflow as meanflow
    import fewstep.methods.sct as sct

    current = {}

    def key(x0, k):
        return torch.sin(k * x0.flatten(1).sum(1) + k)

    def times(n, p_mean, p_std, sigma_d, device=None, dtype=torch.float32, generator=None):
        return torch.atan(torch.exp(p_mean + p_std * key(current["x0"], 37.0).to(dtype)) / sigma_d)

    def mf_times(n, p_mean, p_std, ratio, sigma_d, device=None, dtype=torch.float32, generator=None):
        x0 = current["x0"]
        a, b = (torch.atan(torch.exp(p_mean + p_std * key(x0, k).to(dtype)) / sigma_d) for k in (37.0, 53.0))
        t, r = torch.maximum(a, b), torch.minimum(a, b)
        return torch.where(x0[:, 1] > 0, r, t), t  # half of every micro-batch (_accum_data)

    plain_randn_like = torch.randn_like

    def randn_like(x, **kwargs):
        x0 = current.get("x0")
        if x0 is None or x.shape != x0.shape:
            return plain_randn_like(x, **kwargs)
        return torch.cos(101.0 * x0 + torch.arange(x0[0].numel(), dtype=x0.dtype).reshape(x0[0].shape))

    saved = flow.lognormal_times, sct.lognormal_times, meanflow.meanflow_times, torch.randn_like
    flow.lognormal_times = sct.lognormal_times = times
    meanflow.meanflow_times, torch.randn_like = mf_times, randn_like
    try:
        yield current
    finally:
        flow.lognormal_times, sct.lognormal_times, meanflow.meanflow_times, torch.randn_like = saved


def _accum_method(name, current):
    from fewstep.methods import SCT, FlowMatching, MeanFlow

    cls = {"flow": FlowMatching, "sct": SCT, "meanflow": MeanFlow}[name]

    class Seen(cls):
        def __call__(self, net, x0, labels=None, step=0):
            current["x0"] = x0  # what the patched draws are functions of
            return super().__call__(net, x0, labels, step)

    Seen.name = ""  # a test subclass: fit warns that checkpoints cannot name it
    return Seen()


ACCUM_METHODS, ACCUM_K, ACCUM_STEPS, MICRO = ("flow", "sct", "meanflow"), 2, 3, 4


def _accum_data():
    """batches[step][rank][micro]: MICRO samples each, half of them with x[:, 1] > 0 (MeanFlow's r != t:
    every process runs the same forward passes, as `meanflow_times`' fixed count ensures)."""
    gen = torch.Generator().manual_seed(5)
    x = 0.5 * torch.randn(ACCUM_STEPS, 2, ACCUM_K, MICRO, 2, generator=gen, dtype=torch.float64)
    x[..., 1] = x[..., 1].abs() * torch.tensor([1.0, -1.0]).repeat_interleave(MICRO // 2).double()
    return x


def _accum_fit(name, batches, out, k):
    import warnings

    from fewstep import fit

    torch.manual_seed(0)
    net = MLP(2, 16, 2, second_time=name == "meanflow").double()
    with draws_from_data() as current, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit(net, _accum_method(name, current), batches, out, steps=ACCUM_STEPS, grad_accum=k, progress=False,
            ckpt_every=0, grad_clip=None, optimizer=torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9),
            device="cpu", parallel="ddp" if dist.is_initialized() else "none")
    return {n: p.detach().clone() for n, p in net.named_parameters()}


def _accum_worker(rank, world, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    init_gloo(rank, world, out_dir)
    x = _accum_data()
    try:
        for name in ACCUM_METHODS:
            batches = [x[s, rank, m] for s in range(ACCUM_STEPS) for m in range(ACCUM_K)]
            params = _accum_fit(name, batches, os.path.join(out_dir, f"{name}-ddp"), ACCUM_K)
            if rank == 0:
                save_file(params, os.path.join(out_dir, f"{name}.safetensors"))
    finally:
        dist.destroy_process_group()


def test_ddp_micro_batches_equal_one_process_with_a_larger_batch(tmp_path):
    """torchrun-style: 2 processes x K=2 micro-batches of 4 samples per step (DDP, grad_accum=2)
    train to the parameters of one process on the 16 samples at once, for flow matching, sCT
    and MeanFlow, in float64 (every draw a function of its sample: tests/draws_from_data)."""
    mp.spawn(_accum_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    x = _accum_data()
    for name in ACCUM_METHODS:
        big = [x[s].reshape(-1, 2) for s in range(ACCUM_STEPS)]
        want = _accum_fit(name, big, tmp_path / f"{name}-one", 1)
        got = load_file(str(tmp_path / f"{name}.safetensors"))
        moved = max((want[k] - p.detach()).abs().max().item() for k, p in
                    zip(want, (lambda: (torch.manual_seed(0), MLP(2, 16, 2, second_time=name == "meanflow"))[1])()
                        .double().parameters()))
        assert moved > 1e-3, (name, moved)  # the steps did move the weights
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-9, atol=1e-11, msg=f"{name} {key}")
