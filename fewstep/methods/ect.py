"""Easy Consistency Tuning (ECT; Geng, Pokle, Luo, Lin, Kolter 2024, "Consistency Models Made Easy",
arXiv 2406.14548, code locuslab/ect), docs/math.md#ect: consistency training that starts from a diffusion
model's weights, with a pair of noise levels (t, r) that starts at r = 0 (the diffusion loss itself)
and moves r -> t over the run.

In EDM noise levels sigma (ECT's own units; `training/loss.py` of locuslab/ect):

    t ~ log-normal(P_mean, P_std)                                       # ECT: (-1.1, 2.0), iCT's
    r = max(0, t (1 - n(t) / q^(stage + 1))),   n(t) = 1 + k sigmoid(-b t)    # the mapping function
    stage = floor(step / (total_steps / stages))                        # dt = t - r halves per stage (q = 2)
    L = d(f_theta(x_t, t), sg f_theta(x_r, r)) * w(t, r),   x_t = x0 + t eps,  x_r = x0 + r eps (one eps)
    d = sqrt(||.||^2 + c^2) - c  (||.||^2 summed over dims; c = 0: the L2 norm, ECT's adaptive weighting p = 0.5)
    w = 1 / (t - r)

Defaults are ECT's CIFAR-10 run (`run_ecm.sh`, `ct_train.py`): q = 2, k = 8, b = 1, c = 0, 8 stages
over the run (double every 250 ticks of 12.8 kimg in a 25.6 Mimg run), the sigmoid mapping, and
w = 1/(t - r) (the weighting of the code's CIFAR version; its later ImageNet/EDM2 code uses EDM's
`(t^2 + sigma_d^2) / (t sigma_d)^2`, `weighting='edm'`). ECT's "1 A100-hour" recipe
(`run_ecm_1hour.sh`) is q = 256 with a single stage (`stages=1`): r = t (1 - n(t) / 256) from the
start. `mapping='const'` drops n(t) (r = t (1 - 1 / q^(stage+1))). ECT samples 2 steps through
sigma = 0.821, TrigFlow t = 1.024 (`--times 1.5708,1.024`); fewstep's default is t = 1.1.

Sampling starts where ECT's does, at sigma_max = 80 (`t_max = arctan(sigma_max / sigma_d)`), not at
t = pi/2 (sigma = inf, a time the network never trained at): a schedule's first time above `t_max`
becomes `t_max`, and the first noise is ECT's `x = sigma_max eps` read in TrigFlow,
`x_{t_max} = cos(t_max) sigma_max eps = sin(t_max) sigma_d eps` (`ECT.sampler`).

In fewstep's conventions the network is read as TrigFlow (docs/math.md#edm-to-trigflow): with `t = arctan(sigma /
sigma_d)`, `x_t = cos(t) x_sigma` and `z = sigma_d eps`, the consistency function
`f(x_t, t) = cos t x_t - sin t sigma_d F(x_t / sigma_d, t)` is exactly EDM's preconditioned denoiser
`D(x_sigma, sigma)`, which is what ECT tunes (its `ECMPrecond` trains with EDM's preconditioning;
it samples with CM's boundary shift at sigma_min = 0.003, a change of order sigma_min left out here);
it is exactly `x` at t = 0, so r = 0 needs no boundary shift, and a 'flow' teacher's weights ARE the
initial consistency model (an 'edm' teacher goes through `networks.convert`). The target pass uses
theta^- = stopgrad(theta) (no EMA target) with the same dropout masks as the graded pass, as ECT.

Teacher: `takes_teacher` is True (`--teacher RUN`): `fewstep.training.build` copies the teacher's weights into
the student (`train.init_from_teacher`, default true) and `set_teacher` keeps nothing; the teacher is
only the initialization. `from_teacher=False` takes none: random initial weights (ECT's "from
scratch" mode, the same loss), or the weights of `train.init_from` (the same start as `--teacher`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fewstep.methods.base import Method, register_method
from fewstep.methods.cm import cm_distance
from fewstep.methods.common import check_choice, check_range, same_random_draws
from fewstep.networks.contract import network_info
from fewstep.core.trigflow import SIGMA_D, expand_to, time_dtype, trigflow_consistency, trigflow_noise

MAPPINGS = ("sigmoid", "const")
WEIGHTINGS = ("inv_dt", "edm", "none")
ECT_METRICS = ("pseudo_huber", "l2", "l1")


def ect_stage(step: int, total_steps: int, stages: int) -> int:
    """The curriculum stage of `step`: `stages` equal stages over `total_steps` (stage 0 without a run length)."""
    if total_steps <= 0:
        return 0
    return min(step * stages // total_steps, stages - 1)


def ect_mapping(t: torch.Tensor, stage: int, q: float = 2.0, k: float = 8.0, b: float = 1.0,
                mapping: str = "sigmoid") -> torch.Tensor:
    """ECT's mapping function in EDM noise levels: `r = max(0, t (1 - n(t) / q^(stage + 1)))` with
    `n(t) = 1 + k sigmoid(-b t)` ('sigmoid') or `n = 1` ('const')."""
    n = 1 + k * torch.sigmoid(-b * t) if mapping == "sigmoid" else torch.ones_like(t)
    return (t * (1 - n / q ** (stage + 1))).clamp(min=0)


def ect_weight(t: torch.Tensor, r: torch.Tensor, weighting: str = "inv_dt", sigma_d: float = SIGMA_D) -> torch.Tensor:
    """`1 / (t - r)` ('inv_dt'), EDM's `(t^2 + sigma_d^2) / (t sigma_d)^2` ('edm'), or 1 ('none'); EDM sigmas."""
    if weighting == "inv_dt":
        return 1.0 / (t - r)
    if weighting == "edm":
        return (t.square() + sigma_d ** 2) / (t * sigma_d).square()
    return torch.ones_like(t)


def ect_loss(net, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, r: torch.Tensor, sigma_d: float,
             labels: torch.Tensor | None = None, *, metric: str = "pseudo_huber", huber_c: float | None = 0.0,
             weighting: str = "inv_dt"):
    """Per-sample ECT loss for EDM noise levels `t > r >= 0` (B,) and unit noise `eps` shared by both
    points: `d(f_theta(x_t, t), sg f_theta(x_r, r)) w(t, r)`, the network read as TrigFlow."""
    tt, rr = torch.atan(t / sigma_d), torch.atan(r / sigma_d)
    z = sigma_d * eps
    x_t, x_r = trigflow_noise(x0, z, tt), trigflow_noise(x0, z, rr)
    with same_random_draws(x_t):  # the target pass below draws the same dropout masks
        pred = trigflow_consistency(net, x_t, tt, sigma_d, labels)
    # Always evaluated (even when every r = 0): every process runs the same forward passes (FSDP).
    with torch.no_grad():
        target = trigflow_consistency(net, x_r, rr, sigma_d, labels)
    target = torch.where(expand_to(r > 0, x0), target, x0)  # f(x, 0) = x, whatever the network gives at 0
    dist = cm_distance(pred, target.to(pred.dtype), metric, huber_c)
    loss = dist * ect_weight(t, r, weighting, sigma_d).to(dist.dtype)
    return loss, {"distance": dist.detach().mean(), "r_zero": (r == 0).float().mean()}


@register_method("ect")
@dataclass
class ECT(Method):
    """Easy Consistency Tuning (module docstring): `--teacher RUN` starts from a diffusion model;
    `method.from_teacher=false` trains from random weights (or from `train.init_from`)."""

    sigma_d: float = SIGMA_D
    p_mean: float = -1.1  # log-normal noise levels t (EDM sigma), ECT's (= iCT's)
    p_std: float = 2.0
    q: float = 2.0  # dt shrinks by q per stage
    k: float = 8.0  # n(t) = 1 + k sigmoid(-b t)
    b: float = 1.0
    mapping: str = "sigmoid"  # 'sigmoid' (n(t) above) or 'const' (n = 1)
    stages: int = 8  # stages over the run (ECT CIFAR-10: 8); 1 with q = 256: ECT's 1-hour recipe
    total_steps: int = 0  # the run length the stages are laid out over (0: the run's train.steps)
    metric: str = "pseudo_huber"  # sqrt(||.||^2 + c^2) - c (ECT), or 'l2' (mean squared error), 'l1'
    huber_c: float | None = 0.0  # c of the pseudo-Huber metric (ECT: 0, the L2 norm); None: iCT's 0.00054 sqrt(D)
    weighting: str = "inv_dt"  # 1 / (t - r) (ECT), 'edm' (ECT's later code), 'none'
    from_teacher: bool = True  # start from --teacher's weights; false: from random weights or train.init_from
    sigma_max: float = 80.0  # sampling starts at this EDM noise level (ECT's), TrigFlow time `t_max`

    def __post_init__(self):
        check_range("method.sigma_d", self.sigma_d, 0, low_open=True)
        check_range("method.p_std", self.p_std, 0, low_open=True)
        check_range("method.q", self.q, 1, low_open=True)
        check_range("method.k", self.k, 0)
        check_range("method.stages", self.stages, 1)
        check_range("method.sigma_max", self.sigma_max, 0, low_open=True)
        check_range("method.total_steps", self.total_steps, 0)
        check_choice("method.mapping", self.mapping, MAPPINGS)
        check_choice("method.metric", self.metric, ECT_METRICS)
        check_choice("method.weighting", self.weighting, WEIGHTINGS)
        if self.huber_c is not None:
            check_range("method.huber_c", self.huber_c, 0)

    def sampler(self, net, step=None):
        """Multistep consistency sampling in TrigFlow, from ECT's own starting time (`t_max`)."""
        from fewstep.core.samplers import TrigFlowConsistencySampler

        return TrigFlowConsistencySampler(net, self.sigma_d, guidance_input=network_info(net).guidance_input,
                                          t_max=self.t_max)

    @property
    def takes_teacher(self) -> bool:  # a diffusion model's weights start the run
        return self.from_teacher

    def set_teacher(self, net, formulation: str = "trigflow") -> None:
        """Nothing to keep: the teacher only initializes the student (`fewstep.training.build`)."""
        check_choice("teacher formulation", formulation, ("trigflow", "edm"))

    def setup(self, net, total_steps: int) -> None:
        if self.total_steps == 0:
            self.total_steps = total_steps  # the stages are laid out over the whole run

    @property
    def t_max(self) -> float:
        """The TrigFlow time sampling starts at: ECT's sigma_max, `arctan(sigma_max / sigma_d)`."""
        return math.atan(self.sigma_max / self.sigma_d)

    def stage(self, step: int) -> int:
        return ect_stage(step, self.total_steps, self.stages)

    def draw(self, n: int, step: int, like: torch.Tensor):
        """EDM noise levels `(t, r)` for a batch like `like` at `step`."""
        t = (torch.randn(n, device=like.device, dtype=time_dtype(like)) * self.p_std + self.p_mean).exp()
        return t, ect_mapping(t, self.stage(step), self.q, self.k, self.b, self.mapping)

    def __call__(self, net, x0: torch.Tensor, labels: torch.Tensor | None = None, step: int = 0):
        t, r = self.draw(x0.shape[0], step, x0)
        loss, stats = ect_loss(net, x0, torch.randn_like(x0), t, r, self.sigma_d, labels, metric=self.metric,
                               huber_c=self.huber_c, weighting=self.weighting)
        stats["stage"] = torch.tensor(float(self.stage(step)))
        return loss, stats


__all__ = ["ECT", "ect_loss", "ect_mapping", "ect_stage", "ect_weight"]
