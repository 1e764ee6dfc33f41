"""Building blocks shared by fewstep's networks.

Every op here is exact under forward-mode AD (`torch.func.jvp`): no BatchNorm, no fused
attention kernels, no in-place updates of tensors that carry tangents (SPEC 2.4, 6).
Each layer is a small module with a plain `forward` so that a tangent-propagating forward
can be added beside it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def num_groups(channels: int) -> int:
    """GroupNorm groups: 32 for wide layers, fewer (at least 4 channels each) for narrow ones."""
    return math.gcd(channels, min(32, max(1, channels // 4)))


def pnorm(v: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Pixel normalization over the channel dim (dim 1): `v / sqrt(mean(v^2) + eps)`."""
    return v * torch.rsqrt(v.square().mean(dim=1, keepdim=True) + eps)


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding of `c_noise(t) = t` itself with small frequencies.

    What matters for sCM stability is `|d emb / dt|` (SPEC 2.4): frequencies are spaced
    geometrically in `[min_freq, max_freq]` (default 0.1 to 1) and are applied to `t`, never to
    `1000 t`, so the embedding's derivative in t is bounded by `max_freq`.
    """

    def __init__(self, dim: int, min_freq: float = 0.1, max_freq: float = 1.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"PositionalEmbedding dim must be even, got {dim}")
        half = dim // 2
        ratio = torch.linspace(0, 1, half, dtype=torch.float64)
        freqs = max_freq * (min_freq / max_freq) ** ratio
        self.register_buffer("freqs", freqs.float(), persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        arg = t.reshape(-1, 1).to(self.freqs.dtype) * self.freqs
        return torch.cat([torch.cos(arg), torch.sin(arg)], dim=1).to(t.dtype)


class AdaDoubleNorm(nn.Module):
    """Adaptive double normalization (sCM, SPEC 2.4).

    `y = norm(x) * pnorm(s(emb)) + pnorm(b(emb))`, replacing AdaGN's `norm(x)(1 + s) + b`:
    normalizing the modulation keeps its scale fixed whatever the time embedding does.
    `norm` is a GroupNorm without affine for images (B, C, H, W) and a LayerNorm without
    affine for vectors (B, C).
    """

    def __init__(self, channels: int, emb_dim: int, image: bool = True):
        super().__init__()
        self.image = image
        self.norm = (nn.GroupNorm(num_groups(channels), channels, affine=False) if image
                     else nn.LayerNorm(channels, elementwise_affine=False))
        self.scale = nn.Linear(emb_dim, channels)
        self.shift = nn.Linear(emb_dim, channels)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        s, b = pnorm(self.scale(emb)), pnorm(self.shift(emb))
        if self.image:
            s, b = s[:, :, None, None], b[:, :, None, None]
        return self.norm(x) * s + b


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention written with plain ops, exact under forward-mode AD.

    q, k, v: (B, heads, N, d). Fused SDPA kernels raise under `torch.func.jvp` on CPU;
    this path never does.
    """
    scores = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5)
    return torch.softmax(scores, dim=-1) @ v


class SelfAttention2d(nn.Module):
    """Multi-head self-attention over the pixels of a feature map, with a residual."""

    def __init__(self, channels: int, heads: int = 1):
        super().__init__()
        if channels % heads:
            raise ValueError(f"attention channels {channels} not divisible by heads {heads}")
        self.heads = heads
        self.norm = nn.GroupNorm(num_groups(channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w)
        q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))  # (B, heads, N, d)
        out = math_attention(q, k, v).transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj(out)


class ResBlock2d(nn.Module):
    """Residual block: AdaDoubleNorm -> SiLU -> conv -> AdaDoubleNorm -> SiLU -> dropout -> conv."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = AdaDoubleNorm(in_ch, emb_dim)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = AdaDoubleNorm(out_ch, emb_dim)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.dropout = dropout
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x, emb)))
        h = F.dropout(F.silu(self.norm2(h, emb)), p=self.dropout, training=self.training)
        return self.skip(x) + self.conv2(h)


class TimeEmbedding(nn.Module):
    """`c_noise(t) = t` -> sinusoids -> MLP; plus an optional class embedding.

    Class index `num_classes` is the null label (unconditional), used for classifier-free
    guidance; `labels=None` means all-null.
    """

    def __init__(self, base_dim: int, emb_dim: int, num_classes: int = 0,
                 min_freq: float = 0.1, max_freq: float = 1.0):
        super().__init__()
        self.num_classes = num_classes
        self.pos = PositionalEmbedding(base_dim, min_freq, max_freq)
        self.mlp = nn.Sequential(nn.Linear(base_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label = nn.Embedding(num_classes + 1, emb_dim) if num_classes > 0 else None

    def forward(self, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.mlp(self.pos(t))
        if self.label is not None:
            if labels is None:
                labels = torch.full((t.shape[0],), self.num_classes, device=t.device, dtype=torch.long)
            emb = emb + self.label(labels)
        return F.silu(emb)


class AdaptiveWeight(nn.Module):
    """Learned adaptive weighting `w_phi(t)` (SPEC 1.3): a linear layer on a time embedding.

    Starts at zero (unit weight). At the optimum of `exp(w) L - w`, `exp(-w(t))` tracks the
    loss level at t.
    """

    def __init__(self, dim: int = 128, min_freq: float = 0.1, max_freq: float = 1.0):
        super().__init__()
        self.pos = PositionalEmbedding(dim, min_freq, max_freq)
        self.linear = nn.Linear(dim, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.linear(self.pos(t)).squeeze(1)
