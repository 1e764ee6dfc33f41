"""Building blocks shared by fewstep's networks.

Each layer has one `forward`; sCT/sCD's JVP comes from the tangent engine
(`fewstep.jvp.engine`), which carries tangents through these same ops. No BatchNorm
(docs/math.md#stabilizers); attention is `F.scaled_dot_product_attention`, whose tangent the engine computes
exactly (docs/math.md#attention-tangent-rule) whatever backend runs the primal.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.proxy_tensor import get_proxy_mode



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

    What matters for sCM stability is `|d emb / dt|` (docs/math.md, sCM stabilizers): frequencies
    are spaced geometrically in `[min_freq, max_freq]` (default 0.1 to 1) and are applied to `t`,
    never to `1000 t`, so the embedding's derivative in t is bounded by `max_freq`. The sinusoids
    are computed in float32 at least (float64 stays): bf16 rounds t near pi/2 by up to 0.008.
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
        dtype = torch.promote_types(torch.promote_types(t.dtype, self.freqs.dtype), torch.float32)
        arg = t.reshape(-1, 1).to(dtype) * self.freqs.to(dtype)
        return torch.cat([torch.cos(arg), torch.sin(arg)], dim=1)


def embed_in_full_precision(pos: PositionalEmbedding, layers, v: torch.Tensor) -> torch.Tensor:
    """`layers(pos(v))` with autocast off: the sinusoids in float32 or wider, then the `layers` (an
    iterable of modules, the first a Linear) in their own dtype (float32 unless the net was cast)."""
    layers = list(layers)
    with torch.autocast(v.device.type, enabled=False):
        h = pos(v).to(layers[0].weight.dtype)
        for layer in layers:
            h = layer(h)
    return h


class AdaDoubleNorm(nn.Module):
    """Adaptive double normalization (sCM, docs/math.md#stabilizers).

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

class Conditioning(nn.Module):
    """Everything a fewstep network is conditioned on, as one embedding `emb` (B, emb_dim):

    - time: `c_noise(t) = t` -> sinusoids -> MLP (`pos`, `mlp`), embedded with autocast off and
      in float32 at least, whatever precision the rest of the network runs in (rcm found that time
      must be embedded in fp32: bf16 rounds t near pi/2 by up to 0.008);
    - class labels (`label`, with `num_classes`): index K = `num_classes` is the null label
      (classifier-free guidance); `labels=None` means all-null;
    - the CFG scale (`guidance`, with `guidance_input`): a distilled student takes the scale w it
      imitates as an input (sCD); sinusoids of w and a zero-initialized linear layer, so that a
      student copied from its teacher starts as exactly the teacher; `guidance=None` means w = 1;
    - a second time r <= t (`interval`, with `second_time`; flow maps such as MeanFlow): an
      embedding of `t - r`, whose last layer starts at zero, so that a fresh network, or one
      loaded from a checkpoint without it, computes what it did without it; `r=None` means r = t
      (the instantaneous velocity: the network is also a plain velocity network).

    Why (t, t - r) rather than (t, r): MeanFlow's ablation found (t, t - r) at least as good, and
    every r = t sample (75% of a MeanFlow batch) then sees the interval input 0 whatever t. The
    interval goes through the same small frequencies as t (`d(t - r)/dt = 1`: the JVP in t stays
    bounded). The sum goes through one SiLU. Label, guidance and r embeddings are constant in t
    (r carries no tangent in MeanFlow's JVP: compute with r as given).
    """

    def __init__(self, base_dim: int, emb_dim: int, num_classes: int = 0, min_freq: float = 0.1,
                 max_freq: float = 1.0, guidance_input: bool = False, second_time: bool = False):
        super().__init__()
        self.num_classes, self.guidance_input, self.second_time = num_classes, guidance_input, second_time
        self.pos = PositionalEmbedding(base_dim, min_freq, max_freq)
        self.mlp = nn.Sequential(nn.Linear(base_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label = nn.Embedding(num_classes + 1, emb_dim) if num_classes > 0 else None
        self.guidance = None
        if guidance_input:
            self.guidance = nn.Sequential(PositionalEmbedding(base_dim, min_freq, max_freq),
                                          nn.Linear(base_dim, emb_dim))
            _zero(self.guidance[1])
        self.interval = None
        if second_time:
            self.interval = nn.Sequential(PositionalEmbedding(base_dim, min_freq, max_freq),
                                          nn.Linear(base_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
            _zero(self.interval[3])

    def forward(self, t: torch.Tensor, labels: torch.Tensor | None = None, guidance=None,
                r: torch.Tensor | None = None) -> torch.Tensor:
        if r is not None and self.interval is None:
            raise ValueError("this network takes no second time r (MeanFlow): build it with second_time=True "
                             "(network.second_time=true)")
        if guidance is not None and self.guidance is None:
            raise ValueError("this network takes no guidance input: build it with guidance_input=True "
                             "(network.guidance_input=true)")
        emb = embed_in_full_precision(self.pos, self.mlp, t)
        with torch.autocast(t.device.type, enabled=False):
            if self.label is not None:
                if labels is None:
                    labels = torch.full((emb.shape[0],), self.num_classes, device=emb.device, dtype=torch.long)
                emb = emb + self.label(labels)
            if self.guidance is not None:
                w = torch.as_tensor(1.0 if guidance is None else guidance, device=emb.device)
                emb = emb + embed_in_full_precision(self.guidance[0], list(self.guidance)[1:], w.expand(emb.shape[0]))
            if self.interval is not None:
                interval = torch.zeros_like(t) if r is None else t - r  # d(t - r)/dt = 1
                emb = emb + embed_in_full_precision(self.interval[0], list(self.interval)[1:], interval)
            return F.silu(emb)


TimeEmbedding = Conditioning  # the v0.2 name


def _zero(layer: nn.Linear) -> None:
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)


class AdaptiveWeight(nn.Module):
    """Learned adaptive weighting `w_phi(t)` (docs/math.md, adaptive weighting): a linear layer on
    a time embedding, embedded in float32 at least like the network's own.

    Starts at zero (unit weight). At the optimum of `exp(w) L - w`, `exp(-w(t))` tracks the
    loss level at t.
    """

    def __init__(self, dim: int = 128, min_freq: float = 0.1, max_freq: float = 1.0):
        super().__init__()
        self.pos = PositionalEmbedding(dim, min_freq, max_freq)
        self.linear = nn.Linear(dim, 1)
        _zero(self.linear)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return embed_in_full_precision(self.pos, [self.linear], t).squeeze(1)


class ConditionedNetwork(nn.Module):
    """What fewstep's UNet, DiT and MLP share: their conditioning (`time_emb`, a `Conditioning`),
    the adaptive-weight head (`weight_head`), the network contract's feature attributes
    (`num_classes`, `guidance_input`, `second_time`; `fewstep.networks.network_info` reads them)
    and the checks of the forward's arguments. The attribute paths are those of v0.2, so its
    checkpoints load."""

    def build_conditioning(self, base_dim: int, emb_dim: int, *, num_classes: int, emb_min_freq: float,
                           emb_max_freq: float, adaptive_weight: bool, guidance_input: bool,
                           second_time: bool) -> None:
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.num_classes, self.guidance_input, self.second_time = num_classes, guidance_input, second_time
        self.time_emb = Conditioning(base_dim, emb_dim, num_classes, emb_min_freq, emb_max_freq, guidance_input,
                                     second_time)
        self.weight_head = AdaptiveWeight(128, emb_min_freq, emb_max_freq) if adaptive_weight else None

    def condition(self, x: torch.Tensor, sample_shape: tuple[int, ...], t: torch.Tensor,
                  labels: torch.Tensor | None, guidance, r: torch.Tensor | None) -> torch.Tensor:
        """Check the forward's arguments against `sample_shape` (one sample's shape), then embed
        `(t, labels, guidance, r)`."""
        name = type(self).__name__
        if not torch.is_tensor(x) or tuple(x.shape[1:]) != tuple(sample_shape) or x.ndim != len(sample_shape) + 1:
            raise ValueError(f"{name} takes x of shape (B, {', '.join(map(str, sample_shape))}), "
                             f"got {tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}")
        b = x.shape[0]
        for key, v in (("t", t), ("r", r)):
            if v is not None and not (torch.is_tensor(v) and v.is_floating_point() and v.numel() in (1, b)):
                raise ValueError(f"{name}: {key} must be a float tensor with one time per sample ({b}) or one "
                                 f"for all, got {tuple(v.shape) if torch.is_tensor(v) else type(v).__name__}")
        if torch.is_tensor(guidance) and guidance.numel() not in (1, b):
            raise ValueError(f"{name}: guidance must be one scale per sample ({b}) or one for all, "
                             f"got shape {tuple(guidance.shape)}")
        if labels is not None:
            self.check_labels(labels, b)
        return self.time_emb(t, labels, guidance, r)

    def check_labels(self, labels: torch.Tensor, batch: int) -> None:
        name, k = type(self).__name__, self.num_classes
        if not k:
            raise ValueError(f"{name} is unconditional (num_classes=0) but was given labels; pass labels=None, "
                             f"or build it class-conditional (network.class_conditional=true)")
        if not torch.is_tensor(labels) or labels.shape != (batch,) or labels.is_floating_point() \
                or labels.dtype == torch.bool:
            raise ValueError(f"{name}: labels must be integer class indices of shape ({batch},), got "
                             f"{(labels.dtype, tuple(labels.shape)) if torch.is_tensor(labels) else type(labels).__name__}")
        # one device sync; an out-of-range index would otherwise be a CUDA device-side assert. Compiled
        # or traced (the traced JVP), the labels have no values to read.
        if not torch.compiler.is_compiling() and get_proxy_mode() is None and bool(((labels < 0) | (labels > k)).any()):
            raise ValueError(f"{name}: labels must be in [0, {k}] ({k}: no label), got values in "
                             f"[{int(labels.min())}, {int(labels.max())}]")

    def adaptive_weight(self, t: torch.Tensor) -> torch.Tensor | None:
        """`w_phi(t)` (docs/math.md, adaptive weighting), or None when the network has no head."""
        return None if self.weight_head is None else self.weight_head(t)
