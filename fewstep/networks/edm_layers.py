"""The layers of EDM's networks (Karras et al. 2022, NVlabs/edm `training/networks.py`), with the
same parameter and buffer names, so that a released snapshot's tensors load as they are.

One forward each, out of place (the tangent engine follows every op); attention is
`F.scaled_dot_product_attention` (an exact tangent rule), which computes what EDM's
`softmax(q^T k / sqrt(d))` einsums do. Initializations follow EDM's; only the shapes matter
for a snapshot.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def weight_init(shape, mode: str, fan_in: int, fan_out: int, gain: float = 1.0) -> torch.Tensor:
    """EDM's initializations times `gain`, drawn in place (nothing to draw on the meta device, where
    torch's `normal_` would import its compiler)."""
    w = torch.empty(*shape)
    if w.is_meta:
        return w
    if mode == "xavier_uniform":
        bound = gain * math.sqrt(6 / (fan_in + fan_out))
    elif mode == "kaiming_uniform":
        bound = gain * math.sqrt(3 / fan_in)
    elif mode == "xavier_normal":
        return w.normal_(0, abs(gain) * math.sqrt(2 / (fan_in + fan_out)))
    elif mode == "kaiming_normal":
        return w.normal_(0, abs(gain) * math.sqrt(1 / fan_in))
    else:
        raise ValueError(f"unknown init mode {mode!r}")
    return w.uniform_(-abs(bound), abs(bound))


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, init_mode: str = "kaiming_normal",
                 init_weight: float = 1, init_bias: float = 0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = nn.Parameter(weight_init([out_features, in_features], **fans, gain=init_weight))
        self.bias = nn.Parameter(weight_init([out_features], **fans, gain=init_bias)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class Conv2d(nn.Module):
    """Convolution with optional 2x up/downsampling through a separable FIR filter (`resample_filter`)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True, up: bool = False,
                 down: bool = False, resample_filter=(1, 1), fused_resample: bool = False,
                 init_mode: str = "kaiming_normal", init_weight: float = 1, init_bias: float = 0):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down, self.fused_resample = up, down, fused_resample
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        self.weight = (nn.Parameter(weight_init([out_channels, in_channels, kernel, kernel], **fans, gain=init_weight))
                       if kernel else None)
        self.bias = nn.Parameter(weight_init([out_channels], **fans, gain=init_bias)) if kernel and bias else None
        f = None
        if up or down:
            f = torch.tensor([[a * b / sum(resample_filter) ** 2 for b in resample_filter] for a in resample_filter],
                             dtype=torch.float32)[None, None]
        self.register_buffer("resample_filter", f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        f = None if self.resample_filter is None else self.resample_filter.to(x.dtype)
        w_pad = 0 if w is None else w.shape[-1] // 2
        f_pad = 0 if f is None else (f.shape[-1] - 1) // 2
        if self.fused_resample and self.up and w is not None:
            x = F.conv_transpose2d(x, (f * 4).tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2,
                                   padding=w_pad + f_pad)
            x = F.conv2d(x, w)
        elif self.fused_resample and self.down and w is not None:
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = F.conv2d(x, f.tile([self.out_channels, 1, 1, 1]), groups=self.out_channels, stride=2)
        else:
            if self.up:
                x = F.conv_transpose2d(x, (f * 4).tile([self.in_channels, 1, 1, 1]), groups=self.in_channels,
                                       stride=2, padding=f_pad)
            if self.down:
                x = F.conv2d(x, f.tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2, padding=f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        return x if b is None else x + b.reshape(1, -1, 1, 1)


class GroupNorm(nn.Module):
    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4, eps: float = 1e-5):
        super().__init__()
        self.num_groups = max(1, min(num_groups, num_channels // min_channels_per_group))
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


def pnorm(v: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Pixel normalization over channels (dim 1), for sCM's adaptive double normalization."""
    return v * torch.rsqrt(v.square().mean(dim=1, keepdim=True) + eps)


class UNetBlock(nn.Module):
    """EDM's U-Net block, the union of DDPM++, NCSN++ and ADM's: GroupNorm, SiLU, conv, the
    embedding's scale/shift (`adaptive_scale`) or bias, dropout, conv, skip, optional attention.

    `double_norm` (sCM, docs/math.md#stabilizers): the modulation becomes
    `norm(x) pnorm(scale) + pnorm(shift)`; the affine layer then always gives a scale and a shift."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, up: bool = False, down: bool = False,
                 attention: bool = False, num_heads: int | None = None, channels_per_head: int = 64,
                 dropout: float = 0.0, skip_scale: float = 1.0, eps: float = 1e-5, resample_filter=(1, 1),
                 resample_proj: bool = False, adaptive_scale: bool = True, double_norm: bool = False,
                 init: dict | None = None, init_zero: dict | None = None, init_attn: dict | None = None):
        super().__init__()
        init = init or {}
        init_zero = init_zero if init_zero is not None else dict(init_weight=0)
        self.in_channels, self.out_channels, self.emb_channels = in_channels, out_channels, emb_channels
        self.num_heads = (0 if not attention else num_heads if num_heads is not None
                          else out_channels // channels_per_head)
        self.dropout, self.skip_scale = dropout, skip_scale
        self.adaptive_scale, self.double_norm = adaptive_scale, double_norm
        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down, resample_filter=resample_filter, **init)
        two = adaptive_scale or double_norm
        self.affine = Linear(emb_channels, out_channels * (2 if two else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, 3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel, up=up, down=down, resample_filter=resample_filter,
                               **init)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1, **(init_attn if init_attn is not None else init))
            self.proj = Conv2d(out_channels, out_channels, 1, **init_zero)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None].to(x.dtype)
        if self.double_norm:
            scale, shift = params.chunk(2, dim=1)
            x = F.silu(self.norm1(x) * pnorm(scale) + pnorm(shift))
        elif self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            x = F.silu(shift + self.norm1(x) * (scale + 1))
        else:
            x = F.silu(self.norm1(x + params))
        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = (x + (orig if self.skip is None else self.skip(orig))) * self.skip_scale
        if self.num_heads:
            b, c, h, w = x.shape
            # EDM's channel layout: (heads, channels per head, q/k/v)
            qkv = self.qkv(self.norm2(x)).reshape(b, self.num_heads, c // self.num_heads, 3, h * w)
            q, k, v = (qkv[:, :, :, i].transpose(-1, -2) for i in range(3))
            a = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(b, c, h, w)
            x = (self.proj(a) + x) * self.skip_scale
        return x


class PositionalEmbedding(nn.Module):
    """DDPM's sinusoids `[cos(x f), sin(x f)]`, `f_i = (1 / max_positions)^(i / (n/2 - endpoint))`."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=x.device) / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        arg = x[:, None] * freqs.to(x.dtype)[None]
        return torch.cat([torch.cos(arg), torch.sin(arg)], dim=1)


class FourierEmbedding(nn.Module):
    """NCSN++'s random Fourier features `[cos(2 pi f x), sin(2 pi f x)]`, `f ~ N(0, scale^2)` (a buffer)."""

    def __init__(self, num_channels: int, scale: float = 16):
        super().__init__()
        freqs = torch.empty(num_channels // 2)
        self.register_buffer("freqs", freqs if freqs.is_meta else freqs.normal_(0, scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        arg = x[:, None] * (2 * math.pi * self.freqs).to(x.dtype)[None]
        return torch.cat([torch.cos(arg), torch.sin(arg)], dim=1)

