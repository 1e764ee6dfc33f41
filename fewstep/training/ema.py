"""Moving averages of the weights, used for sampling and evaluation (docs/math.md#training-loop-facts).

- `EMA(net, decay)`: the classic exponential average, with a warmup of the decay.
- `EMA(net, sigma_rel=0.05)`: EDM2's power-function average (Karras et al. 2024): at step t the
  average weighs the weights of step tau by about `tau^gamma`, so its length grows with the run;
  `sigma_rel` (its width relative to the run length) is the one knob and fixes `gamma`.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """EDM2's power-function exponent for a relative width: the root of
    `sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3))` (EDM2, Eq. 3 and Alg. 2)."""
    if not 0 < sigma_rel < 0.28:
        raise ValueError(f"sigma_rel must be in (0, 0.28), got {sigma_rel}")
    t = sigma_rel ** -2
    roots = np.roots([1, 7, 16 - t, 12 - t]).real
    return float(roots.max())


class EMA:
    """`theta_ema <- d theta_ema + (1 - d) theta`.

    Classic (`decay`): `d = min(decay, (1 + k) / (10 + k))` at step k, so that short runs are not
    dominated by the initial weights. Power function (`sigma_rel`, EDM2): `d = (1 - 1/t)^(gamma + 1)`
    with t = k + 1, which makes the average at step t weigh step tau by `tau^gamma` (normalized).
    """

    def __init__(self, net: nn.Module, decay: float = 0.999, sigma_rel: float | None = None):
        self.decay, self.sigma_rel = decay, sigma_rel
        self.gamma = None if sigma_rel is None else sigma_rel_to_gamma(sigma_rel)
        self.net = copy.deepcopy(net).eval().requires_grad_(False)

    def decay_at(self, step: int) -> float:
        if self.gamma is not None:
            t = step + 1
            return (1 - 1 / t) ** (self.gamma + 1) if t > 1 else 0.0
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
