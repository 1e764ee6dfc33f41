"""Helpers shared by the test files."""

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
