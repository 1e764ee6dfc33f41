"""The paper networks (fewstep.networks.song_unet, adm, edm2, paper): parameter counts of the papers'
configurations, tangents against float64 finite differences, shapes, the traced JVP, and the
preconditioning conversion against EDM's own formulas and the Gaussian closed form."""

import math

import pytest
import torch

from fewstep.jvp import jvp
from fewstep.jvp import traced
from fewstep.networks import build_network, check_tangent, network_class, network_info
from fewstep.networks.blocks import blocks
from fewstep.networks.paper import PaperNetwork, VP_BETA_D, VP_BETA_MIN, VP_M, vp_time
from helpers import MU, S, SD, v_star

COUNTS = [  # EDM (train.py adds augment_dim=9 to CIFAR-10 runs) and EDM2 at 512^2 (latents 64x64x4)
    ("ddpmpp", dict(img_channels=3, img_resolution=32, augment_dim=9), 55_733_891),
    ("ddpmpp", dict(img_channels=3, img_resolution=32), 55_732_739),
    ("ddpmpp", dict(img_channels=3, img_resolution=32, augment_dim=9, label_dim=10), 55_735_299),
    ("ncsnpp", dict(img_channels=3, img_resolution=32, augment_dim=9), 56_397_827),
    ("ncsnpp", dict(img_channels=3, img_resolution=32, augment_dim=9, label_dim=10), 56_400_643),
    ("adm", dict(img_channels=3, img_resolution=64, label_dim=1000), 295_899_267),
    ("adm", dict(img_channels=3, img_resolution=64), 295_131_267),
    ("edm2", dict(img_channels=4, img_resolution=64, label_dim=1000, size="xs"), 124_713_253),
    ("edm2", dict(img_channels=4, img_resolution=64, label_dim=1000, size="s"), 280_212_837),
    ("edm2", dict(img_channels=4, img_resolution=64, label_dim=1000, size="m"), 497_807_781),
    ("edm2", dict(img_channels=4, img_resolution=64, label_dim=1000, model_channels=320), 777_498_085),
    ("edm2", dict(img_channels=4, img_resolution=64, label_dim=1000, size="xl"), 1_119_283_749),
    ("edm2", dict(img_channels=4, img_resolution=64, label_dim=1000, size="xxl"), 1_523_164_773),
    ("edm2", dict(img_channels=4, img_resolution=64, size="xs"), 124_201_253),
    ("edm2", dict(img_channels=4, img_resolution=64, size="s"), 279_444_837),
]


@pytest.mark.parametrize("name,kwargs,count", COUNTS)
def test_parameter_counts_are_the_papers(name, kwargs, count):
    with torch.device("meta"):  # shapes only, nothing allocated
        net = network_class(name)(**kwargs)
    assert sum(p.numel() for p in net.parameters()) == count


# Tiny configurations with every block type: down/up sampling, attention (one head of 8 channels).
TINY = {
    "ddpmpp": dict(model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,)),
    "ncsnpp": dict(model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,)),
    "adm": dict(model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,), channels_per_head=8),
    "edm2": dict(model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,), channels_per_head=8),
}


def tiny(name, **kw):
    cfg = dict(img_channels=2, img_resolution=8, dropout=0.0, **TINY[name])
    cfg.update(kw)
    return scramble(network_class(name)(**cfg))


def scramble(net, seed=0):
    """Random weights everywhere (the papers start output layers at zero or 1e-5, and EDM2's gains at
    zero, which would hide most of the network from a test)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            fan_in = p[0].numel() if p.ndim >= 2 else 1
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in) * (1 if p.ndim >= 2 else 0.5))
    return net


CASES = [("ddpmpp", dict(precond="edm", label_dim=3)),
         ("ddpmpp", dict(precond="trigflow", double_norm=True, adaptive_weight=True)),
         ("ncsnpp", dict(precond="vp", embedding_scale=0.5)),
         ("adm", dict(precond="ve", label_dim=3, guidance_input=True)),
         ("edm2", dict(precond="edm", label_dim=3)),
         ("edm2", dict(precond="trigflow", embedding_scale=0.1))]


def _inputs(net, b=2):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(b, 2, 8, 8, generator=gen)
    t = torch.tensor([0.4, 1.2])[:b]
    kwargs = {"labels": torch.tensor([1, 3])[:b]} if net.num_classes else {}
    if net.guidance_input:
        kwargs["guidance"] = 1.5
    return x, t, kwargs


@pytest.mark.parametrize("name,kw", CASES)
def test_tangent_equals_float64_finite_differences(name, kw):
    net = tiny(name, **kw).eval()  # EDM2 in training mode rewrites its weights at every forward
    x, t, kwargs = _inputs(net)
    report = check_tangent(net, (x, t), kwargs=kwargs)
    # VP's time input 999 t_vp(sigma) moves fast in t: the finite difference's own error is larger there
    assert report["rel_err_fd"] < (1e-5 if kw["precond"] == "vp" else 1e-6), report
    assert report["rel_err_jvp"] is None or report["rel_err_jvp"] < 1e-9, report


@pytest.mark.parametrize("name,kw", [("ncsnpp", dict(precond="vp", label_dim=3)), ("edm2", dict(precond="edm"))])
def test_traced_jvp_equals_the_eager_engine(name, kw, monkeypatch):
    """One level, as tracing time grows with the op count. EDM2 in training mode: the replayed graph
    also writes the normalized weights back (forced weight normalization)."""
    monkeypatch.setattr(traced, "TRACE_AT_CALL", 1)
    net = tiny(name, **kw, channel_mult=(1,), attn_resolutions=(8,)).double().train()
    x, t, kwargs = _inputs(net)
    x, t = x.double(), t.double()
    tangents = (torch.randn_like(x), torch.ones_like(t))
    with torch.no_grad():  # EDM2: bring the scrambled weights to their fixed point, rms = 1 - 1e-4
        net(x, t, **kwargs), net(x, t, **kwargs)
    out, tout = jvp(net, (x, t), tangents, kwargs, mode="tangent")
    out2, tout2 = jvp(net, (x, t), tangents, kwargs, mode="traced")
    assert traced.runner_of(net).traces == 1
    torch.testing.assert_close(out2, out, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(tout2, tout, rtol=1e-6, atol=1e-9)
    if name == "edm2":
        w = net.unet.dec["8x8_in0"].conv_res0.weight
        with torch.no_grad():
            w.mul_(2.0)
        jvp(net, (x, t), tangents, kwargs, mode="traced")  # a replay, not a new trace
        rms = w.flatten(1).square().mean(1).sqrt()
        torch.testing.assert_close(rms, torch.ones_like(rms), rtol=1e-3, atol=0)


SHAPES = [("ddpmpp", dict(model_channels=8, num_blocks=1), (16, 32, 64)),
          ("ncsnpp", dict(model_channels=8, num_blocks=1), (16, 32, 64)),
          ("adm", dict(model_channels=8, num_blocks=1, channels_per_head=8), (8, 32, 64)),
          ("edm2", dict(model_channels=8, num_blocks=1, channels_per_head=8), (8, 32, 64))]


@pytest.mark.parametrize("name,kw,resolutions", SHAPES)
def test_output_shape_at_each_resolution(name, kw, resolutions):
    """The papers' channel_mult (3 or 4 levels): every multiple of 2^(levels-1) works; others are refused."""
    for res in resolutions:
        net = network_class(name)(img_channels=3, img_resolution=res, **kw).eval()
        with torch.no_grad():
            y = net(torch.randn(1, 3, res, res), torch.tensor([0.7]))
        assert y.shape == (1, 3, res, res) and torch.isfinite(y).all()
    with pytest.raises(ValueError, match="not divisible"):
        network_class(name)(img_channels=3, img_resolution=resolutions[0] + 2, **kw)


def _edm_coefficients(precond, sigma):
    """EDM's own preconditioning (`training/networks.py`: VPPrecond, VEPrecond, EDMPrecond), sigma_data 0.5."""
    if precond == "vp":
        return 1.0, -sigma, 1 / (sigma ** 2 + 1).sqrt(), (VP_M - 1) * vp_time(sigma)
    if precond == "ve":
        return 1.0, sigma, torch.ones_like(sigma), (0.5 * sigma).log()
    var = sigma ** 2 + 0.25
    return 0.25 / var, sigma * 0.5 / var.sqrt(), 1 / var.sqrt(), sigma.log() / 4


@pytest.mark.parametrize("name,precond", [("ddpmpp", "vp"), ("ncsnpp", "ve"), ("adm", "edm"), ("edm2", "edm")])
def test_the_trigflow_network_is_the_papers_denoiser(name, precond):
    """cos(t) x_t - sigma_d sin(t) F(x_t / sigma_d, t) equals EDM's D(x_t / cos t, sigma_d tan t) computed
    with the raw network and EDM's own formulas (docs/math.md#paper-preconditioning)."""
    net = tiny(name, precond=precond, label_dim=3).double().eval()
    raw = net.model if hasattr(net, "model") else net.unet
    x_t = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    t = torch.tensor([0.05, 0.8, 1.5], dtype=torch.float64)
    labels = torch.tensor([0, 3, 2])  # 3: no label, EDM's all-zero row
    rows = torch.nn.functional.one_hot(labels, 4)[:, :3].double()
    sigma = SD * t.tan()
    c_skip, c_out, c_in, c_noise = _edm_coefficients(precond, sigma)
    b = lambda v: torch.as_tensor(v, dtype=torch.float64).reshape(-1, 1, 1, 1).expand(3, 1, 1, 1)  # noqa: E731
    x_sigma = x_t / b(t.cos())
    with torch.no_grad():
        D = b(c_skip) * x_sigma + b(c_out) * raw(b(c_in) * x_sigma, c_noise, rows)
        f = b(t.cos()) * x_t - SD * b(t.sin()) * net(x_t / SD, t, labels)
    torch.testing.assert_close(f, D, rtol=1e-10, atol=1e-10)


class ExactGaussian(PaperNetwork):
    """A 'raw network' that is the exact denoiser of N(mu, s^2 I) in each paper's preconditioning."""

    def __init__(self, precond):
        super().__init__()
        self.init_paper(img_channels=1, img_resolution=2, num_classes=0, precond=precond, sigma_data=SD,
                        adaptive_weight=False, guidance_input=False, guidance_dim=8)
        self.mu = MU.reshape(1, 1, 2, 2)

    def raw_forward(self, x_in, c_noise, class_labels, extra):
        b = lambda v: v.reshape(-1, 1, 1, 1)  # noqa: E731
        if self.precond == "edm":
            sigma = b(torch.exp(4 * c_noise))
            x = x_in * (sigma ** 2 + SD ** 2).sqrt()
            c_skip, c_out = SD ** 2 / (sigma ** 2 + SD ** 2), sigma * SD / (sigma ** 2 + SD ** 2).sqrt()
        elif self.precond == "vp":
            u = c_noise / (VP_M - 1)
            sigma = b(torch.sqrt(torch.expm1(0.5 * VP_BETA_D * u ** 2 + VP_BETA_MIN * u)))
            x, c_skip, c_out = x_in * (sigma ** 2 + 1).sqrt(), 1.0, -sigma
        else:
            sigma = b(2 * torch.exp(c_noise))
            x, c_skip, c_out = x_in, 1.0, sigma
        denoised = self.mu + S ** 2 / (S ** 2 + sigma ** 2) * (x - self.mu)
        return (denoised - c_skip * x) / c_out


@pytest.mark.parametrize("precond", ["edm", "vp", "ve"])
def test_converted_velocity_is_the_gaussian_closed_form(precond):
    net = ExactGaussian(precond)
    x_t = torch.randn(5, 1, 2, 2, dtype=torch.float64)
    t = torch.tensor([0.02, 0.3, 0.8, 1.2, 1.5], dtype=torch.float64)
    v = SD * net(x_t / SD, t)
    torch.testing.assert_close(v, v_star(x_t, t, mu=MU.reshape(1, 2, 2)), rtol=1e-9, atol=1e-9)


def test_contract_features_labels_and_blocks():
    net = tiny("edm2", label_dim=3, guidance_input=True)
    info = network_info(net)
    assert info.num_classes == 3 and info.guidance_input and info.adaptive_weight and not info.second_time
    w = net.adaptive_weight(torch.tensor([0.3, 1.0]))
    assert w.shape == (2,) and torch.isfinite(w).all()
    x, t, _ = _inputs(net)
    with torch.no_grad():  # label K (no label) is labels=None; the guidance input starts as a no-op
        torch.testing.assert_close(net(x, t, torch.tensor([3, 3])), net(x, t))
    fresh = network_class("edm2")(img_channels=2, img_resolution=8, label_dim=3, guidance_input=True, **TINY["edm2"])
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, t, guidance=2.0), fresh(x, t))
    assert len(blocks(net)) == len(net.unet.enc) + len(net.unet.dec)  # FSDP units and checkpointed blocks
    assert not network_info(tiny("adm")).adaptive_weight
    built = build_network({"arch": "ddpmpp", "class_conditional": True, **TINY["ddpmpp"]}, "image", (2, 8, 8), 10)
    assert built.num_classes == 10 and built.model.map_label.in_features == 10


@pytest.mark.parametrize("kwargs,message", [
    (dict(precond="cosine"), "precond must be one of"),
    (dict(label_dim=3, num_classes=5), "disagree"),
    (dict(guidance_input=True), "class-conditional"),
    (dict(embedding_type="rope"), "embedding_type"),
])
def test_bad_arguments_are_one_line_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        network_class("ddpmpp")(img_channels=2, img_resolution=8, **TINY["ddpmpp"], **kwargs)
    with pytest.raises(ValueError, match="size"):
        network_class("edm2")(img_channels=2, img_resolution=8, size="s", model_channels=128)
    net = tiny("ddpmpp")
    with pytest.raises(ValueError, match="takes x of shape"):
        net(torch.randn(2, 3, 8, 8), torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="unconditional"):
        net(torch.randn(2, 2, 8, 8), torch.tensor([0.1, 0.2]), torch.tensor([0, 1]))
