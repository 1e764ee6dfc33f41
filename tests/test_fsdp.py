"""FSDP2 building blocks (fewstep.training.fsdp) on CPU with Gloo, 2 processes: gradients of flow matching
and of sCT through the tangent engine equal the one-process full-batch gradients, checkpoints
(weights and Adam state) move between 2 sharded processes and 1 unsharded one, the EMA of
sharded weights equals the unsharded EMA, and the bf16 policy reduces gradients in float32.

One `mp.spawn` runs every distributed check (a module fixture); each test reads its part."""

import contextlib
import copy
import json
import os
import warnings

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

import fewstep.methods.flow as flow_module
import fewstep.methods.sct as sct_module
from fewstep.training.ema import EMA
from fewstep.training.fsdp import (clip_grad_norm, full_optimizer_state, full_state_dict, load_full_optimizer_state,
                          load_full_state_dict, shard)
from fewstep.methods import SCT, FlowMatching
from fewstep.networks.blocks import blocks
from fewstep.networks import MLP, DiT, UNet, network_class
from helpers import init_gloo, run_scenarios, scenario_part, spawn_ranks

WORLD, BATCH = 2, 8


# ----------------------------------------------------------------------------------------------
# The same per-sample random draws in one process (full batch) and in two (halves)


def _draws(shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(BATCH, *shape, generator=gen, dtype=torch.float64) * 0.5
    tau = torch.randn(BATCH, generator=gen, dtype=torch.float64) * 1.4 - 1.0
    t = torch.atan(torch.exp(tau) / 0.5)
    z = torch.randn(BATCH, *shape, generator=gen, dtype=torch.float64)  # unit: the method scales it
    return x0, t, z


@contextlib.contextmanager
def fixed_draws(t: torch.Tensor, z: torch.Tensor):
    """The method's `lognormal_times` and `torch.randn_like` return these rows (restored on exit)."""
    saved = flow_module.lognormal_times, sct_module.lognormal_times, torch.randn_like
    fixed_t = lambda n, *args, dtype=None, **kwargs: t[:n].to(dtype)  # noqa: E731
    flow_module.lognormal_times = sct_module.lognormal_times = fixed_t
    torch.randn_like = lambda x, **kwargs: z.to(x.dtype).reshape(x.shape)
    try:
        yield
    finally:
        flow_module.lognormal_times, sct_module.lognormal_times, torch.randn_like = saved


def _loss(net, method, rows, x0, t, z):
    with fixed_draws(t[rows], z[rows]):
        loss, _ = method(net, x0[rows])
    return loss.mean()


def _nets():
    torch.manual_seed(0)
    mlp = MLP(3, 16, 2).double()
    dit = DiT(1, 4, patch_size=2, hidden_size=16, depth=2, heads=2).double()
    with torch.no_grad():  # DiT starts with a zero output layer: move off it so every gradient counts
        for p in dit.parameters():
            p.add_(0.1 * torch.randn_like(p))
    # the paper networks: EDM's named enc/dec blocks (BlockDict) are the FSDP units; EDM2's logvar head too
    ddpmpp = network_class("ddpmpp")(img_channels=1, img_resolution=4, model_channels=4, channel_mult=(1, 2),
                                      num_blocks=1, attn_resolutions=(2,), dropout=0.0, precond="trigflow").double()
    edm2 = network_class("edm2")(img_channels=1, img_resolution=4, model_channels=4, channel_mult=(1, 2),
                                 num_blocks=1, attn_resolutions=(2,), channels_per_head=4).double()
    with torch.no_grad():
        for p in (*ddpmpp.parameters(), *edm2.parameters()):
            p.add_(0.1 * torch.randn_like(p))
    edm2.eval()  # training mode's forced weight normalization is off under FSDP2 only: compare without it
    return {"mlp": (mlp, (3,)), "dit": (dit, (1, 4, 4)), "ddpmpp": (ddpmpp, (1, 4, 4)), "edm2": (edm2, (1, 4, 4))}


def _full_grads(net) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in net.named_parameters():
        if p.grad is not None:
            out[name] = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad.clone()
    return out


def _rel_err(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    scale = max(v.abs().max().item() for v in b.values())
    return max((a[k] - b[k]).abs().max().item() for k in a) / scale


# ----------------------------------------------------------------------------------------------
# The distributed checks


def _check_gradients(rank, out):
    half = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    for net_name, (net, shape) in _nets().items():
        x0, t, z = _draws(shape)
        # SCT's default JVP mode, traced: on FSDP2 shards it falls back to the engine with a notice
        for method_name, method in (("flow", FlowMatching()), ("sct", SCT())):
            local = copy.deepcopy(net)
            ref = copy.deepcopy(net)
            _loss(ref, method, slice(None), x0, t, z).backward()
            shard(local)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                _loss(local, method, half, x0, t, z).backward()
            notices = [str(w.message) for w in caught if "cannot trace" in str(w.message)]
            got, want = _full_grads(local), _full_grads(ref)
            norm = clip_grad_norm(local.parameters(), 1e9).item()
            want_norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in want.values()])).item()
            out[f"grad_{net_name}_{method_name}"] = {"rel_err": _rel_err(got, want), "params": len(want),
                                                     "notices": notices,
                                                     "norm_err": abs(norm - want_norm) / want_norm}


def _adam_step(net, opt, rows, x0, t, z):
    opt.zero_grad()
    _loss(net, FlowMatching(), rows, x0, t, z).backward()
    opt.step()


def _check_checkpoint(rank, out, out_dir):
    net, shape = _nets()["mlp"]
    x0, t, z = _draws(shape)
    half = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    shard(net)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    _adam_step(net, opt, half, x0, t, z)
    weights = full_state_dict(net)
    tensors, meta = full_optimizer_state(net, opt)
    out["ckpt_rank_sizes"] = [len(weights), len(tensors), len(meta)]
    if rank == 0:
        save_file({**{f"net/{k}": v for k, v in weights.items()}, **{f"opt/{k}": v for k, v in tensors.items()}},
                  os.path.join(out_dir, "step1.safetensors"))
        with open(os.path.join(out_dir, "step1.json"), "w") as f:
            json.dump(meta, f)
    dist.barrier()
    # A fresh, differently initialized pair of processes reads it back.
    torch.manual_seed(1)
    fresh = MLP(3, 16, 2).double()
    shard(fresh)
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=0.5)
    _adam_step(fresh, fresh_opt, half, x0, t, z)  # some state to overwrite
    saved = load_file(os.path.join(out_dir, "step1.safetensors"))
    with open(os.path.join(out_dir, "step1.json")) as f:
        saved_meta = json.load(f)
    load_full_state_dict(fresh, {k[4:]: v for k, v in saved.items() if k.startswith("net/")})
    load_full_optimizer_state(fresh, fresh_opt, {k[4:]: v for k, v in saved.items() if k.startswith("opt/")},
                              saved_meta)
    weights2, (tensors2, meta2) = full_state_dict(fresh), full_optimizer_state(fresh, fresh_opt)
    if rank == 0:
        out["reload_err"] = max((weights2[k] - weights[k]).abs().max().item() for k in weights)
        out["reload_opt_err"] = max((tensors2[k] - tensors[k]).abs().max().item() for k in tensors)
        out["reload_meta_equal"] = meta2 == meta
    _adam_step(fresh, fresh_opt, half, x0, t, z)
    weights3 = full_state_dict(fresh)
    if rank == 0:
        save_file(weights3, os.path.join(out_dir, "step2.safetensors"))


def _check_ema(rank, out):
    net, shape = _nets()["mlp"]
    x0, t, z = _draws(shape)
    half = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    ref, ref_ema = copy.deepcopy(net), EMA(net, decay=0.9)
    ema = EMA(net, decay=0.9)  # the copy is made BEFORE sharding, then sharded the same way
    shard(net)
    shard(ema.net)
    opt, ref_opt = torch.optim.Adam(net.parameters(), lr=1e-2), torch.optim.Adam(ref.parameters(), lr=1e-2)
    for step in range(2):
        _adam_step(net, opt, half, x0, t, z)
        ema.update(net, step)
        _adam_step(ref, ref_opt, slice(None), x0, t, z)
        ref_ema.update(ref, step)
    got = full_state_dict(ema.net)
    if rank == 0:
        want = ref_ema.net.state_dict()
        out["ema_err"] = max((got[k] - want[k]).abs().max().item() for k in want)
        out["ema_moved"] = max((want[k] - ref.state_dict()[k]).abs().max().item() for k in want)


def _check_bf16(rank, out):
    torch.manual_seed(0)
    for name, net, x0 in (("mlp", MLP(3, 16, 2), torch.randn(4, 3)),
                          ("dit", DiT(1, 4, patch_size=2, hidden_size=16, depth=2, heads=2), torch.randn(4, 1, 4, 4))):
        shard(net, "bf16")
        times = []  # the dtype of t where the time embedding receives it
        net.time_emb.register_forward_pre_hook(lambda module, args: times.append(str(args[0].dtype)))
        for method_name, method in (("flow", FlowMatching()), ("sct", SCT(jvp_mode="tangent"))):
            net.zero_grad()
            loss, _ = method(net, x0)
            loss.mean().backward()
            grads = [p.grad for p in net.parameters() if p.grad is not None]
            out[f"bf16_{name}_{method_name}"] = {
                "grad_dtypes": sorted({str(g.dtype) for g in grads}),
                "finite": all(torch.isfinite(g.full_tensor()).all().item() for g in grads),
                "param_dtypes": sorted({str(p.dtype) for p in net.parameters()}),
                "grads": len(grads), "time_dtypes": sorted(set(times))}


def _worker(rank: int, out_dir: str) -> None:
    init_gloo(rank, WORLD, out_dir)
    run_scenarios(rank, out_dir, [("gradients", lambda out: _check_gradients(rank, out)),
                                  ("checkpoint", lambda out: _check_checkpoint(rank, out, out_dir)),
                                  ("ema", lambda out: _check_ema(rank, out)),
                                  ("bf16", lambda out: _check_bf16(rank, out))])


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("fsdp")
    return out_dir, spawn_ranks(_worker, out_dir, WORLD)


def _part(results, name):
    return scenario_part(results[1], name)


# ----------------------------------------------------------------------------------------------
# Tests


def test_blocks_are_the_outermost_module_list_elements():
    nets = _nets()
    assert blocks(nets["mlp"][0]) == list(nets["mlp"][0].blocks)
    assert blocks(nets["dit"][0]) == list(nets["dit"][0].blocks)

    class Nested(nn.Module):
        def __init__(self):
            super().__init__()
            self.stages = nn.ModuleList([nn.Sequential(nn.Linear(2, 2)), nn.ModuleList([nn.Linear(2, 2)])])
            self.inner = nn.Sequential(nn.ModuleList([nn.Linear(2, 2)]))

    net = Nested()
    assert blocks(net) == [net.stages[0], net.stages[1], net.inner[0][0]]
    unet = UNet(1, 8, model_channels=8)
    assert blocks(unet) == [*unet.enc, *unet.mid, *unet.dec]
    ddpmpp = nets["ddpmpp"][0]
    assert blocks(ddpmpp) == [*ddpmpp.model.enc.values(), *ddpmpp.model.dec.values()]


def test_blocks_of_a_diffusers_unet():
    diffusers = pytest.importorskip("diffusers")
    net = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                layers_per_block=1, norm_num_groups=4, down_block_types=("DownBlock2D",) * 2,
                                up_block_types=("UpBlock2D",) * 2)
    assert blocks(net) == [*net.down_blocks, *net.up_blocks, *net.mid_block.attentions, *net.mid_block.resnets]


@pytest.mark.parametrize("net", ["mlp", "dit", "ddpmpp", "edm2"])
@pytest.mark.parametrize("method", ["flow", "sct"])
def test_sharded_gradient_equals_the_full_batch_gradient(results, net, method):
    """Each process its half-batch mean; FSDP2's reduce-scatter averages: the full-batch mean.
    sCT's default JVP (traced) runs the tangent engine on the sharded network, with one notice."""
    for r in _part(results, "gradients"):
        g = r[f"grad_{net}_{method}"]
        assert g["rel_err"] <= 1e-10 and g["params"] > 0, g
        assert g["norm_err"] <= 1e-10, g  # clip_grad_norm: the norm over every shard
        if method == "sct":  # one line naming FSDP2
            assert len(g["notices"]) == 1 and "FSDP2" in g["notices"][0] and "\n" not in g["notices"][0], g


def test_checkpoint_moves_between_two_sharded_processes_and_one(results):
    out_dir, ranks = results
    ranks = _part(results, "checkpoint")
    r0 = ranks[0]
    assert r0["reload_err"] == 0 and r0["reload_opt_err"] == 0 and r0["reload_meta_equal"]
    assert ranks[1]["ckpt_rank_sizes"] == [0, 0, 0]  # the getters gather to process 0 only
    saved = load_file(out_dir / "step1.safetensors")
    meta = json.loads((out_dir / "step1.json").read_text())
    assert {"linear_in.weight/exp_avg", "linear_in.weight/exp_avg_sq", "linear_in.weight/step"} <= {
        k[4:] for k in saved if k.startswith("opt/")}

    # One unsharded process: the same weights and Adam state, then the same next step.
    net, shape = _nets()["mlp"]
    opt = torch.optim.Adam(net.parameters(), lr=0.5)
    load_full_state_dict(net, {k[4:]: v for k, v in saved.items() if k.startswith("net/")})
    load_full_optimizer_state(net, opt, {k[4:]: v for k, v in saved.items() if k.startswith("opt/")}, meta)
    assert opt.param_groups[0]["lr"] == 1e-2 and isinstance(opt.param_groups[0]["betas"], tuple)
    tensors, meta_here = full_optimizer_state(net, opt)
    assert meta_here == meta  # the same format sharded or not
    assert tensors.keys() == {k[4:] for k in saved if k.startswith("opt/")}
    assert all(torch.equal(v, saved[f"opt/{k}"]) for k, v in tensors.items())
    assert all(torch.equal(v, saved[f"net/{k}"]) for k, v in full_state_dict(net).items())

    x0, t, z = _draws(shape)
    opt.zero_grad()
    with fixed_draws(t, z):
        FlowMatching()(net, x0)[0].mean().backward()
    opt.step()
    two = load_file(out_dir / "step2.safetensors")
    err = max((v - two[k]).abs().max().item() for k, v in net.state_dict().items())
    assert err <= 1e-10, err


def test_ema_of_sharded_weights_equals_the_unsharded_ema(results):
    r0 = _part(results, "ema")[0]
    assert r0["ema_err"] <= 1e-12 and r0["ema_moved"] > 1e-4, r0


@pytest.mark.parametrize("net", ["mlp", "dit"])
@pytest.mark.parametrize("method", ["flow", "sct"])
def test_bf16_policy_keeps_float32_gradients(results, net, method):
    for r in _part(results, "bf16"):
        b = r[f"bf16_{net}_{method}"]
        assert b["grad_dtypes"] == ["torch.float32"] and b["finite"] and b["grads"] > 0, b
        assert b["param_dtypes"] == ["torch.float32"], b
        assert b["time_dtypes"] == ["torch.float32"], b  # t is embedded unrounded
