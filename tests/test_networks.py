"""Networks (docs/math.md#stabilizers): shapes, labels, dropout, the adaptive-weight head, no BatchNorm,
and exact forward-mode AD through everything (attention included) on CPU."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fewstep.methods.scm import forward_ad_attention, normalize_tangent, scm_jvp, scm_loss, scm_tangent
from fewstep.networks import DiT, MLP, NetworkInfo, UNet, check_tangent, network_info
from fewstep.networks.layers import AdaDoubleNorm, PositionalEmbedding, pnorm
from fewstep.core.trigflow import trigflow_noise, trigflow_velocity
from helpers import randomize_zero_params_, tiny_mlp, tiny_unet

SIGMA_D = 0.5

F64 = torch.float64





def _input(net, n, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (n, net.img_channels, net.img_resolution, net.img_resolution) if isinstance(net, UNet) else (n, net.dim)
    return torch.randn(shape, generator=g, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Shapes and dtypes


@pytest.mark.parametrize("kw", [
    dict(img_channels=1, img_resolution=8, model_channels=8, channel_mult=(1, 2), num_blocks=1),
    dict(img_channels=3, img_resolution=16, model_channels=8, channel_mult=(1, 2, 2), num_blocks=2,
         attn_resolutions=(8, 4), attn_heads=2, dropout=0.1, num_classes=5),
    dict(img_channels=2, img_resolution=4, model_channels=16, channel_mult=(1,), num_blocks=1,
         attn_resolutions=(4,), adaptive_weight=False),
])
def test_unet_shapes(kw):
    torch.manual_seed(0)
    net = UNet(**kw)
    x = _input(net, 3)
    t = torch.rand(3) * math.pi / 2
    labels = torch.tensor([0, 1, 2]) if kw.get("num_classes") else None
    with torch.no_grad():
        y = net(x, t, labels)
        y64 = net.double()(x.double(), t.double(), labels)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert y64.shape == x.shape and y64.dtype == F64
    if kw.get("adaptive_weight", True):
        assert net.adaptive_weight(t.double()).shape == (3,)
    else:
        assert net.adaptive_weight(t) is None


def test_unet_rejects_bad_resolution():
    with pytest.raises(ValueError, match="img_resolution"):
        UNet(1, 6, model_channels=8, channel_mult=(1, 2, 2))


@pytest.mark.parametrize("kw", [dict(dim=2), dict(dim=5, width=32, depth=3, dropout=0.2, num_classes=4)])
def test_mlp_shapes(kw):
    torch.manual_seed(0)
    net = MLP(**kw)
    x = torch.randn(7, kw["dim"])
    with torch.no_grad():
        y = net(x, torch.rand(7))
    assert y.shape == (7, kw["dim"])
    assert net.adaptive_weight(torch.rand(7)).shape == (7,)


# ---------------------------------------------------------------------------------------------
# Class labels


@pytest.mark.parametrize("make", [tiny_unet, tiny_mlp], ids=["unet", "mlp"])
def test_labels_change_output_and_none_is_null_label(make):
    torch.manual_seed(0)
    net = randomize_zero_params_(make(num_classes=3)).eval()
    x = _input(net, 4)
    t = torch.full((4,), 0.7)
    with torch.no_grad():
        y_none = net(x, t, None)
        y_null = net(x, t, torch.full((4,), 3, dtype=torch.long))
        y0 = net(x, t, torch.zeros(4, dtype=torch.long))
        y1 = net(x, t, torch.ones(4, dtype=torch.long))
    assert torch.equal(y_none, y_null)
    assert (y0 - y1).abs().amax() > 1e-3 and (y0 - y_null).abs().amax() > 1e-3
    # Labels act per sample: sample i with labels [0, 1, 0, 1] matches the all-0 / all-1 runs.
    with torch.no_grad():
        y_mix = net(x, t, torch.tensor([0, 1, 0, 1]))
    torch.testing.assert_close(y_mix[0::2], y0[0::2], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y_mix[1::2], y1[1::2], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Dropout


@pytest.mark.parametrize("make", [tiny_unet, tiny_mlp], ids=["unet", "mlp"])
def test_dropout_active_in_train_mode_only(make):
    torch.manual_seed(0)
    net = randomize_zero_params_(make(dropout=0.5))
    x, t = _input(net, 4), torch.full((4,), 0.7)
    with torch.no_grad():
        net.train()
        a, b = net(x, t), net(x, t)
        net.eval()
        c, d = net(x, t), net(x, t)
    assert (a - b).abs().amax() > 1e-3
    assert torch.equal(c, d)


@pytest.mark.parametrize("make", [tiny_unet, tiny_mlp], ids=["unet", "mlp"])
def test_dropout_masks_match_between_jvp_pass_and_graded_forward(make):
    """In jvp_mode='separate' the no-grad JVP pass and the graded forward must draw the same
    dropout masks, so that F_theta - F^- is exactly zero in value: the per-sample loss is then
    exactly the mse of the normalized tangent (computed here with the masks of the same seed)."""
    net = randomize_zero_params_(make(dropout=0.5, adaptive_weight=False), seed=1).double().train()
    x0 = _input(net, 5, F64, seed=1)
    z = _input(net, 5, F64, seed=2) * SIGMA_D
    t = torch.tensor([0.05, 0.4, 0.8, 1.2, 1.5], dtype=F64)
    x_t, dxdt = trigflow_noise(x0, z, t), trigflow_velocity(x0, z, t)

    torch.manual_seed(123)
    loss, _ = scm_loss(net, x_t, t, dxdt, SIGMA_D, tangent_norm="l2", adaptive_weight=False, jvp_mode="separate")
    torch.manual_seed(123)
    F_minus, jvp_out = scm_jvp(net, x_t, t, dxdt, SIGMA_D)
    g = normalize_tangent(scm_tangent(x_t, t, dxdt, F_minus, jvp_out, SIGMA_D), "l2", 0.1)
    expect = g.square().flatten(1).mean(1)
    torch.testing.assert_close(loss, expect, rtol=1e-12, atol=0)

    # Not vacuous: a different mask in the graded forward would leave a residual F_theta - F^-
    # of the same order as g itself.
    torch.manual_seed(456)
    with torch.no_grad():
        F_other = net(x_t / SIGMA_D, t)
    mismatched = (F_other - F_minus - g).square().flatten(1).mean(1)
    assert (mismatched - expect).abs().min() > 1e-3


def test_dropout_jvp_uses_one_mask_for_primal_and_tangent():
    """Under torch.func.jvp a dropout layer must apply the same mask to the primal and the
    tangent: the JVP then equals a finite difference taken with that same (re-seeded) mask."""
    net = randomize_zero_params_(tiny_mlp(dropout=0.5), seed=2).double().train()
    x = _input(net, 4, F64, seed=3)
    t = torch.tensor([0.2, 0.6, 1.0, 1.4], dtype=F64)
    xd = _input(net, 4, F64, seed=4)
    td = torch.tensor([0.3, -0.2, 0.5, 1.0], dtype=F64)

    def F_seeded(xx, tt):
        torch.manual_seed(7)
        with torch.no_grad():
            return net(xx, tt)

    torch.manual_seed(7)
    with torch.no_grad():
        _, tangent = torch.func.jvp(lambda a, b: net(a, b), (x, t), (xd, td))
    h = 1e-6
    fd = (F_seeded(x + h * xd, t + h * td) - F_seeded(x - h * xd, t - h * td)) / (2 * h)
    torch.testing.assert_close(tangent, fd, rtol=1e-6, atol=1e-8)


# ---------------------------------------------------------------------------------------------
# Adaptive weighting head, normalization layers, time embedding


@pytest.mark.parametrize("make", [tiny_unet, tiny_mlp], ids=["unet", "mlp"])
def test_adaptive_weight_head_starts_at_zero(make):
    torch.manual_seed(0)
    net = make()
    t = torch.rand(64) * math.pi / 2
    w = net.adaptive_weight(t)
    assert w.shape == (64,) and torch.equal(w, torch.zeros(64))
    # ... and is trainable: it receives a gradient from the weighted loss exp(w) mse - w.
    mse = torch.rand(64) + 0.5
    (torch.exp(w) * mse - w).mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.weight_head.parameters())
    assert make(adaptive_weight=False).adaptive_weight(t) is None


@pytest.mark.parametrize("net", [
    tiny_unet(dropout=0.1, num_classes=3), tiny_unet(channel_mult=(1, 2, 2), img_resolution=16),
    tiny_mlp(num_classes=2, dropout=0.1),
], ids=["unet", "unet3", "mlp"])
def test_no_batchnorm_and_no_running_stats(net):
    for name, m in net.named_modules():
        assert not isinstance(m, nn.modules.batchnorm._BatchNorm), name
        assert not getattr(m, "track_running_stats", False), name
    assert not any("running" in name for name, _ in net.named_buffers())


def test_pnorm_and_ada_double_norm_formulas():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(6, 10, generator=g, dtype=F64) * 3
    p = pnorm(v, eps=0.0)
    torch.testing.assert_close(p.square().mean(1), torch.ones(6, dtype=F64))
    # Vector case: y = layernorm(x) * pnorm(s(emb)) + pnorm(b(emb)).
    layer = AdaDoubleNorm(10, 4, image=False).double()
    x = torch.randn(6, 10, generator=g, dtype=F64) * 2 + 1
    emb = torch.randn(6, 4, generator=g, dtype=F64)
    xn = (x - x.mean(1, keepdim=True)) / torch.sqrt(x.var(1, unbiased=False, keepdim=True) + 1e-5)
    expect = xn * pnorm(layer.scale(emb)) + pnorm(layer.shift(emb))
    torch.testing.assert_close(layer(x, emb), expect, rtol=1e-10, atol=1e-10)
    # Image case: group norm per sample and group, modulation per channel.
    layer = AdaDoubleNorm(8, 4, image=True).double()
    x = torch.randn(6, 8, 3, 3, generator=g, dtype=F64)
    groups = layer.norm.num_groups
    xg = x.reshape(6, groups, -1)
    xn = ((xg - xg.mean(2, keepdim=True)) / torch.sqrt(xg.var(2, unbiased=False, keepdim=True) + 1e-5)).reshape(x.shape)
    expect = xn * pnorm(layer.scale(emb))[:, :, None, None] + pnorm(layer.shift(emb))[:, :, None, None]
    torch.testing.assert_close(layer(x, emb), expect, rtol=1e-10, atol=1e-10)


def test_time_embedding_has_small_frequencies():
    """docs/math.md#stabilizers: sinusoids of t itself with frequencies in [0.1, 1], so |d emb/dt| <= 1."""
    emb = PositionalEmbedding(16).double()
    assert emb.freqs.min() >= 0.1 - 1e-6 and emb.freqs.max() <= 1.0 + 1e-6
    t = torch.linspace(0, math.pi / 2, 50, dtype=F64)
    h = 1e-6
    deriv = (emb(t + h) - emb(t - h)) / (2 * h)
    assert deriv.abs().max() <= 1.0 + 1e-6
    # cos/sin pairs: each frequency contributes cos^2 + sin^2 = 1.
    e = emb(t)
    torch.testing.assert_close(e[:, :8].square() + e[:, 8:].square(), torch.ones(50, 8, dtype=F64))


# ---------------------------------------------------------------------------------------------
# Forward-mode AD through the networks on CPU (docs/math.md#attention-tangent-rule)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_func_jvp_through_unet_with_attention(dtype):
    """torch.func.jvp runs through the UNet with attention on CPU with the math SDPA backend (the
    fused kernels have no forward AD) and agrees with a central finite difference of the network
    in the same direction: the reference the tangent engine and the 'separate' mode rely on."""
    torch.manual_seed(0)
    net = randomize_zero_params_(tiny_unet(dropout=0.0, num_classes=3)).to(dtype)
    assert any(m.__class__.__name__ == "SelfAttention2d" for m in net.modules())
    x = _input(net, 3, dtype)
    t = torch.tensor([0.1, 0.8, 1.5], dtype=dtype)
    xd, td = _input(net, 3, dtype, seed=1), torch.tensor([1.0, -0.5, 0.3], dtype=dtype)
    labels = torch.tensor([0, 1, 3])
    with torch.no_grad(), forward_ad_attention():
        y, tangent = torch.func.jvp(lambda a, b: net(a, b, labels), (x, t), (xd, td))
        torch.testing.assert_close(y, net(x, t, labels), rtol=1e-5, atol=1e-6)
    assert torch.isfinite(tangent).all() and tangent.abs().max() > 0
    if dtype == F64:
        h = 1e-6
        with torch.no_grad():
            fd = (net(x + h * xd, t + h * td, labels) - net(x - h * xd, t - h * td, labels)) / (2 * h)
        rel = (tangent - fd).norm() / fd.norm()
        assert rel < 1e-6, rel.item()
    # Also under autograd (the single-pass mode): forward-mode AD inside a graded forward.
    from torch.autograd import forward_ad
    with forward_ad.dual_level(), forward_ad_attention():
        out = forward_ad.unpack_dual(net(forward_ad.make_dual(x, xd), forward_ad.make_dual(t, td), labels))
    assert out.primal.requires_grad
    torch.testing.assert_close(out.tangent, tangent, rtol=1e-4 if dtype == torch.float32 else 1e-10,
                               atol=1e-5 if dtype == torch.float32 else 1e-12)


# ----------------------------------------------------------------------------------------------
# DiT


def tiny_dit(**kw):
    from fewstep.networks import DiT

    net = DiT(**{"img_channels": 2, "img_resolution": 8, "patch_size": 2, "hidden_size": 32, "depth": 2,
                 "heads": 4, **kw})
    return randomize_zero_params_(net, scale=0.05)


def test_dit_shapes_labels_and_registry():
    from fewstep.networks import build_registered, network_spec

    net = tiny_dit(num_classes=3, guidance_input=True)
    x, t = torch.randn(4, 2, 8, 8), torch.rand(4) * math.pi / 2
    out = net(x, t, torch.tensor([0, 1, 2, 3]), guidance=2.0)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert not torch.allclose(net(x, t, torch.tensor([0, 0, 0, 0])), net(x, t, torch.tensor([1, 1, 1, 1])))
    assert torch.equal(net(x, t), net(x, t, torch.full((4,), 3)))  # no labels = the null label
    assert net.adaptive_weight(t).shape == (4,)
    spec = network_spec(net)
    assert spec["name"] == "dit" and spec["kwargs"]["num_classes"] == 3
    rebuilt = build_registered(spec)
    rebuilt.load_state_dict(net.state_dict())
    assert torch.equal(rebuilt(x, t), net(x, t))


def test_dit_patches_are_put_back_where_they_came_from():
    """With identity blocks (adaLN-Zero at init) and a head that copies each patch's pixels,
    F(x) == x: unpatchify inverts patchify, pixel for pixel."""
    from fewstep.networks import DiT

    p, c = 2, 2
    net = DiT(c, 8, patch_size=p, hidden_size=p * p * c * 4, depth=1, heads=1, adaptive_weight=False)
    hidden = net.patchify.out_channels
    with torch.no_grad():
        net.pos.zero_()
        net.patchify.weight.zero_()
        net.patchify.bias.zero_()
        for ch in range(c):  # hidden unit (ch, i, j) <- pixel (ch, i, j) of the patch
            for i in range(p):
                for j in range(p):
                    net.patchify.weight[(ch * p + i) * p + j, ch, i, j] = 1.0
        net.head.weight.zero_()
        for ch in range(c):  # head output (i, j, ch) <- hidden unit (ch, i, j), as unpatchify reads it
            for i in range(p):
                for j in range(p):
                    net.head.weight[(i * p + j) * c + ch, (ch * p + i) * p + j] = 1.0
        net.norm_out = nn.Identity()
    x = torch.randn(3, c, 8, 8)
    assert hidden >= p * p * c
    torch.testing.assert_close(net(x, torch.rand(3)), x)


def test_dit_from_config():
    from fewstep.config import ConfigError
    from fewstep.networks import DiT, build_network
    from fewstep.training.registries import validate_network

    network = validate_network({"arch": "dit", "hidden_size": 32, "depth": 1, "heads": 2})
    assert isinstance(build_network(network, "image", (1, 8, 8)), DiT)
    with pytest.raises(ConfigError, match="network.width"):
        validate_network({"arch": "dit", "width": 3})
    with pytest.raises(ValueError, match="divisible by network.heads"):
        DiT(1, 8, hidden_size=32, heads=3)


# ---------------------------------------------------------------------------------------------
# The network contract: network_info, the shared conditioning, argument checks


def _all_features(make):
    return make(num_classes=3, guidance_input=True, second_time=True, adaptive_weight=True)


_MAKERS = {"unet": lambda **kw: tiny_unet(**kw), "mlp": lambda **kw: tiny_mlp(**kw),
           "dit": lambda **kw: DiT(1, 4, patch_size=2, hidden_size=16, depth=1, heads=2, **kw)}


def _inputs(net, n=3, dtype=torch.float32):
    shape = (net.dim,) if isinstance(net, MLP) else (net.img_channels, net.img_resolution, net.img_resolution)
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, *shape, generator=g, dtype=dtype), torch.rand(n, generator=g, dtype=dtype) * math.pi / 2


class _DDPLike(nn.Module):  # `.module`, as DDP
    def __init__(self, net):
        super().__init__()
        self.module = net


class _CompiledLike(nn.Module):  # `._orig_mod`, as torch.compile
    def __init__(self, net):
        super().__init__()
        self._orig_mod = net


@pytest.mark.parametrize("arch", sorted(_MAKERS))
def test_network_info_of_each_network_and_through_wrappers(arch):
    full = _all_features(_MAKERS[arch])
    plain = _MAKERS[arch](adaptive_weight=False)
    want = NetworkInfo(num_classes=3, guidance_input=True, second_time=True, adaptive_weight=True)
    for wrapped in (full, _DDPLike(full), _CompiledLike(_DDPLike(full))):
        assert network_info(wrapped) == want
    assert network_info(_DDPLike(plain)) == NetworkInfo()
    with pytest.raises(AttributeError):  # frozen
        want.num_classes = 4


def test_network_info_of_a_network_without_optional_features():
    class Bare(nn.Module):
        def forward(self, x, t, labels=None):
            return x

    assert network_info(Bare()) == NetworkInfo()


def test_network_info_of_a_diffusers_adapter():
    pytest.importorskip("diffusers")
    from fewstep.interop.diffusers.network import DiffusersNetwork

    net = DiffusersNetwork("UNet2DModel", {
        "sample_size": 8, "in_channels": 1, "out_channels": 1, "block_out_channels": [8], "layers_per_block": 1,
        "down_block_types": ["DownBlock2D"], "up_block_types": ["UpBlock2D"], "norm_num_groups": 4,
        "num_class_embeds": 4}, num_classes=3)
    assert network_info(_DDPLike(net)) == NetworkInfo(num_classes=3)


@pytest.mark.parametrize("arch", sorted(_MAKERS))
def test_time_is_embedded_in_float32_under_bf16_autocast(arch):
    # bf16 has 8 significant bits: t near pi/2 moves by up to 0.008, which a bf16 embedding would see
    net = randomize_zero_params_(_all_features(_MAKERS[arch]))
    t = torch.linspace(1.2, math.pi / 2, 7)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2])
    r = t * 0.5
    with torch.no_grad():
        want = net.time_emb(t, labels, 2.0, r)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = net.time_emb(t, labels, 2.0, r)
            weight = net.adaptive_weight(t)
        rounded = net.time_emb(t.bfloat16().float(), labels, 2.0, r)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert weight.dtype == torch.float32 and torch.equal(weight, net.adaptive_weight(t))
    assert (rounded - want).abs().max() > 1e-4  # the test could tell a rounded t apart


@pytest.mark.parametrize("arch", sorted(_MAKERS))
def test_the_shared_conditioning_keeps_the_network_jvp_exact(arch):
    net = randomize_zero_params_(_all_features(_MAKERS[arch]))
    x, t = _inputs(net)
    report = check_tangent(net, (x, t), kwargs={"labels": torch.tensor([0, 3, 2]), "guidance": 1.5, "r": t * 0.3})
    assert report["rel_err_fd"] < 1e-6 and report["first_bad_op"] is None, report


@pytest.mark.parametrize("arch", sorted(_MAKERS))
def test_networks_check_their_arguments(arch):
    cond, uncond = _MAKERS[arch](num_classes=3), _MAKERS[arch]()
    x, t = _inputs(cond)
    cases = [
        (cond, (x[:, :1] if isinstance(cond, MLP) else x[:, :, :2], t), {}, "takes x of shape"),
        (cond, (x, t[:2]), {}, "one time per sample"),
        (cond, (x, t.long()), {}, "float tensor"),
        (uncond, (x, t, torch.tensor([0, 1, 2])), {}, "unconditional"),
        (cond, (x, t, torch.tensor([0, 1, 4])), {}, r"labels must be in \[0, 3\]"),
        (cond, (x, t, torch.tensor([0, -1, 2])), {}, r"labels must be in \[0, 3\]"),
        (cond, (x, t, torch.tensor([0.0, 1.0, 2.0])), {}, "integer class indices"),
        (cond, (x, t, torch.tensor([0, 1])), {}, "integer class indices"),
        (cond, (x, t), {"guidance": 2.0}, "no guidance input"),
        (cond, (x, t), {"r": t}, "no second time r"),
    ]
    for net, args, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            net(*args, **kwargs)
    with torch.no_grad():  # what the contract allows: no labels (null), the null label K, one t for all
        cond(x, t)
        cond(x, t, torch.tensor([3, 3, 0]))
        uncond(x, t[:1])
