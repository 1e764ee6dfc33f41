"""Helpers shared by the test files."""

import math

import torch

from fewstep.networks import MLP, UNet


def randomize_zero_params_(net: torch.nn.Module, scale: float = 0.3, seed: int = 0) -> torch.nn.Module:
    """Re-draw every all-zero parameter (zero-initialised output layers, the adaptive-weight
    head) so that no part of the network is trivially zero and no math test is vacuous."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)
    return net


def tiny_unet(**kw) -> UNet:
    """A UNet small enough for float64 math checks, with attention (2 heads) at 4x4."""
    cfg = dict(img_channels=2, img_resolution=8, model_channels=8, channel_mult=(1, 2), num_blocks=1,
               attn_resolutions=(4,), attn_heads=2)
    cfg.update(kw)
    return UNet(**cfg)


def tiny_mlp(**kw) -> MLP:
    cfg = dict(dim=3, width=16, depth=2)
    cfg.update(kw)
    return MLP(**cfg)


# ---------------------------------------------------------------------------- Gaussian data, SPEC 9
# Data N(MU, S^2 I) with S != SD, so that the probability-flow ODE is curved; every quantity below
# is a closed form, so samplers, conversions and tangents can be checked exactly (float64).

SD, S = 0.5, 0.2
MU = torch.tensor([0.3, -0.5, 1.0, 0.1], dtype=torch.float64)


def per_sample(t, x):
    """A time (scalar or (B,)) shaped to broadcast against `x` (B, ...)."""
    t = torch.as_tensor(t, dtype=x.dtype).expand(x.shape[0])
    return t.reshape(-1, *([1] * (x.ndim - 1)))


def v_star(x, t, labels=None, mu=MU, s=S):
    """Exact TrigFlow velocity `k(t) (x - cos t mu) - sin t mu`, `k = sin t cos t (sd^2 - s^2) / q`."""
    t = per_sample(t, x)
    q = s ** 2 * torch.cos(t) ** 2 + SD ** 2 * torch.sin(t) ** 2
    return torch.sin(t) * torch.cos(t) * (SD ** 2 - s ** 2) / q * (x - torch.cos(t) * mu) - torch.sin(t) * mu


def f_star(x, t, mu=MU, s=S):
    """Exact TrigFlow consistency function (the ODE endpoint at t = 0 from (x, t))."""
    t = per_sample(t, x)
    q = s ** 2 * torch.cos(t) ** 2 + SD ** 2 * torch.sin(t) ** 2
    return mu + (x - torch.cos(t) * mu) * s / q.sqrt()


def d_star(x, sigma, labels=None, mu=MU, s=S):
    """Exact EDM denoiser `mu + s^2 / (s^2 + sigma^2) (x - mu)`."""
    sigma = per_sample(sigma, x)
    return mu + s ** 2 / (s ** 2 + sigma ** 2) * (x - mu)


def f_star_edm(x, sigma, eps, mu=MU, s=S):
    """Exact EDM PF-ODE solution through (x, sigma), at noise level eps."""
    return mu + (x - mu) * math.sqrt(s ** 2 + eps ** 2) / math.sqrt(s ** 2 + sigma ** 2)
