"""Scale (issue 11): DDP with the tangent engine, gradient accumulation, torch.compile, activation
checkpointing, and FSDP2 runs under torchrun that resume on another number of processes and
survive the loss of a process. CPU, Gloo."""

import copy
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fewstep.training import checkpoint as ckpt
from fewstep import fit
from fewstep.training.distributed import DistInfo, all_finite, wrap_ddp
from fewstep.methods import SCT
from fewstep.methods.scm import scm_loss
from fewstep.networks import MLP, DiT
from fewstep.networks.blocks import checkpoint_activations
from fewstep.core.trigflow import net_velocity, trigflow_noise, trigflow_velocity
from helpers import init_gloo

SD = 0.5
TORCHRUN = shutil.which("torchrun")


def _problem(kind: str):
    """A float64 network with no zero layer, and a batch of fixed (x_t, t, dx_t/dt)."""
    torch.manual_seed(0)
    net = (MLP(3, 16, 2) if kind == "mlp" else DiT(1, 4, patch_size=2, hidden_size=16, depth=2, heads=2)).double()
    with torch.no_grad():
        for p in net.parameters():
            if not p.abs().sum():
                p.normal_(0, 0.1)
    gen = torch.Generator().manual_seed(1)
    shape = (8, 3) if kind == "mlp" else (8, 1, 4, 4)
    x0 = torch.randn(shape, generator=gen, dtype=torch.float64) * SD
    z = torch.randn(shape, generator=gen, dtype=torch.float64) * SD
    t = torch.rand(8, generator=gen, dtype=torch.float64) * 1.5
    return net, trigflow_noise(x0, z, t), t, trigflow_velocity(x0, z, t)


def _loss(objective, model, x_t, t, v):
    if objective == "flow":
        return (net_velocity(model, x_t, t, SD) - v).square().flatten(1).mean(1).mean()
    return scm_loss(model, x_t, t, v, SD, jvp_mode="tangent")[0].mean()


def _ddp_worker(rank, world, out):
    init_gloo(rank, world, out)
    result = {}
    for kind in ("mlp", "dit"):
        for objective in ("flow", "sct"):
            net, x_t, t, v = _problem(kind)
            full = copy.deepcopy(net)
            _loss(objective, full, x_t, t, v).backward()
            model = wrap_ddp(net, torch.device("cpu"))
            half = slice(4 * rank, 4 * rank + 4)  # each process its half; DDP averages the halves' means
            _loss(objective, model, x_t[half], t[half], v[half]).backward()
            err = max(((p.grad - q.grad).norm() / q.grad.norm().clamp_min(1e-300)).item()
                      for p, q in zip(net.parameters(), full.parameters()) if q.grad is not None)
            result[f"{kind}-{objective}"] = err
            del model  # before the group goes: a DDP reducer freed after it deadlocks Gloo's thread
            gc.collect()
    result["all_finite"] = [all_finite(torch.tensor(1.0), DistInfo(rank, world)),
                            all_finite(torch.tensor(float("nan") if rank == 1 else 1.0), DistInfo(rank, world))]
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def test_ddp_gradient_equals_the_full_batch_gradient(tmp_path):
    """Flow matching and sCT through the tangent engine, through DDP's own forward (its hooks see
    every call): the gradient of 2 processes x 4 samples equals that of 8 samples on one process."""
    mp.spawn(_ddp_worker, args=(2, tmp_path), nprocs=2, join=True)
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["all_finite"] == [True, False]  # a NaN on one process stops all of them
        for key, err in result.items():
            if key != "all_finite":
                assert err <= 1e-10, (key, err)


def _deterministic_loss(net, x0, labels=None, step=0):
    """A loss with no random draws, so that micro-batches and one big batch see the same terms."""
    t = torch.sigmoid(x0[:, 0])  # per sample, from the sample itself
    return (net(x0, t) - x0).square().mean(1), {}


def test_gradient_accumulation_equals_a_batch_k_times_larger(tmp_path):
    x = torch.randn(64, 3, dtype=torch.float64)

    def run(out, batches, k):
        torch.manual_seed(0)
        net = MLP(3, 16, 2).double()
        fit(net, _deterministic_loss, batches, out, steps=2, grad_accum=k, progress=False, ckpt_every=0,
            optimizer=torch.optim.Adam(net.parameters(), lr=1e-2), grad_clip=0)
        return net

    with pytest.warns(UserWarning):
        small = run(tmp_path / "k4", list(x.split(8)), 4)
        big = run(tmp_path / "k1", list(x.split(32)), 1)
    for p, q in zip(small.parameters(), big.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["flow", "sct"])
def test_compiled_and_eager_agree(tmp_path, method):
    """`compile` (here dynamo + AOT autograd without code generation, the fast backend for a CPU
    test) trains to the same weights as eager within float tolerance."""
    from fewstep.methods import FlowMatching

    data = [torch.randn(32, 2)] * 3
    nets = []
    for backend in (False, "aot_eager"):
        torch.manual_seed(0)
        net = MLP(2, 32, 2)
        fit(net, FlowMatching() if method == "flow" else SCT(), data, tmp_path / str(backend), steps=3,
            compile=backend, progress=False, ckpt_every=0)
        nets.append(net)
    for p, q in zip(*(n.parameters() for n in nets)):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_compile_failure_falls_back_to_eager(tmp_path, capsys):
    """An unknown backend, and a backend that fails when the first step compiles: one line each,
    then eager training."""
    from torch._dynamo import register_backend

    @register_backend(name="fewstep_test_failing")
    def failing(graph, example_inputs):
        raise RuntimeError("this backend always fails")

    from fewstep.methods import FlowMatching

    for backend in ("no-such-backend", "fewstep_test_failing"):
        torch.manual_seed(0)
        summary = fit(MLP(2, 16, 1), FlowMatching(), [torch.randn(16, 2)], tmp_path / backend, steps=2,
                      compile=backend, progress=False)
        assert summary["steps"] == 2
        assert "torch.compile failed" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["mlp", "dit"])
def test_activation_checkpointing_gives_the_same_sct_gradient(kind):
    """Recomputed in the backward, the blocks give the same loss and gradients; the tangent
    engine's pass runs through the checkpointed forward."""
    net, x_t, t, v = _problem(kind)
    plain = copy.deepcopy(net)
    checkpoint_activations(net)
    assert list(net.state_dict()) == list(plain.state_dict())
    a, b = _loss("sct", net, x_t, t, v), _loss("sct", plain, x_t, t, v)
    a.backward()
    b.backward()
    assert torch.equal(a, b)
    for p, q in zip(net.parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------------------------
# torchrun, 2 processes


def _train_cmd(out, steps, parallel, nproc=2, *extra):
    run = [TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", "-m", "fewstep", "--"] if nproc else \
        [sys.executable, "-m", "fewstep"]
    return run + ["train", "--preset", "8gaussians", "--out", str(out), "--no-progress", "--steps", str(steps),
                  "--batch-size", "16", "--set", "network.width=32", "--set", "network.depth=1",
                  "--set", "train.log_every=1", "--set", "train.sample_every=0", "--set", "train.ckpt_every=2",
                  "--set", f"train.parallel={parallel}", "--set", "train.keep_ckpts=10", *extra]


def _run(cmd, timeout=240):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not on PATH")
def test_losing_a_process_stops_the_run_and_it_resumes(tmp_path):
    """SIGKILL one of two processes: the run ends within a timeout with a clear message, the
    last good checkpoint is intact, and the same command resumes from it."""
    out = tmp_path / "run"
    cmd = _train_cmd(out, 400, "ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        while not ckpt.list_checkpoints(out / "checkpoints") and time.time() < deadline:
            time.sleep(0.2)
        assert ckpt.list_checkpoints(out / "checkpoints"), "no checkpoint appeared"
        workers = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                                  text=True).stdout.split()]  # torchrun's children
        assert len(workers) == 2, workers
        os.kill(max(workers), signal.SIGKILL)  # the later-started worker
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert "another process of the run failed" in err and "the last good checkpoint is" in err, err[-2000:]
    step = ckpt.load_checkpoint(out)[1]["step"]
    resumed = _run(cmd[:cmd.index("--steps") + 1] + [str(step + 2)] + cmd[cmd.index("--steps") + 2:])
    assert "resumed from" in resumed.stdout and ckpt.load_checkpoint(out)[1]["step"] == step + 2


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not on PATH")
def test_fsdp_runs_resume_identically_on_two_processes_and_on_one(tmp_path):
    """4 steps in one go (full checkpoints) equal 2 + 2 steps with `train.sharded_checkpoints` (each
    process writes its own shards, no full model on process 0); `fewstep sample` reads the shards,
    and they resume on one process. (test_fsdp.py checks full checkpoints moving between 2 and 1.)"""
    from fewstep.apps.generate import load_model
    from fewstep.training.fsdp import read_full, shard_files

    sharded = ("--set", "train.sharded_checkpoints=true")
    _run(_train_cmd(tmp_path / "full", 4, "fsdp"))
    _run(_train_cmd(tmp_path / "split", 2, "fsdp", 2, *sharded))
    _run(_train_cmd(tmp_path / "split", 4, "fsdp", 2, *sharded))

    full, state = ckpt.load_checkpoint(tmp_path / "full")
    assert state["step"] == 4 and state["optimizer_format"] == "fqn"
    path = ckpt.resolve_checkpoint(tmp_path / "split")
    state = json.loads(path.read_text())
    files = shard_files(path.parent / state["shards"]["dir"], 2)
    main_file = ckpt.load_checkpoint(path)[0]  # process 0's own file: RNG states, no weights
    assert state["step"] == 4 and len(files) == 2 and not any(k.startswith(("net.", "ema.")) for k in main_file)
    split = {part: read_full(files, state["shards"]["layout"], part) for part in ("net", "ema", "optim")}
    for part in split:
        keys = [key for key in full if key.startswith(part + ".")]
        assert keys and sorted(k[len(part) + 1:] for k in keys) == sorted(split[part]), part
        for key in keys:
            assert torch.equal(full[key], split[part][key[len(part) + 1:]]), key

    model = load_model(tmp_path / "split")
    for key, value in model.net.state_dict().items():
        assert torch.equal(value, split["ema"][key]), key
    one = _run(_train_cmd(tmp_path / "split", 6, "none", 0))  # the shards, on one process
    assert "resumed from" in one.stdout and ckpt.load_checkpoint(tmp_path / "split")[1]["step"] == 6
