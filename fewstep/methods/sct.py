"""Continuous-time consistency training from scratch (sCT), docs/math.md#sct-and-scd.

The tangent direction is the conditional velocity `dx_t/dt = cos(t) z - sin(t) x0` of the
same `x0` and `z` that made `x_t`; no teacher.
"""

from __future__ import annotations

import math

from dataclasses import dataclass

import torch

from fewstep.methods.base import Method, register_method
from fewstep.methods.common import check_choice, check_range
from fewstep.jvp import JVP_MODES
from fewstep.methods.scm import TANGENT_NORMS, scm_loss, tangent_warmup
from fewstep.networks.contract import network_info
from fewstep.core.trigflow import SIGMA_D, lognormal_times, time_dtype, trigflow_noise, trigflow_velocity


@register_method("sct")
@dataclass
class SCT(Method):
    sigma_d: float = SIGMA_D
    p_mean: float = -1.0
    p_std: float = 1.4
    tangent_norm: str = "l2"  # 'l2' (paper), 'rms', 'clip' or 'none'
    norm_const: float = 0.1
    warmup_steps: int = 0  # tangent warmup; the paper uses 10k for sCT from scratch
    adaptive_weight: bool = True
    # Sampling starts at t_max = arctan(sigma_max / sigma_d) (the sCM paper: sigma_max = 80); None: t = pi/2.
    sigma_max: float | None = None
    jvp_mode: str = "traced"  # "traced": the tangent engine traced once per input signature into one
    # primal+tangent graph (fewstep.jvp.traced; compiled with train.compile); "tangent": the engine
    # eagerly, one forward with tangents (any network; the fallback of "traced"); "separate":
    # torch.func.jvp in a no-grad pass; "single": one grad-enabled forward-AD pass (more memory).

    def __post_init__(self):
        check_range("method.sigma_d", self.sigma_d, 0, low_open=True)
        if self.sigma_max is not None:
            check_range("method.sigma_max", self.sigma_max, 0, low_open=True)
        check_range("method.p_std", self.p_std, 0, low_open=True)
        check_range("method.norm_const", self.norm_const, 0)
        check_range("method.warmup_steps", self.warmup_steps, 0)
        check_choice("method.tangent_norm", self.tangent_norm, TANGENT_NORMS)
        check_choice("method.jvp_mode", self.jvp_mode, JVP_MODES)

    def sampler(self, net, step=None):
        """Multistep consistency sampling in TrigFlow."""
        from fewstep.core.samplers import TrigFlowConsistencySampler

        t_max = math.pi / 2 if self.sigma_max is None else math.atan(self.sigma_max / self.sigma_d)
        return TrigFlowConsistencySampler(net, self.sigma_d, guidance_input=network_info(net).guidance_input,
                                          t_max=t_max)

    def __call__(self, net, x0: torch.Tensor, labels: torch.Tensor | None = None, step: int = 0):
        t = lognormal_times(x0.shape[0], self.p_mean, self.p_std, self.sigma_d, device=x0.device,
                           dtype=time_dtype(x0))
        z = torch.randn_like(x0) * self.sigma_d
        x_t = trigflow_noise(x0, z, t)
        dxdt = trigflow_velocity(x0, z, t)
        return scm_loss(net, x_t, t, dxdt, self.sigma_d, labels, r=tangent_warmup(step, self.warmup_steps),
                        tangent_norm=self.tangent_norm, norm_const=self.norm_const,
                        adaptive_weight=self.adaptive_weight, jvp_mode=self.jvp_mode)
