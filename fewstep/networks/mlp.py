"""A residual MLP for low-dimensional (toy) data, with the same time conditioning as the UNet (and, with
`second_time=True`, MeanFlow's second time r: `unet.TwoTimeEmbedding`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fewstep.networks.layers import AdaDoubleNorm, AdaptiveWeight, check_arguments
from fewstep.networks.registry import register_network
from fewstep.networks.unet import embed, time_embedding


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
class MLP(nn.Module):
    def __init__(self, dim: int, width: int = 256, depth: int = 4, dropout: float = 0.0,
                 num_classes: int = 0, emb_min_freq: float = 0.1, emb_max_freq: float = 1.0,
                 adaptive_weight: bool = True, guidance_input: bool = False, second_time: bool = False):
        super().__init__()
        check_arguments(dropout=dropout, emb_min_freq=emb_min_freq, emb_max_freq=emb_max_freq, width=width,
                        depth=depth)
        self.dim, self.num_classes, self.guidance_input = dim, num_classes, guidance_input
        self.second_time = second_time
        self.time_emb = time_embedding(width, width, num_classes, emb_min_freq, emb_max_freq, guidance_input,
                                       second_time)
        self.weight_head = AdaptiveWeight(128, emb_min_freq, emb_max_freq) if adaptive_weight else None
        self.linear_in = nn.Linear(dim, width)
        self.blocks = nn.ModuleList([_MLPBlock(width, width, dropout) for _ in range(depth)])
        self.norm_out = nn.LayerNorm(width)
        self.linear_out = nn.Linear(width, dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None,
                guidance=None, r=None) -> torch.Tensor:
        emb = embed(self.time_emb, t, labels, guidance, r)
        h = self.linear_in(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.linear_out(F.silu(self.norm_out(h)))

    def adaptive_weight(self, t: torch.Tensor) -> torch.Tensor | None:
        return None if self.weight_head is None else self.weight_head(t)
