"""A Diffusion Transformer (Peebles & Xie 2023) under fewstep's network contract.

Patchify, transformer blocks with adaLN-Zero modulation from the time (and class) embedding,
`F.scaled_dot_product_attention`, a GELU MLP, and a modulated linear head, unpatchified to
`F(x / sigma_d, t)`. The time embedding is fewstep's positional embedding of t itself (the
sCM paper's advice, docs/math.md#stabilizers), the same as the UNet's; `second_time=True` adds MeanFlow's second
time r as the UNet does (`layers.ConditionedNetwork`). The module has one forward only: its JVP for
sCT/sCD/MeanFlow comes from the tangent engine (`fewstep.jvp.engine`) or `torch.func.jvp`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fewstep.networks.layers import ConditionedNetwork, check_arguments
from fewstep.networks.registry import register_network


def sincos_position_embedding(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding (grid * grid, dim), as in MAE and DiT."""
    if dim % 4:
        raise ValueError(f"network.hidden_size must be divisible by 4, got {dim}")
    coords = torch.arange(grid, dtype=torch.float64)
    freqs = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    angles_h = coords[:, None] * freqs[None]  # (grid, dim / 4)
    emb_h = torch.cat([angles_h.sin(), angles_h.cos()], dim=1)  # (grid, dim / 2)
    rows = emb_h[:, None, :].expand(grid, grid, dim // 2)
    cols = emb_h[None, :, :].expand(grid, grid, dim // 2)
    return torch.cat([rows, cols], dim=2).reshape(grid * grid, dim).float()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(hidden, int(hidden * mlp_ratio)), nn.GELU(approximate="tanh"),
                                 nn.Dropout(dropout), nn.Linear(int(hidden * mlp_ratio), hidden))
        self.ada = nn.Linear(hidden, 6 * hidden)
        nn.init.zeros_(self.ada.weight)  # adaLN-Zero: each block starts as the identity
        nn.init.zeros_(self.ada.bias)

    def attention(self, h: torch.Tensor) -> torch.Tensor:
        b, n, c = h.shape
        q, k, v = self.qkv(h).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(emb).chunk(6, dim=1)
        x = x + gate1[:, None] * self.attention(modulate(self.norm1(x), shift1, scale1))
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


@register_network("dit")
class DiT(ConditionedNetwork):
    data_kind = "image"

    def __init__(self, img_channels: int, img_resolution: int, patch_size: int = 2, hidden_size: int = 256,
                 depth: int = 6, heads: int = 4, mlp_ratio: float = 4.0, dropout: float = 0.0,
                 num_classes: int = 0, emb_min_freq: float = 0.1, emb_max_freq: float = 1.0,
                 adaptive_weight: bool = True, guidance_input: bool = False, second_time: bool = False):
        super().__init__()
        self.check_values(patch_size=patch_size, hidden_size=hidden_size, depth=depth, heads=heads, dropout=dropout,
                          emb_min_freq=emb_min_freq, emb_max_freq=emb_max_freq)
        if img_resolution % patch_size:
            raise ValueError(f"img_resolution {img_resolution} is not divisible by network.patch_size {patch_size}")
        self.img_channels, self.img_resolution, self.patch_size = img_channels, img_resolution, patch_size
        self.grid = img_resolution // patch_size
        self.patchify = nn.Conv2d(img_channels, hidden_size, patch_size, stride=patch_size)
        self.register_buffer("pos", sincos_position_embedding(hidden_size, self.grid), persistent=False)
        self.build_conditioning(hidden_size, hidden_size, num_classes=num_classes, emb_min_freq=emb_min_freq,
                                emb_max_freq=emb_max_freq, adaptive_weight=adaptive_weight,
                                guidance_input=guidance_input, second_time=second_time)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, heads, mlp_ratio, dropout) for _ in range(depth)])
        self.norm_out = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Linear(hidden_size, 2 * hidden_size)
        self.head = nn.Linear(hidden_size, patch_size * patch_size * img_channels)
        for layer in (self.ada_out, self.head):  # the output starts at zero, as in DiT
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        nn.init.xavier_uniform_(self.patchify.weight.view(hidden_size, -1))

    @staticmethod
    def check_values(*, patch_size: int, hidden_size: int, depth: int, heads: int, dropout: float,
                     emb_min_freq: float, emb_max_freq: float, **_) -> None:
        """The checks that need no data (`fewstep.networks.check_network_values` runs them from a config)."""
        check_arguments(dropout=dropout, emb_min_freq=emb_min_freq, emb_max_freq=emb_max_freq,
                        patch_size=patch_size, hidden_size=hidden_size, depth=depth, heads=heads)
        if hidden_size % heads:
            raise ValueError(f"network.hidden_size {hidden_size} is not divisible by network.heads {heads}")
        if hidden_size % 4:
            raise ValueError(f"network.hidden_size must be divisible by 4, got {hidden_size}")

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None,
                guidance=None, r=None) -> torch.Tensor:
        emb = self.condition(x, (self.img_channels, self.img_resolution, self.img_resolution), t, labels, guidance, r)
        b, c, size, _ = x.shape
        h = self.patchify(x).flatten(2).transpose(1, 2) + self.pos
        for block in self.blocks:
            h = block(h, emb)
        shift, scale = self.ada_out(emb).chunk(2, dim=1)
        h = self.head(modulate(self.norm_out(h), shift, scale))  # (b, grid^2, p * p * c)
        p, g = self.patch_size, self.grid
        return h.reshape(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, size, size)


__all__ = ["DiT", "DiTBlock", "modulate", "sincos_position_embedding"]
