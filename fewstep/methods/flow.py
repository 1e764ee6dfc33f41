"""TrigFlow diffusion (flow matching with a velocity network), docs/math.md#the-network-contract.

`L = || sigma_d F(x_t / sigma_d, t) - v_t ||^2 / D` with `v_t = cos(t) z - sin(t) x0`,
`t` from the log-normal proposal, optionally with learned adaptive weighting (docs/math.md#adaptive-weighting).
With `label_dropout > 0`, labels are replaced by the null label with that probability
(classifier-free guidance at sampling).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fewstep.methods.base import Method, register_method
from fewstep.methods.common import adaptive_weighting, check_range, per_sample_mse
from fewstep.core.trigflow import SIGMA_D, lognormal_times, net_velocity, time_dtype, trigflow_noise, trigflow_velocity
from fewstep.networks.contract import network_info


def drop_labels(labels: torch.Tensor | None, p: float, net) -> torch.Tensor | None:
    """Replace each label by the null label `net.num_classes` with probability p (CFG training)."""
    if labels is None or p <= 0:
        return labels
    drop = torch.rand(labels.shape, device=labels.device) < p
    return torch.where(drop, torch.full_like(labels, network_info(net).num_classes), labels)


@register_method("flow")
@dataclass
class FlowMatching(Method):
    sigma_d: float = SIGMA_D
    p_mean: float = -1.0
    p_std: float = 1.4
    adaptive_weight: bool = True
    label_dropout: float = 0.0  # probability of the null label, for CFG

    def __post_init__(self):
        check_range("method.sigma_d", self.sigma_d, 0, low_open=True)
        check_range("method.p_std", self.p_std, 0, low_open=True)
        check_range("method.label_dropout", self.label_dropout, 0, 1)

    def __call__(self, net, x0: torch.Tensor, labels: torch.Tensor | None = None, step: int = 0):
        labels = drop_labels(labels, self.label_dropout, net)
        t = lognormal_times(x0.shape[0], self.p_mean, self.p_std, self.sigma_d, device=x0.device,
                           dtype=time_dtype(x0))
        z = torch.randn_like(x0) * self.sigma_d
        x_t = trigflow_noise(x0, z, t)
        v_pred = net_velocity(net, x_t, t, self.sigma_d, labels)
        mse = per_sample_mse(v_pred - trigflow_velocity(x0, z, t))
        loss, w = adaptive_weighting(mse, net, t, self.adaptive_weight)
        stats = {"mse": mse.detach().mean()}
        if w is not None:
            stats["w_mean"] = w.detach().mean()
        return loss, stats
