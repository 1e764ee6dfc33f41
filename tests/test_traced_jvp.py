"""The traced JVP (`fewstep.jvp.jvp(..., mode="traced")`, fewstep.jvp.traced, issue 18).

References: float64 central finite differences of whole networks (fewstep's UNet, MLP and DiT,
diffusers' UNet2DModel with attention and DiTTransformer2DModel), and the eager tangent engine.
Networks are tiny: tracing costs a few milliseconds per aten op.
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import pytest
import torch
from torch import nn

from fewstep.jvp import jvp, tangent_forward
from fewstep.jvp import traced
from fewstep.jvp.traced import runner_of
from fewstep.methods.scm import scm_loss
from fewstep.networks import DiT
from helpers import DropoutNet, randomize_zero_params_, tiny_mlp, tiny_unet

DT = torch.float64
EPS = 1e-6


@pytest.fixture(autouse=True)
def _trace_at_first_call(monkeypatch):
    monkeypatch.setattr(traced, "TRACE_AT_CALL", 1)  # each test's network is traced at once


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


class _Diffusers(nn.Module):
    """A diffusers model under fewstep's contract `net(x, t) -> tensor` (class 0 for the DiT)."""

    def __init__(self, net, labels=False):
        super().__init__()
        self.net, self.labels = net, labels

    def forward(self, x, t):
        if self.labels:
            return self.net(x, t, class_labels=torch.zeros(x.shape[0], dtype=torch.long)).sample
        return self.net(x, t).sample


def _diffusers_unet():
    diffusers = pytest.importorskip("diffusers")
    return _Diffusers(diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
        norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D")))


def _diffusers_dit():
    diffusers = pytest.importorskip("diffusers")
    return _Diffusers(diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1, num_layers=1, sample_size=8,
        patch_size=2, num_embeds_ada_norm=1000), labels=True).eval()  # eval: no random class dropout


# name: (build, input shape, whether t is perturbed in the finite differences). diffusers embeds
# its timesteps in float32 even in a float64 model (`timesteps.float()`), so along t a float64
# finite difference is meaningless; there t is checked against the eager engine only.
NETS = {
    "unet": (lambda: tiny_unet(channel_mult=(1,), attn_resolutions=(8,)), (2, 2, 8, 8), True),
    "mlp": (tiny_mlp, (3, 3), True),
    "dit": (lambda: DiT(2, 8, patch_size=2, hidden_size=16, depth=1, heads=2), (2, 2, 8, 8), True),
    "diffusers_unet": (_diffusers_unet, (1, 1, 8, 8), False),
    "diffusers_dit": (_diffusers_dit, (1, 1, 8, 8), False),
}


def _build(name):
    build, shape, along_t = NETS[name]
    net = randomize_zero_params_(build()).double()
    x, t = torch.randn(*shape, dtype=DT), torch.rand(shape[0], dtype=DT) * 1.4 + 0.05
    return net, x, t, along_t


@pytest.mark.parametrize("name", list(NETS))
def test_traced_equals_finite_differences_and_the_engine(name):
    net, x, t, along_t = _build(name)
    x_dot, t_dot = torch.randn_like(x), torch.randn_like(t)
    out, tout = jvp(net, (x, t), (x_dot, t_dot), mode="traced")
    assert runner_of(net).traces == 1, "the network fell back to the engine"
    ref_out, ref = tangent_forward(net, (x, t), (x_dot, t_dot))
    assert rel(tout, ref) < 1e-12
    assert not tout.requires_grad and tout.grad_fn is None
    # Along x (and t where float64 differences are meaningful): the tangent is linear in
    # (x_dot, t_dot), so the t part is the engine's along t alone when t is not perturbed.
    rest = 0.0 if along_t else tangent_forward(net, (x, t), (None, t_dot))[1]
    with torch.no_grad():
        plain = net(x, t)
        dt = EPS * t_dot if along_t else 0.0
        fd = (net(x + EPS * x_dot, t + dt) - net(x - EPS * x_dot, t - dt)) / (2 * EPS)
    assert torch.equal(out, plain)
    assert rel(tout - rest, fd) < 1e-7


@pytest.mark.parametrize("name", ["unet", "mlp", "dit"])
def test_class_conditional_networks_are_traced_not_sent_to_the_engine(name):
    """The label range check reads values, which a trace has not: it must not make a class-
    conditional network fall back to the eager engine (it did, with a notice, for fewstep's own)."""
    build = {"unet": lambda: tiny_unet(num_classes=3), "mlp": lambda: tiny_mlp(num_classes=3),
             "dit": lambda: DiT(2, 8, patch_size=2, hidden_size=16, depth=1, heads=2, num_classes=3)}[name]
    net = randomize_zero_params_(build()).double()
    shape = (3, 3) if name == "mlp" else (3, 2, 8, 8)
    x, t, labels = torch.randn(*shape, dtype=DT), torch.rand(3, dtype=DT) + 0.1, torch.tensor([0, 2, 3])
    x_dot, t_dot = torch.randn_like(x), torch.randn_like(t)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback notice
        out, tout = jvp(net, (x, t), (x_dot, t_dot), {"labels": labels}, mode="traced")
    assert runner_of(net).traces == 1
    ref_out, ref = tangent_forward(net, (x, t), (x_dot, t_dot), {"labels": labels})
    assert torch.equal(out, ref_out) and rel(tout, ref) < 1e-12
    with pytest.raises(ValueError, match="labels must be in"):  # eager calls still check the values
        net(x, t, labels=torch.tensor([0, 2, 7]))


def test_sct_gradients_through_traced_and_tangent_agree():
    net, x, t, _ = _build("dit")
    dxdt = torch.randn_like(x)
    grads = {}
    for mode in ("traced", "tangent"):
        net.zero_grad()
        loss, _ = scm_loss(net, x, t, dxdt, 0.5, jvp_mode=mode)
        loss.mean().backward()
        grads[mode] = [p.grad.clone() for p in net.parameters()]
    for a, b in zip(grads["traced"], grads["tangent"]):
        assert rel(a, b) < 1e-12


def _saved_bytes(fn) -> int:
    """Bytes autograd saves for the backward during `fn()` (what a training step keeps alive)."""
    total = [0]

    def pack(x):
        total[0] += x.numel() * x.element_size()
        return x
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        fn()
    return total[0]


def test_autograd_records_only_the_primal():
    net, x, t, _ = _build("dit")
    net.float()
    x, t = x.float(), t.float()
    jvp(net, (x, t), (torch.randn_like(x), 1.0), mode="traced")  # traced outside the count
    flow = _saved_bytes(lambda: net(x, t))
    traced = _saved_bytes(lambda: jvp(net, (x, t), (torch.randn_like(x), 1.0), mode="traced"))
    assert traced <= 1.05 * flow, (traced, flow)


class GradAware(nn.Module):
    """Computes one thing when its weights need gradients and another when not, as CUDA's
    attention does (its logsumexp, saved for backward, only for inputs that need grad)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))

    def forward(self, x, t):
        gain = 2.0 if self.w.requires_grad and torch.is_grad_enabled() else 3.0
        return gain * self.w * x + t[:, None]


def test_the_trace_sees_the_grad_requirements_of_the_replay():
    net, x, t = GradAware(), torch.randn(4, 3), torch.rand(4)
    tangents = (torch.randn_like(x), torch.randn_like(t))
    ref, tref = tangent_forward(net, (x, t), tangents)
    for _ in range(2):  # the second call traces
        out, tout = jvp(net, (x, t), tangents, mode="traced")
    assert runner_of(net).traces == 1
    assert torch.equal(out, ref) and torch.equal(tout, tref)
    out.sum().backward()
    assert torch.allclose(net.w.grad, 2.0 * x.sum(0))


def test_dropout_draws_one_mask_for_primal_and_tangent():
    net = DropoutNet().double().train()
    x, t = torch.randn(64, 4, dtype=DT), torch.rand(64, dtype=DT)
    x_dot, t_dot = torch.randn_like(x), torch.randn_like(t)

    def run(fn, seed=7):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return fn()

    run(lambda: jvp(net, (x, t), (x_dot, t_dot), mode="traced"))  # trace
    out, tout = run(lambda: jvp(net, (x, t), (x_dot, t_dot), mode="traced"))
    assert torch.equal(out, run(lambda: net(x, t)))  # the mask a plain forward draws
    fd = (run(lambda: net(x + EPS * x_dot, t + EPS * t_dot)) - run(lambda: net(x - EPS * x_dot, t - EPS * t_dot)))
    assert rel(tout, fd / (2 * EPS)) < 1e-7
    other, _ = run(lambda: jvp(net, (x, t), (x_dot, t_dot), mode="traced"), seed=8)
    assert not torch.equal(other, out)  # each replay draws a fresh mask


def _fit_traced(out, steps):
    from fewstep import fit
    from fewstep.methods import SCT

    torch.manual_seed(0)
    net = tiny_mlp(dim=2, dropout=0.3)
    data = [0.5 * torch.randn(16, 2, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    fit(net, SCT(jvp_mode="traced"), data, out, steps=steps, ckpt_every=0, log_every=2, progress=False)


def test_a_resumed_run_draws_the_dropout_masks_of_the_uninterrupted_run(tmp_path):
    """4 steps at once == 2 steps, stop, resume for 2 more, bit for bit, with dropout: the resumed
    process traces at another step, and the trace itself must not advance the RNG."""
    from fewstep.training import checkpoint as ckpt

    _fit_traced(tmp_path / "full", 4)
    _fit_traced(tmp_path / "split", 2)
    _fit_traced(tmp_path / "split", 4)
    full, _ = ckpt.load_checkpoint(tmp_path / "full")
    split, state = ckpt.load_checkpoint(tmp_path / "split")
    assert state["step"] == 4 and full.keys() == split.keys()
    for k in full:
        assert torch.equal(full[k], split[k]), k


class Branchy(nn.Module):
    """A forward that branches on a tensor's value: not traceable."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)

    def forward(self, x, t):
        h = self.a(x) * t[:, None]
        return h.sin() if h.sum() > 0 else h.cos()


def test_data_dependent_control_flow_falls_back_with_one_notice():
    net = Branchy().double()
    x, t, x_dot = torch.randn(2, 3, dtype=DT), torch.rand(2, dtype=DT), torch.randn(2, 3, dtype=DT)
    with pytest.warns(UserWarning, match=r"cannot trace Branchy .*mode='tangent'") as record:
        out, tout = jvp(net, (x, t), (x_dot, None), mode="traced")
    assert len([w for w in record if "cannot trace" in str(w.message)]) == 1
    assert "\n" not in str(record[0].message)
    assert rel(tout, tangent_forward(net, (x, t), (x_dot, None))[1]) < 1e-14
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per network
        jvp(net, (x, t), (x_dot, None), mode="traced")


def test_a_signature_is_traced_at_its_second_call(monkeypatch):
    monkeypatch.setattr(traced, "TRACE_AT_CALL", 2)
    net, x, t, _ = _build("mlp")
    jvp(net, (x, t), (torch.randn_like(x), 1.0), mode="traced")
    assert runner_of(net).traces == 0  # a one-off call runs the engine
    x_dot = torch.randn_like(x)
    _, tout = jvp(net, (x, t), (x_dot, 1.0), mode="traced")
    assert runner_of(net).traces == 1
    assert rel(tout, tangent_forward(net, (x, t), (x_dot, 1.0))[1]) < 1e-12


def test_one_trace_per_signature():
    net, x, t, _ = _build("mlp")
    for _ in range(3):
        jvp(net, (x, torch.rand_like(t)), (torch.randn_like(x), 1.0), mode="traced")
    assert runner_of(net).traces == 1  # new values, the same graph
    jvp(net, (x[:2], t[:2]), (torch.randn_like(x[:2]), 1.0), mode="traced")  # a new batch size
    net.eval()
    _, tout = jvp(net, (x, t), (None, 1.0), mode="traced")  # eval mode, no x tangent
    assert runner_of(net).traces == 3
    assert rel(tout, tangent_forward(net, (x, t), (None, 1.0))[1]) < 1e-12


def _ddp_worker(rank: int, world: int, out_dir: str) -> None:
    import json

    import torch.distributed as dist

    from helpers import init_gloo

    init_gloo(rank, world, out_dir)
    torch.manual_seed(0)  # the same weights and data everywhere; each rank takes its half
    net = randomize_zero_params_(tiny_mlp(adaptive_weight=False)).double()
    x, t, dxdt = torch.randn(4, 3, dtype=DT), torch.rand(4, dtype=DT) + 0.1, torch.randn(4, 3, dtype=DT)
    ddp = nn.parallel.DistributedDataParallel(net, static_graph=True)  # as fewstep's fit wraps it
    half = slice(2 * rank, 2 * rank + 2)
    for _ in range(2):  # the second step runs the cached graph
        net.zero_grad()
        loss, _ = scm_loss(ddp, x[half], t[half], dxdt[half], 0.5, jvp_mode="traced")
        loss.mean().backward()
    full = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    for part in (slice(0, 2), slice(2, 4)):  # the reference: the mean of both halves' gradients
        loss, _ = scm_loss(net, x[part], t[part], dxdt[part], 0.5, jvp_mode="tangent")
        (loss.mean() / 2).backward()
    err = max(rel(a, p.grad) for a, p in zip(full, net.parameters()))
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump({"err": err, "traces": runner_of(net).traces}, f)
    dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes: ~15 s
def test_under_ddp_the_gradients_are_all_reduced(tmp_path):
    """The joint graph runs inside DDP's forward: DDP's all-reduce averages the gradients."""
    import json

    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    for r in (0, 1):
        result = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert result["err"] < 1e-12 and result["traces"] == 1, result


def test_a_compiled_network_compiles_its_graph_once_per_signature():
    """A `torch.compile`'d network (train.compile) gets its joint graph compiled with the same
    backend (aot_eager here: dynamo + AOT autograd without code generation, fast on CPU); 20 steps
    with fresh t compile nothing after the first."""
    from torch._dynamo.utils import counters

    net, x, t, _ = _build("mlp")
    torch._dynamo.reset()
    compiled = torch.compile(net, backend="aot_eager")
    x_dot = torch.randn_like(x)
    jvp(compiled, (x, t), (x_dot, 1.0), mode="traced")
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    for _ in range(20):
        t = torch.rand_like(t)
        out, tout = jvp(compiled, (x, t), (x_dot, 1.0), mode="traced")
        out.square().mean().backward()
    assert counters["stats"]["unique_graphs"] == graphs  # no recompile
    assert rel(tout, tangent_forward(net, (x, t), (x_dot, 1.0))[1]) < 1e-12


@pytest.mark.slow
def test_inductor_compiled_tangent_is_exact():
    """`compile=True`: inductor's code for the joint graph, against the engine in float64."""
    net, x, t, _ = _build("mlp")
    x_dot = torch.randn_like(x)
    for _ in range(2):
        t = torch.rand_like(t)
        out, tout = jvp(net, (x, t), (x_dot, 1.0), mode="traced", compile=True)
        assert rel(tout, tangent_forward(net, (x, t), (x_dot, 1.0))[1]) < 1e-12


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or importlib.util.find_spec("triton") is None,
                    reason="the Triton kernel runs on CPU only in Triton's interpreter "
                           "(TRITON_INTERPRET=1 python -m pytest -q tests/test_traced_jvp.py)")
def test_the_fused_attention_kernel_is_one_node_of_the_graph(monkeypatch):
    """On CUDA the attention rule runs the Triton kernel: a custom op, so the traced graph holds it
    (a raw kernel launch would be invisible to the tracer and leave the tangent unwritten)."""
    from fewstep.jvp import attention as aj

    monkeypatch.setattr(aj, "DEFAULT_BACKEND", "triton")
    net = randomize_zero_params_(DiT(1, 8, patch_size=2, hidden_size=32, depth=1, heads=2))  # head dim 16
    x, t = torch.randn(2, 1, 8, 8), torch.rand(2)
    tangents = (torch.randn_like(x), torch.randn_like(t))
    _, tout = jvp(net, (x, t), tangents, mode="traced")
    graph = next(iter(runner_of(net).graphs.values()))[0].graph
    assert any("attention_tangent_fused" in str(n.target) for n in graph.nodes)
    monkeypatch.setattr(aj, "DEFAULT_BACKEND", "math")
    ref = tangent_forward(net, (x, t), tangents)[1]
    assert (tout - ref).abs().max() <= 1e-5 * ref.abs().max()


# ---------------------------------------------------------------------------------------------
# CUDA (benchmarks/gpu_check.sh): the Triton kernel compiled for real, in the traced graph.

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
                                reason="needs CUDA and Triton")


@needs_cuda
@pytest.mark.parametrize("L,S,E,causal,dtype", [(64, 64, 16, False, torch.float32), (200, 137, 64, True, torch.float32),
                                                (1024, 1024, 64, False, torch.bfloat16),
                                                (333, 500, 128, True, torch.float16)])
def test_cuda_kernel_matches_math(L, S, E, causal, dtype):
    from fewstep.jvp.attention import attention_tangent_fused, attention_tangent_math

    gen = torch.Generator(device="cuda").manual_seed(L)
    q, k, v, qd, kd, vd = (torch.randn(2, 4, n, E, device="cuda", generator=gen, dtype=dtype)
                           for n in (L, S, S, L, S, S))
    got = attention_tangent_fused(q, k, v, qd, kd, vd, causal, None).double()
    ref = attention_tangent_math(*(x.double() for x in (q, k, v, qd, kd, vd)), is_causal=causal)
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # fp32: exact formulas, fp32 rounding; 16-bit: p rounded
    assert (got - ref).abs().max() <= tol * ref.abs().max()


@needs_cuda
def test_cuda_traced_and_compiled_dit():
    net = randomize_zero_params_(DiT(4, 16, patch_size=2, hidden_size=128, depth=2, heads=2)).cuda()  # head dim 64
    x, t = torch.randn(4, 4, 16, 16, device="cuda"), torch.rand(4, device="cuda")
    tangents = (torch.randn_like(x), torch.randn_like(t))
    ref = tangent_forward(net, (x, t), tangents)[1]
    _, tout = jvp(net, (x, t), tangents, mode="traced")
    graph = next(iter(runner_of(net).graphs.values()))[0].graph
    assert any("attention_tangent_fused" in str(n.target) for n in graph.nodes)
    assert (tout - ref).abs().max() <= 1e-5 * ref.abs().max()
    out, tout = jvp(net, (x, t), tangents, mode="traced", compile=True)
    assert (tout - ref).abs().max() <= 1e-4 * ref.abs().max()  # inductor reorders fp32 sums
    out.square().mean().backward()
