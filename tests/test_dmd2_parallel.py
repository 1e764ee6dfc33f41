"""A two-network method (DMD2: the generator and its fake score, 1.25 fake-score updates per step)
under 2-process DDP and FSDP2 (CPU, Gloo): both processes are killed with SIGKILL at step 3; the run
resumed from its last checkpoint (step 2, inside a cycle of the two time scales) ends bit-identical
to a run that was never interrupted, the fake score's weights and optimizer included.

Three `mp.spawn`s (a module fixture): the straight runs and the DDP run that is killed; the DDP
resume and the FSDP run that is killed; the FSDP resume."""

import copy
import json
import os
import signal
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fewstep import Callback, fit
from fewstep.methods import DMD2
from fewstep.networks import MLP
from fewstep.training import checkpoint as ckpt
from helpers import init_gloo, rank_batches

WORLD, STEPS, KILL_AT = 2, 5, 3


class _KillAt(Callback):
    def needs_ema(self, run):  # asked of every process after each step, before its checkpoint
        if run.step == KILL_AT:  # both processes die after step 3's update (the last checkpoint is step 2's)
            os.kill(os.getpid(), signal.SIGKILL)
        return False


def _fit(rank, parallel, out, kill=False):
    torch.manual_seed(0)
    teacher = MLP(2, 16, 2).double()
    with torch.no_grad():
        teacher.linear_out.weight.normal_(0, 0.3)
    student = copy.deepcopy(teacher)
    method = DMD2(fake_updates=1.25)
    method.set_teacher(teacher, "trigflow")
    fit(student, method, rank_batches(rank, STEPS, WORLD), out, steps=STEPS, parallel=parallel, device="cpu",
        progress=False, ckpt_every=2, keep_ckpts=5, callbacks=[_KillAt()] if kill else [])


def _worker(rank, out_dir, stage):
    init_gloo(rank, WORLD, out_dir, timeout=30, store=f"store-{stage}", torchrun_env=True)
    plan = {0: [("ddp", "straight"), ("fsdp", "straight"), ("ddp", "kill")],
            1: [("ddp", "resume"), ("fsdp", "kill")], 2: [("fsdp", "resume")]}[stage]
    try:
        for parallel, what in plan:
            if what == "resume" and rank == 0:  # what the killed run left
                found = ckpt.list_checkpoints(os.path.join(out_dir, f"{parallel}-split", "checkpoints"))
                with open(os.path.join(out_dir, f"{parallel}-left.json"), "w") as f:
                    json.dump([p.name for p in found], f)
            _fit(rank, parallel, os.path.join(out_dir, f"{parallel}-{'straight' if what == 'straight' else 'split'}"),
                 kill=what == "kill")
    except Exception:  # noqa: BLE001 - process 1 fails when process 0 is killed: expected
        with open(os.path.join(out_dir, f"error-{stage}-rank{rank}.txt"), "w") as f:
            f.write(traceback.format_exc()[-3000:])
        raise
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("dmd2-parallel")
    for stage in range(3):
        try:
            mp.spawn(_worker, args=(str(out_dir), stage), nprocs=WORLD, join=True)
        except mp.ProcessExitedException as e:  # the killed run
            assert stage < 2 and e.exit_code == -signal.SIGKILL, e
    return out_dir


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_dmd2_resumes_bit_identically_after_kill_9(runs, parallel):
    straight, split = runs / f"{parallel}-straight", runs / f"{parallel}-split"
    a, meta_a = ckpt.load_checkpoint(straight)
    b, meta_b = ckpt.load_checkpoint(split)
    assert meta_a["step"] == meta_b["step"] == STEPS
    assert json.loads((runs / f"{parallel}-left.json").read_text()) == ["ckpt-0000002.json"]  # killed after step 3
    assert meta_b["auxiliaries"]["fake_score"]["updates"] == int(1.25 * STEPS)
    keys = [k for k in a if k.startswith(("net.", "ema.", "optim.", "aux."))]
    assert any(k.startswith("aux.fake_score.optim.") for k in keys)
    for key in keys:
        assert torch.equal(a[key], b[key]), key
