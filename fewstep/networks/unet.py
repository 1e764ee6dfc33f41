"""A UNet for images, built for continuous-time consistency models.

Residual blocks with adaptive double normalization, optional self-attention at chosen
resolutions, dropout, optional class labels, and an optional adaptive-weighting head.
The network computes `F(x / sigma_d, t)`; the formulation (TrigFlow) wraps it. With
`second_time=True` it also takes MeanFlow's second time, `F(x / sigma_d, t, r=r)`. The
conditioning and the argument checks are `layers.ConditionedNetwork`'s, shared with the MLP and the DiT.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fewstep.networks.layers import ConditionedNetwork, ResBlock2d, SelfAttention2d, check_arguments, num_groups
from fewstep.networks.registry import register_network


@register_network("unet")
class UNet(ConditionedNetwork):
    data_kind = "image"

    def __init__(self, img_channels: int, img_resolution: int, model_channels: int = 64,
                 channel_mult: tuple[int, ...] = (1, 2), num_blocks: int = 2,
                 attn_resolutions: tuple[int, ...] = (), attn_heads: int = 1, dropout: float = 0.0,
                 num_classes: int = 0, emb_min_freq: float = 0.1, emb_max_freq: float = 1.0,
                 adaptive_weight: bool = True, guidance_input: bool = False, second_time: bool = False):
        super().__init__()
        self.check_values(model_channels=model_channels, channel_mult=channel_mult, num_blocks=num_blocks,
                          attn_heads=attn_heads, dropout=dropout, emb_min_freq=emb_min_freq, emb_max_freq=emb_max_freq)
        if img_resolution % (2 ** (len(channel_mult) - 1)):
            raise ValueError(f"img_resolution {img_resolution} is not divisible by 2^(levels-1) "
                             f"for channel_mult {tuple(channel_mult)}")
        self.img_channels, self.img_resolution = img_channels, img_resolution
        emb_dim = 4 * model_channels
        self.build_conditioning(model_channels, emb_dim, num_classes=num_classes, emb_min_freq=emb_min_freq,
                                emb_max_freq=emb_max_freq, adaptive_weight=adaptive_weight,
                                guidance_input=guidance_input, second_time=second_time)
        self.conv_in = nn.Conv2d(img_channels, model_channels, 3, padding=1)

        # Encoder: each entry is (block, attention-or-None); `None` blocks are downsamplings.
        self.enc = nn.ModuleList()
        skip_ch = [model_channels]
        ch, res = model_channels, img_resolution
        for level, mult in enumerate(channel_mult):
            for _ in range(num_blocks):
                out = model_channels * mult
                self.enc.append(_Stage(ResBlock2d(ch, out, emb_dim, dropout),
                                       SelfAttention2d(out, attn_heads) if res in attn_resolutions else None))
                ch = out
                skip_ch.append(ch)
            if level < len(channel_mult) - 1:
                self.enc.append(_Stage(None, None, resample="down"))
                res //= 2
                skip_ch.append(ch)

        self.mid = nn.ModuleList([_Stage(ResBlock2d(ch, ch, emb_dim, dropout), SelfAttention2d(ch, attn_heads)
                                         if attn_resolutions else None),
                                  _Stage(ResBlock2d(ch, ch, emb_dim, dropout), None)])

        self.dec = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_blocks + 1):
                out = model_channels * mult
                self.dec.append(_Stage(ResBlock2d(ch + skip_ch.pop(), out, emb_dim, dropout),
                                       SelfAttention2d(out, attn_heads) if res in attn_resolutions else None,
                                       takes_skip=True))
                ch = out
            if level > 0:
                self.dec.append(_Stage(None, None, resample="up"))
                res *= 2

        self.norm_out = nn.GroupNorm(num_groups(ch), ch)
        self.conv_out = nn.Conv2d(ch, img_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @staticmethod
    def check_values(*, model_channels: int, channel_mult, num_blocks: int, attn_heads: int, dropout: float,
                     emb_min_freq: float, emb_max_freq: float, **_) -> None:
        """The checks that need no data (`fewstep.networks.check_network_values` runs them from a config)."""
        check_arguments(dropout=dropout, emb_min_freq=emb_min_freq, emb_max_freq=emb_max_freq,
                        model_channels=model_channels, num_blocks=num_blocks, attn_heads=attn_heads)
        if not channel_mult or min(channel_mult) < 1:
            raise ValueError(f"network.channel_mult must be a non-empty list of positive ints, got {channel_mult}")

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None,
                guidance=None, r=None) -> torch.Tensor:
        emb = self.condition(x, (self.img_channels, self.img_resolution, self.img_resolution), t, labels, guidance, r)
        h = self.conv_in(x)
        skips = [h]
        for stage in self.enc:
            h = stage(h, emb)
            skips.append(h)
        for stage in self.mid:
            h = stage(h, emb)
        for stage in self.dec:
            h = stage(torch.cat([h, skips.pop()], dim=1) if stage.takes_skip else h, emb)
        return self.conv_out(F.silu(self.norm_out(h)))


class _Stage(nn.Module):
    """One UNet step: a residual block with optional attention, or a 2x resampling."""

    def __init__(self, block: ResBlock2d | None, attn: SelfAttention2d | None, resample: str | None = None,
                 takes_skip: bool = False):
        super().__init__()
        self.block, self.attn, self.resample, self.takes_skip = block, attn, resample, takes_skip

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.resample == "down":
            return F.avg_pool2d(h, 2)
        if self.resample == "up":
            return F.interpolate(h, scale_factor=2.0, mode="nearest")
        h = self.block(h, emb)
        return self.attn(h) if self.attn is not None else h
