"""Exponential moving average of the weights, used for sampling and evaluation (SPEC 5)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """`theta_ema <- d theta_ema + (1 - d) theta`, with `d = min(decay, (1 + k) / (10 + k))` so
    that short runs are not dominated by the initial weights."""

    def __init__(self, net: nn.Module, decay: float = 0.999):
        self.decay = decay
        self.net = copy.deepcopy(net).eval().requires_grad_(False)

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, net: nn.Module, step: int) -> None:
        d = self.decay_at(step)
        ema_params = list(self.net.parameters())
        params = [p.detach() for p in net.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - d)
        for b_ema, b in zip(self.net.buffers(), net.buffers()):
            b_ema.copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.net.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.net.load_state_dict(state)
