"""A residual MLP for low-dimensional (toy) data, with the same time conditioning as the UNet."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fewstep.networks.registry import register_network
from fewstep.networks.layers import AdaDoubleNorm, check_arguments, AdaptiveWeight, TimeEmbedding
from fewstep.networks.tangent import (add_tangents, affine_forward_tangent, dropout_forward_tangent,
                                      norm_forward_tangent, silu_forward_tangent)


class _MLPBlock(nn.Module):
    def __init__(self, width: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm = AdaDoubleNorm(width, emb_dim, image=False)
        self.linear = nn.Linear(width, width)
        self.dropout = dropout

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        u = F.dropout(F.silu(self.norm(h, emb)), p=self.dropout, training=self.training)
        return h + self.linear(u)

    def forward_tangent(self, h: torch.Tensor, h_dot: torch.Tensor, emb: torch.Tensor, emb_dot: torch.Tensor):
        u, u_dot = silu_forward_tangent(*self.norm.forward_tangent(h, h_dot, emb, emb_dot))
        u, u_dot = dropout_forward_tangent(u, u_dot, self.dropout, self.training)
        u, u_dot = affine_forward_tangent(self.linear, u, u_dot)
        return h + u, add_tangents(u_dot, h_dot)


@register_network("mlp")
class MLP(nn.Module):
    def __init__(self, dim: int, width: int = 256, depth: int = 4, dropout: float = 0.0,
                 num_classes: int = 0, emb_min_freq: float = 0.1, emb_max_freq: float = 1.0,
                 adaptive_weight: bool = True, guidance_input: bool = False):
        super().__init__()
        check_arguments(dropout=dropout, emb_min_freq=emb_min_freq, emb_max_freq=emb_max_freq, width=width,
                        depth=depth)
        self.dim, self.num_classes, self.guidance_input = dim, num_classes, guidance_input
        self.time_emb = TimeEmbedding(width, width, num_classes, emb_min_freq, emb_max_freq, guidance_input)
        self.weight_head = AdaptiveWeight(128, emb_min_freq, emb_max_freq) if adaptive_weight else None
        self.linear_in = nn.Linear(dim, width)
        self.blocks = nn.ModuleList([_MLPBlock(width, width, dropout) for _ in range(depth)])
        self.norm_out = nn.LayerNorm(width)
        self.linear_out = nn.Linear(width, dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None,
                guidance=None) -> torch.Tensor:
        emb = self.time_emb(t, labels, guidance)
        h = self.linear_in(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.linear_out(F.silu(self.norm_out(h)))

    def forward_tangent(self, x: torch.Tensor, t: torch.Tensor, x_dot: torch.Tensor, t_dot: torch.Tensor,
                        labels: torch.Tensor | None = None, guidance=None):
        """`(F(x, t), J_x F x_dot + d_t F t_dot)` in one pass; see `UNet.forward_tangent`."""
        t_dot = torch.as_tensor(t_dot, dtype=t.dtype, device=t.device).expand(t.shape)
        emb, emb_dot = self.time_emb.forward_tangent(t, t_dot, labels, guidance)
        h, h_dot = affine_forward_tangent(self.linear_in, x, x_dot)
        for block in self.blocks:
            h, h_dot = block.forward_tangent(h, h_dot, emb, emb_dot)
        h, h_dot = silu_forward_tangent(*norm_forward_tangent(self.norm_out, h, h_dot))
        return affine_forward_tangent(self.linear_out, h, h_dot)

    def adaptive_weight(self, t: torch.Tensor) -> torch.Tensor | None:
        return None if self.weight_head is None else self.weight_head(t)
