"""The tangent engine (`fewstep.jvp.engine`) on fewstep's own layers and networks, and the
sCT loss through it.

Reference: `torch.func.jvp` of the layer's plain `forward`, in float64 (math SDPA backend: the
fused kernels have no forward AD). The engine runs the ordinary `forward` once and carries
tangents beside it; no module has a second, hand-written tangent forward.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from fewstep.methods import SCT
from fewstep.methods.scm import JVP_MODES, scm_loss
from fewstep.networks import MLP, DiT, UNet
from fewstep.jvp.engine import tangent_forward
from fewstep.networks.layers import AdaDoubleNorm, PositionalEmbedding, ResBlock2d, SelfAttention2d, TimeEmbedding, pnorm
from fewstep.networks.unet import _Stage
from fewstep.core.trigflow import lognormal_times, trigflow_noise, trigflow_velocity

DT = torch.float64
TOL = 1e-6


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def randomize(module: nn.Module, std: float = 0.3) -> nn.Module:
    """Nonzero weights everywhere (zero-initialized output layers would make tangents trivial)."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std if p.ndim > 1 else 0.5)
    return module.to(DT)


class Call(nn.Module):
    """A function as a module, so that the engine runs it through `__call__`."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def check(fn, primals, tangents):
    """The engine's `(y, y_dot)` of `fn` against `torch.func.jvp(fn, primals, tangents)`."""
    module = fn if isinstance(fn, nn.Module) else Call(fn)
    primals = [p.requires_grad_() if p.is_floating_point() else p for p in primals]
    y, y_dot = tangent_forward(module, tuple(primals), tuple(tangents))
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        y_ref, y_dot_ref = torch.func.jvp(module, tuple(p.detach() for p in primals), tuple(tangents))
    assert y_dot.grad_fn is None and not y_dot.requires_grad, "the tangent must carry no graph"
    assert rel_err(y.detach(), y_ref) <= 1e-12
    assert rel_err(y_dot, y_dot_ref) <= TOL, rel_err(y_dot, y_dot_ref)
    return y, y_dot


def randn(*shape):
    return torch.randn(*shape, dtype=DT)


# ------------------------------------------------------------------------------------------------
# Single ops and layers.


@pytest.mark.parametrize("module", [nn.Linear(5, 7), nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1),
                                    nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"),
                                    nn.Conv1d(3, 2, 3, stride=2), nn.Identity()])
def test_affine(module):
    module = randomize(module)
    x = randn(2, 5) if isinstance(module, nn.Linear) else randn(2, 3, 6) if isinstance(module, nn.Conv1d) \
        else randn(2, 3, 6, 6)
    check(module, (x,), (randn(*x.shape),))


@pytest.mark.parametrize("module", [nn.SiLU(), nn.GELU(), nn.GELU(approximate="tanh")])
def test_activations(module):
    x = randn(3, 4, 5) * 3
    check(module, (x,), (randn(3, 4, 5),))


@pytest.mark.parametrize("module", [nn.GroupNorm(2, 6, affine=False), nn.GroupNorm(3, 6),
                                    nn.LayerNorm(6, elementwise_affine=False), nn.LayerNorm(6)])
def test_norms(module):
    module = randomize(module)
    x = randn(3, 6, 4, 5) * 2 + 1 if isinstance(module, nn.GroupNorm) else randn(3, 5, 6) * 2 + 1
    check(module, (x,), (randn(*x.shape),))


def test_pnorm():
    check(pnorm, (randn(4, 8),), (randn(4, 8),))
    check(pnorm, (randn(2, 8, 3, 3),), (randn(2, 8, 3, 3),))


def test_positional_embedding_carries_the_time_tangent():
    pos = PositionalEmbedding(16).to(DT)
    t, t_dot = torch.rand(5, dtype=DT) * 1.5, randn(5)
    check(pos, (t,), (t_dot,))


@pytest.mark.parametrize("num_classes", [0, 4])
def test_time_embedding(num_classes):
    emb = randomize(TimeEmbedding(16, 32, num_classes))
    t, t_dot = torch.rand(5, dtype=DT) * 1.5, randn(5)
    labels = torch.tensor([0, 1, 2, 3, 4]) if num_classes else None
    check(lambda t: emb(t, labels), (t,), (t_dot,))


def test_time_embedding_with_guidance_input():
    """The guidance scale is an input like the label: it shifts the embedding, carries no tangent,
    and starts at zero so that a student copied from its teacher is the teacher for every w."""
    emb = TimeEmbedding(16, 32, 4, guidance_input=True).to(DT)
    t, labels = torch.rand(5, dtype=DT) * 1.5, torch.tensor([0, 1, 2, 3, 4])
    torch.testing.assert_close(emb(t, labels, torch.full((5,), 3.0, dtype=DT)), emb(t, labels))
    randomize(emb)
    w = torch.tensor([1.0, 1.5, 2.0, 4.0, 7.0], dtype=DT)
    assert rel_err(emb(t, labels, w), emb(t, labels)) > 1e-2  # None means w = 1
    torch.testing.assert_close(emb(t, labels, 1.0), emb(t, labels))
    check(lambda t: emb(t, labels, w), (t,), (randn(5),))


@pytest.mark.parametrize("image", [True, False])
def test_ada_double_norm(image):
    norm = randomize(AdaDoubleNorm(8, 12, image=image))
    x = randn(3, 8, 4, 4) if image else randn(3, 8)
    check(norm, (x, randn(3, 12)), (randn(*x.shape), randn(3, 12)))


def test_attention():
    q, k, v = (randn(2, 3, 10, 4) * 2 for _ in range(3))
    tangents = tuple(randn(2, 3, 10, 4) for _ in range(3))
    check(torch.nn.functional.scaled_dot_product_attention, (q, k, v), tangents)


@pytest.mark.parametrize("heads", [1, 2])
def test_self_attention(heads):
    attn = randomize(SelfAttention2d(8, heads))
    x = randn(2, 8, 4, 4)
    check(attn, (x,), (randn(2, 8, 4, 4),))


@pytest.mark.parametrize("in_ch,out_ch", [(8, 8), (8, 12)])
def test_resblock(in_ch, out_ch):
    block = randomize(ResBlock2d(in_ch, out_ch, 16, dropout=0.3)).eval()
    x = randn(2, in_ch, 6, 6)
    check(block, (x, randn(2, 16)), (randn(2, in_ch, 6, 6), randn(2, 16)))


@pytest.mark.parametrize("resample", ["down", "up"])
def test_resampling(resample):
    stage = _Stage(None, None, resample=resample)
    emb = randn(2, 4)
    check(lambda h: stage(h, emb), (randn(2, 3, 4, 4),), (randn(2, 3, 4, 4),))


# ------------------------------------------------------------------------------------------------
# Dropout: one mask for the primal and the tangent.


def test_dropout_shares_one_mask():
    x, x_dot, p = randn(4, 50) + 3.0, randn(4, 50), 0.4  # x != 0, so the mask is readable from y
    y, y_dot = tangent_forward(nn.Dropout(p).train(), (x.requires_grad_(),), (x_dot,))
    mask = (y.detach() != 0).to(DT)
    assert 0 < mask.mean() < 1
    with torch.no_grad():
        y_ref, y_dot_ref = torch.func.jvp(lambda x: x * mask / (1 - p), (x.detach(),), (x_dot,))
    assert rel_err(y.detach(), y_ref) <= 1e-12 and rel_err(y_dot, y_dot_ref) <= 1e-12
    assert torch.equal(tangent_forward(nn.Dropout(p).eval(), (x,), (x_dot,))[1], x_dot)


def test_dropout_in_train_mode_matches_jvp_with_the_same_mask():
    """A ResBlock in train mode: replaying the RNG gives `F.dropout` under `torch.func.jvp` the
    same mask (on CPU `native_dropout` and `F.dropout` draw identically), so the reference is the
    JVP of the same op with that fixed mask."""
    block = randomize(ResBlock2d(6, 6, 8, dropout=0.5)).train()
    x, emb, x_dot, emb_dot = randn(3, 6, 5, 5), randn(3, 8), randn(3, 6, 5, 5), randn(3, 8)
    torch.manual_seed(1)
    y, y_dot = tangent_forward(block, (x, emb), (x_dot, emb_dot))
    torch.manual_seed(1)
    with torch.no_grad():
        y_ref, y_dot_ref = torch.func.jvp(block, (x, emb), (x_dot, emb_dot))
    assert rel_err(y, y_ref) <= 1e-12 and rel_err(y_dot, y_dot_ref) <= TOL
    torch.manual_seed(2)  # a different mask gives a different output: the test has teeth
    assert rel_err(block(x, emb), y_ref) > 1e-3


# ------------------------------------------------------------------------------------------------
# Whole networks.


def small_unet(**kw):
    return randomize(UNet(3, 8, 8, (1, 2), 1, attn_resolutions=(4,), attn_heads=2, num_classes=5,
                          dropout=0.2, **kw), std=0.2)


def test_unet():
    net = small_unet().eval()
    x, t, labels = randn(3, 3, 8, 8), torch.rand(3, dtype=DT) * 1.5, torch.tensor([0, 4, 5])
    check(lambda x, t: net(x, t, labels), (x, t), (randn(3, 3, 8, 8), randn(3)))


def test_mlp():
    net = randomize(MLP(2, 32, 3, dropout=0.2, num_classes=3)).eval()
    x, t = randn(6, 2), torch.rand(6, dtype=DT) * 1.5
    check(net, (x, t), (randn(6, 2), randn(6)))


def test_dit():
    net = randomize(DiT(2, 8, patch_size=2, hidden_size=16, depth=2, heads=2, num_classes=3), std=0.2).eval()
    x, t, labels = randn(3, 2, 8, 8), torch.rand(3, dtype=DT) * 1.5, torch.tensor([0, 2, 3])
    check(lambda x, t: net(x, t, labels), (x, t), (randn(3, 2, 8, 8), randn(3)))


@pytest.mark.parametrize("arch", ["unet", "mlp"])
def test_networks_with_guidance_input(arch):
    if arch == "unet":
        net = small_unet(guidance_input=True).eval()
        x, labels = randn(3, 3, 8, 8), torch.tensor([0, 4, 5])
    else:
        net = randomize(MLP(2, 32, 3, num_classes=3, guidance_input=True)).eval()
        x, labels = randn(3, 2), torch.tensor([0, 1, 3])
    t, w = torch.rand(3, dtype=DT) * 1.5, torch.tensor([1.0, 2.5, 5.0], dtype=DT)
    check(lambda x, t: net(x, t, labels, w), (x, t), (randn(*x.shape), randn(3)))
    assert net.guidance_input and rel_err(net(x, t, labels, w), net(x, t, labels)) > 1e-3


def test_unet_tangent_is_linear_in_the_input_tangents():
    net = small_unet().eval()
    x, t = randn(2, 3, 8, 8), torch.rand(2, dtype=DT)
    xd, td = randn(2, 3, 8, 8), randn(2)
    _, a = tangent_forward(net, (x, t), (xd, torch.zeros(2, dtype=DT)))
    _, b = tangent_forward(net, (x, t), (torch.zeros_like(xd), td))
    _, ab = tangent_forward(net, (x, t), (2 * xd, -3 * td))
    assert rel_err(ab, 2 * a - 3 * b) <= 1e-12


# ------------------------------------------------------------------------------------------------
# The sCT loss through the engine.


def sct_grads(net, jvp_mode, x0, labels=None):
    """Per-sample sCT loss (l2 tangent normalization, adaptive weighting) and all gradients."""
    gen = torch.Generator().manual_seed(3)  # same t, z for every mode
    t = lognormal_times(x0.shape[0], -1.0, 1.4, 0.5, dtype=DT, generator=gen)
    z = torch.randn(x0.shape, dtype=DT, generator=gen) * 0.5
    torch.manual_seed(4)  # same dropout masks for every mode
    net.zero_grad(set_to_none=True)
    loss, _ = scm_loss(net, trigflow_noise(x0, z, t), t, trigflow_velocity(x0, z, t), 0.5, labels,
                       jvp_mode=jvp_mode)
    loss.mean().backward()
    return loss.detach(), [p.grad.clone() for p in net.parameters()]


@pytest.mark.parametrize("kind", ["unet", "mlp", "dit"])
def test_sct_gradients_match_the_reference_path(kind):
    if kind == "unet":
        net = randomize(UNet(3, 8, 8, (1, 2), 1, attn_resolutions=(4,), num_classes=3), std=0.2)
        x0, labels = randn(4, 3, 8, 8) * 0.5, torch.tensor([0, 1, 2, 3])
    elif kind == "dit":
        net = randomize(DiT(2, 8, patch_size=2, hidden_size=16, depth=1, heads=2), std=0.2)
        x0, labels = randn(4, 2, 8, 8) * 0.5, None
    else:
        net = randomize(MLP(2, 32, 2, num_classes=0))
        x0, labels = randn(6, 2) * 0.5, None
    net.train()
    loss_ref, grads_ref = sct_grads(net, "separate", x0, labels)
    loss, grads = sct_grads(net, "tangent", x0, labels)
    assert rel_err(loss, loss_ref) <= 1e-12
    for g, g_ref in zip(grads, grads_ref):
        assert rel_err(g, g_ref) <= TOL


def test_sct_with_dropout_in_train_mode_matches_the_separate_path():
    # On CPU the separate path replays the RNG for its graded forward, so both paths use the
    # same masks; any mismatch between the tangent's and the primal's masks would show here.
    net = randomize(UNet(3, 8, 8, (1, 2), 1, dropout=0.3), std=0.2).train()
    x0 = randn(4, 3, 8, 8) * 0.5
    loss_ref, grads_ref = sct_grads(net, "separate", x0)
    loss, grads = sct_grads(net, "tangent", x0)
    assert rel_err(loss, loss_ref) <= 1e-12
    assert all(rel_err(g, g_ref) <= TOL for g, g_ref in zip(grads, grads_ref))


def test_config_accepts_the_tangent_mode():
    assert "tangent" in JVP_MODES and SCT().jvp_mode == "traced" and SCT(jvp_mode="tangent").jvp_mode == "tangent"
    with pytest.raises(ValueError, match="jvp_mode"):
        SCT(jvp_mode="fast")


def test_bf16_autocast_runs_and_stays_close():
    net = UNet(3, 8, 8, (1, 2), 1, attn_resolutions=(4,))
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.1)
    x, t, xd, td = torch.randn(2, 3, 8, 8), torch.rand(2), torch.randn(2, 3, 8, 8), torch.randn(2)
    y32, yd32 = tangent_forward(net, (x, t), (xd, td))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16, yd16 = tangent_forward(net, (x, t), (xd, td))
    assert torch.isfinite(yd16).all()
    assert rel_err(y16.float().detach(), y32.detach()) < 0.05 and rel_err(yd16.float(), yd32) < 0.05


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_unet_on_cuda_matches_jvp():
    """The engine on CUDA (fused attention for the primal, the Triton kernel or the math path for
    its tangent) against the JVP with math attention."""
    net = UNet(3, 16, 32, (1, 2), 1, attn_resolutions=(8,)).cuda()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.05)
    x, t, xd, td = torch.randn(2, 3, 16, 16, device="cuda"), torch.rand(2, device="cuda"), \
        torch.randn(2, 3, 16, 16, device="cuda"), torch.randn(2, device="cuda")
    y, yd = tangent_forward(net, (x, t), (xd, td))
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        y_ref, yd_ref = torch.func.jvp(net, (x, t), (xd, td))
    assert rel_err(y.detach(), y_ref) < 1e-3 and rel_err(yd, yd_ref) < 1e-3


# ------------------------------------------------------------------------------------------------
# An unmodified diffusers UNet2DModel (default attention processor: fused SDPA)


def tiny_diffusers_unet():
    pytest.importorskip("diffusers")
    from fewstep.interop.diffusers.network import DiffusersNetwork

    net = DiffusersNetwork("UNet2DModel", {
        "sample_size": 8, "in_channels": 2, "out_channels": 2, "block_out_channels": [8, 16],
        "layers_per_block": 1, "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "norm_num_groups": 4, "attention_head_dim": 8})
    return randomize(net, std=0.2)


def test_sct_gradients_through_the_engine_on_a_diffusers_unet():
    """`torch.func.jvp` cannot run through this network on CPU (fused SDPA; group_norm on a
    non-contiguous tangent), so the reference JVP is a float64 central finite difference; the
    gradient is then the same loss's gradient through a plain forward (the JVP carries none)."""
    from fewstep.methods.scm import normalize_tangent, scm_tangent
    from fewstep.methods.common import adaptive_weighting, per_sample_mse

    net = tiny_diffusers_unet().train()
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(3, 2, 8, 8, dtype=DT, generator=gen) * 0.5
    t = lognormal_times(3, -1.0, 1.4, 0.5, dtype=DT, generator=gen)
    z = torch.randn(x0.shape, dtype=DT, generator=gen) * 0.5
    x_t, dxdt, sd = trigflow_noise(x0, z, t), trigflow_velocity(x0, z, t), 0.5

    net.zero_grad(set_to_none=True)
    loss, _ = scm_loss(net, x_t, t, dxdt, sd, jvp_mode="tangent")
    loss.mean().backward()
    grads = [p.grad.clone() for p in net.parameters()]

    cs = torch.cos(t) * torch.sin(t)
    x_dot, t_dot = cs[:, None, None, None] * dxdt, cs * sd
    def at(e):  # the network along the JVP's direction
        return net(x_t / sd + e * x_dot, t + e * t_dot)

    h = 1e-2  # a 4th-order stencil: truncation ~h^4, and t's float32 rounding (below) / h stays ~1e-6
    with torch.no_grad():
        jvp_fd = (8 * (at(h) - at(-h)) - (at(2 * h) - at(-2 * h))) / (12 * h)
    net.zero_grad(set_to_none=True)
    F_theta = net(x_t / sd, t)
    F_minus = F_theta.detach()
    g = normalize_tangent(scm_tangent(x_t, t, dxdt, F_minus, jvp_fd, sd), "l2", 0.1)
    ref, _ = adaptive_weighting(per_sample_mse(F_theta - F_minus - g), net, t, True)
    ref.mean().backward()
    # diffusers embeds timesteps in float32 (`timesteps.float()`): the t-part of the JVP is exact
    # only to float32, and the finite difference sees the same rounding -> ~1e-6 agreement.
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-5, atol=0)
    # One relative error over all parameters: some gradients are exactly zero in exact arithmetic
    # (biases followed by a normalization) and hold only rounding noise (~1e-20).
    flat = torch.cat([g.flatten() for g in grads])
    flat_ref = torch.cat([p.grad.flatten() for p in net.parameters()])
    assert rel_err(flat, flat_ref) < 1e-5


def test_check_tangent_on_a_diffusers_unet_names_no_bad_op():
    from fewstep.networks import check_tangent

    net = tiny_diffusers_unet().eval()
    x = randn(2, 2, 8, 8)
    report = check_tangent(net, (x, torch.rand(2, dtype=DT)), (randn(2, 2, 8, 8), torch.zeros(2, dtype=DT)))
    assert report["first_bad_op"] is None and report["rel_err_fd"] < 1e-6, report
    assert report["jvp_error"] is not None  # torch.func.jvp itself fails on this network
