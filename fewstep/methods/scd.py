"""Continuous-time consistency distillation (sCD), docs/math.md#sct-and-scd.

Same as sCT (`scm_loss`: tangent normalization, adaptive weighting, log-normal proposal)
except that the ODE direction is the teacher's velocity `dx_t/dt = v_teacher(x_t, t)`
(classifier-free guided when `guidance != 1`), and the paper's defaults differ:
P_mean = -0.8, P_std = 1.6, tangent warmup over 10k iterations. The student should start
from the teacher's weights (diffusion fine-tuning, docs/math.md#stabilizers); that is the caller's job.

    teacher = make_teacher_velocity(teacher_net, "edm", sigma_d=0.5)
    method = SCD(teacher=teacher, guidance=2.0)
    loss, stats = method(student, x0, labels, step)

Text-to-image (a teacher with `text_input`, prompts from a prompt dataset): `set_prompts(table)`
gives the encoded prompts (`fewstep.data.prompts.PromptTable`); labels are then prompt indices, the
network gets the contract's `text` / `text_mask`, and the teacher is guided against the empty
prompt, `v_u + w (v_c - v_u)` (docs/math.md#text-guidance).

With `guidance_range=[w_min, w_max]` each sample draws its own scale, the teacher is guided
with it and the student (a network with `guidance_input`) takes it as an input, so that one
student samples at any scale in the range (`fewstep sample --guidance W`).
"""

from __future__ import annotations

import math

from dataclasses import InitVar, dataclass
from typing import Callable

import torch

from fewstep.core.edm import edm_to_trigflow
from fewstep.methods.base import Method, register_method
from fewstep.methods.common import check_choice, check_range
from fewstep.jvp import JVP_MODES
from fewstep.methods.scm import TANGENT_NORMS, scm_loss, tangent_warmup
from fewstep.core.ode import edm_net_denoiser, guided, guided_text, trigflow_net_velocity
from fewstep.core.trigflow import SIGMA_D, lognormal_times, time_dtype, trigflow_noise
from fewstep.networks.contract import network_info

FORMULATIONS = ("trigflow", "edm")


def make_teacher_velocity(net, formulation: str = "trigflow", sigma_d: float = SIGMA_D,
                          guidance: float = 1.0, null_label: int | None = None) -> Callable:
    """A frozen teacher as a TrigFlow velocity `v(x_t, t, labels)` (no gradients).

    `formulation='trigflow'`: `net` is a velocity network, `v = sigma_d F(x_t / sigma_d, t)`.
    `formulation='edm'`: `net` is an EDM-preconditioned denoiser network (sigma_data =
    sigma_d), converted by docs/math.md#edm-to-trigflow, `v = (cos t x_t - D(x_t / cos t, sigma_d tan t)) / sin t`.
    With `guidance != 1` the velocity is classifier-free guided (pass the guidance either
    here or to `SCD`, not both). `null_label` defaults to `net.num_classes`. Puts `net` in
    eval mode (no dropout in the teacher).
    """
    check_choice("formulation", formulation, FORMULATIONS)
    if hasattr(net, "eval"):
        net.eval()
    if formulation == "trigflow":
        model = trigflow_net_velocity(net, sigma_d)
    else:
        model = edm_to_trigflow(edm_net_denoiser(net, sigma_d), sigma_d)
    if null_label is None:
        null_label = network_info(net).num_classes or None  # batch cond + null in one call

    @torch.no_grad()
    def teacher_velocity(x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None,
                         **cond) -> torch.Tensor:
        if cond:  # text cond: the caller guides against the empty prompt (`fewstep.core.ode.guided_text`)
            return model(x_t, t, labels, **cond)
        return guided(model, labels, guidance, null_label)(x_t, t)

    return teacher_velocity


@register_method("scd")
@dataclass
class SCD(Method):
    """sCD. `teacher`: a callable `v(x_t, t, labels) -> dx_t/dt` in TrigFlow units (see
    `make_teacher_velocity`); given at construction, not part of the config."""

    teacher: InitVar[Callable | None] = None
    sigma_d: float = SIGMA_D
    p_mean: float = -0.8
    p_std: float = 1.6
    guidance: float = 1.0  # CFG scale of the teacher's velocity (1: conditional, no guidance)
    # [w_min, w_max]: draw the CFG scale per sample, uniform in this range, and give it to the student
    # as an input (its network needs `network.guidance_input`); one student then samples at any w in it.
    guidance_range: list[float] | None = None
    tangent_norm: str = "l2"  # 'l2' (paper), 'rms', 'clip' or 'none'
    norm_const: float = 0.1
    warmup_steps: int = 10000  # tangent warmup (paper: 10k)
    adaptive_weight: bool = True
    # Sampling starts at t_max = arctan(sigma_max / sigma_d) (the sCM paper: sigma_max = 80); None: t = pi/2.
    sigma_max: float | None = None
    jvp_mode: str = "traced"  # as in SCT

    takes_teacher = True

    def sampler(self, net, step=None):
        """Multistep consistency sampling in TrigFlow."""
        from fewstep.core.samplers import TrigFlowConsistencySampler

        t_max = math.pi / 2 if self.sigma_max is None else math.atan(self.sigma_max / self.sigma_d)
        return TrigFlowConsistencySampler(net, self.sigma_d, guidance_input=network_info(net).guidance_input,
                                          t_max=t_max)

    def set_teacher(self, net, formulation: str = "trigflow") -> None:
        """The teacher's velocity, from a frozen TrigFlow or EDM diffusion network."""
        self.teacher = make_teacher_velocity(net.requires_grad_(False), formulation, self.sigma_d)

    def set_prompts(self, table) -> None:
        """The run's encoded prompts (a `PromptTable`): labels become prompt indices."""
        self.prompts = table

    def __post_init__(self, teacher):
        self.teacher = teacher
        self.prompts = None  # set_prompts: a text-to-image run's encoded prompts
        check_range("method.sigma_d", self.sigma_d, 0, low_open=True)
        if self.sigma_max is not None:
            check_range("method.sigma_max", self.sigma_max, 0, low_open=True)
        check_range("method.p_std", self.p_std, 0, low_open=True)
        check_range("method.guidance", self.guidance, 0)
        if self.guidance_range is not None:
            lo_hi = self.guidance_range
            if len(lo_hi) != 2 or not 0 <= lo_hi[0] <= lo_hi[1]:
                raise ValueError(f"method.guidance_range must be [w_min, w_max] with 0 <= w_min <= w_max, "
                                 f"got {lo_hi}")
            if self.guidance != 1.0:
                raise ValueError("give method.guidance (one fixed scale) or method.guidance_range "
                                 "(a scale per sample, as a student input), not both")
        check_range("method.norm_const", self.norm_const, 0)
        check_range("method.warmup_steps", self.warmup_steps, 0)
        check_choice("method.tangent_norm", self.tangent_norm, TANGENT_NORMS)
        check_choice("method.jvp_mode", self.jvp_mode, JVP_MODES)

    def teacher_velocity(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None,
                         guidance=None):
        """The (guided) teacher velocity `dx_t/dt`, without gradients; `guidance` (a float or a
        per-sample tensor) overrides `self.guidance`."""
        if self.teacher is None:
            raise ValueError("sCD needs a teacher: SCD(teacher=make_teacher_velocity(net, ...), ...)")
        with torch.no_grad():
            return guided(self.teacher, labels, self.guidance if guidance is None else guidance)(x_t, t)

    def draw_guidance(self, n: int, device) -> torch.Tensor | None:
        """Per-sample CFG scales, uniform in `guidance_range` (None without a range)."""
        if self.guidance_range is None:
            return None
        lo, hi = self.guidance_range
        return lo + (hi - lo) * torch.rand(n, device=device)

    def text_teacher_velocity(self, x_t, t, cond: dict, guidance=None):
        """The teacher velocity under text cond, guided against the empty prompt (no gradients)."""
        if self.teacher is None:
            raise ValueError("sCD needs a teacher: SCD(teacher=make_teacher_velocity(net, ...), ...)")
        null = self.prompts.null_cond(x_t.shape[0], x_t.device, cond["text"].dtype)
        with torch.no_grad():
            return guided_text(self.teacher, cond, null, self.guidance if guidance is None else guidance)(x_t, t)

    def _text_loss(self, net, x0, labels, step):
        if labels is None:
            raise ValueError("a text-to-image sCD run needs prompt indices as labels (a prompt dataset)")
        if self.guidance_range is not None:
            raise ValueError("method.guidance_range needs a student with a guidance input; a text-to-image "
                             "student distils one fixed scale: set method.guidance")
        cond = self.prompts.cond(labels)
        t = lognormal_times(x0.shape[0], self.p_mean, self.p_std, self.sigma_d, device=x0.device,
                            dtype=time_dtype(x0))
        x_t = trigflow_noise(x0, torch.randn_like(x0) * self.sigma_d, t)
        dxdt = self.text_teacher_velocity(x_t, t, cond).to(x0.dtype)
        return scm_loss(net, x_t, t, dxdt, self.sigma_d, None, r=tangent_warmup(step, self.warmup_steps),
                        tangent_norm=self.tangent_norm, norm_const=self.norm_const,
                        adaptive_weight=self.adaptive_weight, jvp_mode=self.jvp_mode, cond=cond)

    def __call__(self, net, x0: torch.Tensor, labels: torch.Tensor | None = None, step: int = 0):
        if self.prompts is not None:
            return self._text_loss(net, x0, labels, step)
        w = self.draw_guidance(x0.shape[0], x0.device)
        if w is None and labels is not None and network_info(net).guidance_input:
            w = torch.full((x0.shape[0],), float(self.guidance), device=x0.device)  # one fixed scale, as input
        if w is not None and (labels is None or not network_info(net).guidance_input):
            raise ValueError("method.guidance_range needs class labels and a student that takes the guidance "
                             "scale: set network.class_conditional=true and network.guidance_input=true")
        t = lognormal_times(x0.shape[0], self.p_mean, self.p_std, self.sigma_d, device=x0.device,
                           dtype=time_dtype(x0))
        z = torch.randn_like(x0) * self.sigma_d
        x_t = trigflow_noise(x0, z, t)
        dxdt = self.teacher_velocity(x_t, t, labels, w).to(x0.dtype)
        return scm_loss(net, x_t, t, dxdt, self.sigma_d, labels, r=tangent_warmup(step, self.warmup_steps),
                        tangent_norm=self.tangent_norm, norm_const=self.norm_const,
                        adaptive_weight=self.adaptive_weight, jvp_mode=self.jvp_mode,
                        guidance=None if w is None else w.to(x0.dtype))
