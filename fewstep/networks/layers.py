"""Building blocks shared by fewstep's networks.

Each layer has one `forward`; sCT/sCD's JVP comes from the tangent engine
(`fewstep.jvp.engine`), which carries tangents through these same ops. No BatchNorm
(SPEC 2.4); attention is `F.scaled_dot_product_attention`, whose tangent the engine computes
exactly (SPEC 6) whatever backend runs the primal.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn



def check_arguments(*, dropout: float, emb_min_freq: float, emb_max_freq: float, **sizes: int) -> None:
    """Constructor checks shared by the UNet and the MLP, as one-line errors naming the config key."""
    for key, value in sizes.items():
        if value < 1:
            raise ValueError(f"network.{key} must be >= 1, got {value}")
    if not 0 <= dropout < 1:
        raise ValueError(f"network.dropout must be in [0, 1), got {dropout}")
    if not 0 < emb_min_freq <= emb_max_freq:
        raise ValueError("network.emb_min_freq must be > 0 and <= network.emb_max_freq")


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

    def _split_heads(self, qkv: torch.Tensor):
        """(B, 3C, H, W) -> q, k, v of shape (B, heads, N, d)."""
        b, c3, h, w = qkv.shape
        qkv = qkv.reshape(b, 3, self.heads, c3 // (3 * self.heads), h * w)
        return tuple(qkv[:, i].transpose(-1, -2) for i in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split_heads(self.qkv(self.norm(x)))
        out = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(x.shape)
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
    """`c_noise(t) = t` -> sinusoids -> MLP; plus an optional class embedding and an optional
    guidance-scale embedding.

    Class index `num_classes` is the null label (unconditional), used for classifier-free
    guidance; `labels=None` means all-null. With `guidance_input`, a distilled student takes
    the CFG scale `w` it should imitate as an input (sCD, SPEC 2.1): sinusoids of `w` and a
    zero-initialized linear layer, so that a student copied from its teacher starts as
    exactly the teacher; `guidance=None` means `w = 1` (the conditional model, no guidance).
    """

    def __init__(self, base_dim: int, emb_dim: int, num_classes: int = 0,
                 min_freq: float = 0.1, max_freq: float = 1.0, guidance_input: bool = False):
        super().__init__()
        self.num_classes = num_classes
        self.pos = PositionalEmbedding(base_dim, min_freq, max_freq)
        self.mlp = nn.Sequential(nn.Linear(base_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label = nn.Embedding(num_classes + 1, emb_dim) if num_classes > 0 else None
        self.guidance = None
        if guidance_input:
            self.guidance = nn.Sequential(PositionalEmbedding(base_dim, min_freq, max_freq),
                                          nn.Linear(base_dim, emb_dim))
            nn.init.zeros_(self.guidance[1].weight)
            nn.init.zeros_(self.guidance[1].bias)

    def _conditions(self, emb: torch.Tensor, labels: torch.Tensor | None, guidance) -> torch.Tensor:
        """Add the class and guidance embeddings (constant in t: they carry no tangent)."""
        if self.label is not None:
            if labels is None:
                labels = torch.full((emb.shape[0],), self.num_classes, device=emb.device, dtype=torch.long)
            emb = emb + self.label(labels)
        if self.guidance is not None:
            w = torch.as_tensor(1.0 if guidance is None else guidance, dtype=emb.dtype, device=emb.device)
            emb = emb + self.guidance(w.expand(emb.shape[0]))
        return emb

    def forward(self, t: torch.Tensor, labels: torch.Tensor | None = None, guidance=None) -> torch.Tensor:
        return F.silu(self._conditions(self.mlp(self.pos(t)), labels, guidance))

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
