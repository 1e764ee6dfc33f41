"""`fit` under FSDP on 2 processes (CPU, Gloo): methods with extra networks (CT's EMA target, PD's
teacher) shard them and resume exactly; a sharded checkpoint that lost a shard falls back to the
previous one; a process that cannot write its shard stops every process at once with one line.

One `mp.spawn` runs every scenario (a module fixture); each test reads its part."""

import functools
import json
import os
import time
import warnings

import pytest
import torch
import torch.distributed as dist

from fewstep import fit
from fewstep.methods import CT, FlowMatching, ProgressiveDistillation
from fewstep.networks import MLP
from fewstep.training import checkpoint as ckpt
from fewstep.training.fsdp import read_full, shard_files
from helpers import init_gloo, rank_batches, run_scenarios, scenario_part, spawn_ranks

WORLD, STEPS = 2, 8


def _method(name):
    if name == "ct":
        return CT(s1=10, total_steps=4)  # curricula over a fixed length, whatever `steps` this call trains
    if name == "pd":
        torch.manual_seed(7)
        return ProgressiveDistillation(MLP(2, 16, 2).double(), start_steps=4, min_steps=1, total_steps=4)
    return FlowMatching()


def _fit(rank, name, out, steps, **kw):
    torch.manual_seed(0)
    net = MLP(2, 16, 2).double()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(net, _method(name), rank_batches(rank, STEPS, WORLD), out, steps=steps, parallel="fsdp", device="cpu",
            progress=False, ckpt_every=2, keep_ckpts=5, **kw)
    return [str(w.message) for w in caught]


def _max_diff(a: dict, b: dict) -> float:
    """Over `a`'s tensors. (`b` may hold more: torch's FSDP optimizer loader gives a parameter that
    never had a gradient, here the unused adaptive-weight head, a zero Adam state.)"""
    assert a and a.keys() <= b.keys(), sorted(set(a) - set(b))[:6]
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def _extra_networks(rank, out_dir, result):
    """4 steps at once == 2 steps, then resumed for 2 more; the target/teacher included."""
    for name in ("ct", "pd"):
        full, split = os.path.join(out_dir, f"{name}-full"), os.path.join(out_dir, f"{name}-split")
        _fit(rank, name, full, 4)
        _fit(rank, name, split, 2)
        _fit(rank, name, split, 4)
        dist.barrier()
        if rank == 0:
            a, b = ckpt.load_checkpoint(full)[0], ckpt.load_checkpoint(split)[0]
            keep = ("net.", "ema.", "optim.", "target.")
            result[name] = {"diff": _max_diff({k: v for k, v in a.items() if k.startswith(keep)},
                                              {k: v for k, v in b.items() if k.startswith(keep)}),
                            "target_keys": sum(k.startswith("target.") for k in a)}


def _sharded_weights(run):
    path = ckpt.resolve_checkpoint(run)
    state = json.loads(path.read_text())
    files = shard_files(path.parent / state["shards"]["dir"], WORLD)
    return state["step"], {p: read_full(files, state["shards"]["layout"], p) for p in ("net", "ema", "optim")}


def _missing_shard(rank, out_dir, result):
    """Lose process 1's shard of the latest checkpoint (4): the run resumes from 2, exactly."""
    straight, run = os.path.join(out_dir, "shard-straight"), os.path.join(out_dir, "shard-lost")
    _fit(rank, "flow", straight, 6, sharded_checkpoints=True)
    _fit(rank, "flow", run, 4, sharded_checkpoints=True)
    dist.barrier()
    if rank == 0:
        os.unlink(os.path.join(run, "checkpoints", "ckpt-0000004.shards", "rank00001.safetensors"))
    dist.barrier()
    messages = _fit(rank, "flow", run, 6, sharded_checkpoints=True)
    result["missing_shard"] = {"warned": [m for m in messages if "damaged" in m]}
    dist.barrier()
    if rank == 0:
        (s1, a), (s2, b) = _sharded_weights(straight), _sharded_weights(run)
        result["missing_shard"].update(steps=[s1, s2], diff=max(_max_diff(a[p], b[p]) for p in a))


def _write_failure(rank, out_dir, result):
    """Process 1 cannot write its shard: both processes stop at once with the same one line."""
    def full_disk(tensors, filename, metadata=None):
        raise OSError(28, "No space left on device (test)")

    if rank == 1:
        saved, ckpt.save_file = ckpt.save_file, full_disk
    start = time.time()
    try:
        _fit(rank, "flow", os.path.join(out_dir, "full-disk"), 2, sharded_checkpoints=True)
        result["write_failure"] = {"raised": None}
    except ckpt.CheckpointError as e:
        result["write_failure"] = {"raised": "CheckpointError", "message": str(e), "seconds": time.time() - start}
    finally:
        if rank == 1:
            ckpt.save_file = saved


def _worker(rank, out_dir):
    # A short timeout: a process left waiting for a failed peer fails its scenario instead of the suite.
    init_gloo(rank, WORLD, out_dir, timeout=40, torchrun_env=True)
    run_scenarios(rank, out_dir, [(name, functools.partial(scenario, rank, out_dir)) for name, scenario in (
        ("extra", _extra_networks), ("missing", _missing_shard), ("write", _write_failure))])


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return spawn_ranks(_worker, tmp_path_factory.mktemp("parallel"), WORLD)


def test_fsdp_shards_the_extra_networks_and_resumes_exactly(results):
    r0 = scenario_part(results, "extra")[0]
    for name in ("ct", "pd"):
        assert r0[name]["target_keys"] > 0, name
        assert r0[name]["diff"] == 0.0, (name, r0[name])


def test_a_missing_shard_falls_back_to_the_previous_checkpoint(results):
    ranks = scenario_part(results, "missing")
    assert all(any("ckpt-0000004" in m for m in r["missing_shard"]["warned"]) for r in ranks), ranks
    assert ranks[0]["missing_shard"]["steps"] == [6, 6]
    assert ranks[0]["missing_shard"]["diff"] == 0.0


def test_a_failed_shard_write_stops_every_process_at_once(results):
    for r in scenario_part(results, "write"):
        failure = r["write_failure"]
        assert failure["raised"] == "CheckpointError", failure
        assert "process 1" in failure["message"] and "No space left" in failure["message"], failure
        assert "\n" not in failure["message"] and failure["seconds"] < 30, failure
