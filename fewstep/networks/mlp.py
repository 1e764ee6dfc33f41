"""A residual MLP for low-dimensional (toy) data, with the same conditioning as the UNet and the DiT
(`layers.ConditionedNetwork`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fewstep.networks.layers import AdaDoubleNorm, ConditionedNetwork, check_arguments
from fewstep.networks.registry import register_network


class _MLPBlock(nn.Module):
    def __init__(self, width: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm = AdaDoubleNorm(width, emb_dim, image=False)
        self.linear = nn.Linear(width, width)
        self.dropout = dropout

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        u = F.dropout(F.silu(self.norm(h, emb)), p=self.dropout, training=self.training)
        return h + self.linear(u)


@register_network("mlp")
class MLP(ConditionedNetwork):
    data_kind = "vector"

    def __init__(self, dim: int, width: int = 256, depth: int = 4, dropout: float = 0.0,
                 num_classes: int = 0, emb_min_freq: float = 0.1, emb_max_freq: float = 1.0,
                 adaptive_weight: bool = True, guidance_input: bool = False, second_time: bool = False):
        super().__init__()
        self.check_values(width=width, depth=depth, dropout=dropout, emb_min_freq=emb_min_freq,
                          emb_max_freq=emb_max_freq)
        self.dim = dim
        self.build_conditioning(width, width, num_classes=num_classes, emb_min_freq=emb_min_freq,
                                emb_max_freq=emb_max_freq, adaptive_weight=adaptive_weight,
                                guidance_input=guidance_input, second_time=second_time)
        self.linear_in = nn.Linear(dim, width)
        self.blocks = nn.ModuleList([_MLPBlock(width, width, dropout) for _ in range(depth)])
        self.norm_out = nn.LayerNorm(width)
        self.linear_out = nn.Linear(width, dim)

    @staticmethod
    def check_values(*, width: int, depth: int, dropout: float, emb_min_freq: float, emb_max_freq: float, **_) -> None:
        """The checks that need no data (`fewstep.networks.check_network_values` runs them from a config)."""
        check_arguments(dropout=dropout, emb_min_freq=emb_min_freq, emb_max_freq=emb_max_freq, width=width,
                        depth=depth)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None,
                guidance=None, r=None) -> torch.Tensor:
        emb = self.condition(x, (self.dim,), t, labels, guidance, r)
        h = self.linear_in(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.linear_out(F.silu(self.norm_out(h)))
