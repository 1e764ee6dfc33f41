"""EDM diffusion (VE with EDM preconditioning), docs/math.md#edm-parameterization.

`ln(sigma) ~ N(P_mean, P_std^2)`, `L = lambda(sigma) ||D(x0 + sigma n, sigma) - x0||^2 / D` with
`lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2` (EDM, Table 1), optionally
with learned adaptive weighting on top (docs/math.md#adaptive-weighting, fed `c_noise = ln(sigma) / 4`). With
`label_dropout > 0` labels are replaced by the null label with that probability (for CFG).
For data of std sigma_data the optimal denoiser's loss is 1 at every sigma.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fewstep.core.edm import edm_denoiser
from fewstep.methods.base import Method, register_method
from fewstep.methods.common import adaptive_weighting, check_range, per_sample_mse
from fewstep.methods.flow import drop_labels
from fewstep.core.trigflow import SIGMA_D, expand_to
from fewstep.networks.contract import network_info


@register_method("edm")
@dataclass
class EDMDiffusion(Method):
    sigma_data: float = SIGMA_D
    p_mean: float = -1.2
    p_std: float = 1.2
    adaptive_weight: bool = False
    label_dropout: float = 0.0  # probability of the null label, for CFG

    parameterization = "edm"

    @property
    def sigma_d(self) -> float:
        return self.sigma_data

    def sampler(self, net, step=None):
        """The EDM probability-flow ODE, Heun on the Karras schedule."""
        from fewstep.core.ode import ODESampler

        return ODESampler(net, self.sigma_data, "edm", num_classes=network_info(net).num_classes)

    def __post_init__(self):
        check_range("method.sigma_data", self.sigma_data, 0, low_open=True)
        check_range("method.p_std", self.p_std, 0, low_open=True)
        check_range("method.label_dropout", self.label_dropout, 0, 1)

    def __call__(self, net, x0: torch.Tensor, labels: torch.Tensor | None = None, step: int = 0):
        labels = drop_labels(labels, self.label_dropout, net)
        sigma = (torch.randn(x0.shape[0], device=x0.device) * self.p_std + self.p_mean).exp().to(x0.dtype)
        x = x0 + expand_to(sigma, x0) * torch.randn_like(x0)
        weight = (sigma.square() + self.sigma_data ** 2) / (sigma * self.sigma_data).square()
        mse = per_sample_mse(edm_denoiser(net, x, sigma, labels, self.sigma_data) - x0)
        loss, w = adaptive_weighting(weight * mse, net, sigma.log() / 4, self.adaptive_weight)
        stats = {"mse": mse.detach().mean(), "weighted_mse": (weight * mse).detach().mean()}
        if w is not None:
            stats["w_mean"] = w.detach().mean()
        return loss, stats
