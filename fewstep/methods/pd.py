"""Progressive distillation (Salimans & Ho 2022), docs/math.md#progressive-distillation: the baseline consistency models are
compared with. In TrigFlow, with a uniform time grid (TrigFlow's t is the angle of the cosine
schedule, so a uniform grid in t is the original's uniform grid in continuous time):

- a round's student takes N DDIM steps of size `h = (pi/2) / N`; its teacher (the diffusion
  model in round 0, the previous student after that) takes 2N;
- for `t = i h`, `x_t = cos(t) x0 + sin(t) z`: two teacher DDIM steps `t -> t - h/2 -> t - h`
  give `x_{t-h}`; the one-step DDIM `x_{t-h} = cos(h) x_t - sin(h) v` of the student must land
  there, so its target velocity is `v* = (cos(h) x_t - x_{t-h}) / sin(h)`;
- loss `|| sigma_d F_theta(x_t / sigma_d, t) - v* ||^2` (mean over dims); after each round the
  student becomes the teacher and N halves, down to `min_steps` (`start_steps / min_steps` must
  be a power of 2, so that each student's half-steps land on its teacher's grid).

The DDIM step in TrigFlow is exact for a constant velocity: `x_s = cos(t - s) x_t - sin(t - s) v(x_t, t)`.
The teacher is swapped at the first step of a new round (whatever happened to the step before),
and the training loop restarts its sampling EMA there (`restart_ema`), so that the EMA never mixes
students of different step counts. `state_tensors()` (the current teacher and the step count it
serves) goes into checkpoints.
"""

from __future__ import annotations

import copy
import math
from dataclasses import InitVar, dataclass, field

import torch

from fewstep.methods.base import Method, register_method
from fewstep.methods.common import check_range, per_sample_mse
from fewstep.core.trigflow import SIGMA_D, expand_to, net_velocity, time_dtype, trigflow_noise
from fewstep.networks.contract import network_info


def ddim_step(x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """TrigFlow DDIM from t to s with velocity v at (x_t, t): `cos(t - s) x_t - sin(t - s) v`."""
    d = expand_to(t - s, x_t)
    return torch.cos(d) * x_t - torch.sin(d) * v


def pd_student_steps(step: int, start_steps: int, min_steps: int, total_steps: int) -> int:
    """The student's DDIM step count during optimizer step `step`: start_steps / 2, then halving
    each round; rounds split `total_steps` evenly."""
    rounds = pd_num_rounds(start_steps, min_steps)
    per_round = max(1, total_steps // rounds)
    return max(min_steps, start_steps // 2 ** (min(step // per_round, rounds - 1) + 1))


def pd_num_rounds(start_steps: int, min_steps: int) -> int:
    return max(1, int(round(math.log2(start_steps / min_steps))))


@register_method("pd")
@dataclass
class ProgressiveDistillation(Method):
    """`teacher`: the diffusion teacher's velocity network `F` (TrigFlow), frozen; a copy of it
    is kept and replaced by the student at each round's end."""

    teacher: InitVar[torch.nn.Module | None] = None
    sigma_d: float = SIGMA_D
    start_steps: int = 64  # the round-0 teacher's DDIM steps; the student of round 0 takes half
    min_steps: int = 1  # the last round's student steps
    total_steps: int = 0  # the run length the rounds split (0: the run's train.steps)
    teacher_net: torch.nn.Module | None = field(default=None, init=False, repr=False)
    round_steps: int | None = field(default=None, init=False, repr=False)  # the student steps the teacher serves
    restart_ema: bool = field(default=False, init=False, repr=False)  # set when a round begins

    def __post_init__(self, teacher):
        check_range("method.sigma_d", self.sigma_d, 0, low_open=True)
        check_range("method.min_steps", self.min_steps, 1)
        check_range("method.total_steps", self.total_steps, 0)
        ratio = self.start_steps // self.min_steps
        if self.start_steps % self.min_steps or ratio < 2 or ratio & (ratio - 1):
            raise ValueError(f"method.start_steps / method.min_steps must be a power of 2 (>= 2), got "
                             f"{self.start_steps} / {self.min_steps}")
        if teacher is not None:
            self.set_teacher(teacher)

    takes_teacher = True

    def set_teacher(self, net: torch.nn.Module, formulation: str = "trigflow") -> None:
        """The teacher network itself (a copy): students replace it round by round."""
        if formulation != "trigflow":
            raise ValueError("progressive distillation distils a TrigFlow ('flow') teacher, "
                             f"not an {formulation!r} model")
        self.teacher_net = copy.deepcopy(net).eval().requires_grad_(False)

    def setup(self, net, total_steps: int) -> None:
        if self.total_steps == 0:
            self.total_steps = total_steps  # the rounds split the whole run

    def after_step(self, net, step: int) -> bool:
        """A round that began at this step restarts the sampling EMA: it never mixes students
        of different step counts."""
        restart, self.restart_ema = self.restart_ema, False
        return restart

    def sampler(self, net, step: int | None = None):
        """DDIM on the uniform grid in t the student was distilled on, with the steps of the student
        saved after `step` optimizer steps (default: the run's end)."""
        from fewstep.core.ode import ODESampler

        step = self.total_steps if step is None else step
        steps = pd_student_steps(max(step - 1, 0), self.start_steps, self.min_steps, max(self.total_steps, 1))
        return ODESampler(net, self.sigma_d, num_classes=network_info(net).num_classes, solver="ddim", steps=steps,
                          grid="uniform")

    def student_steps(self, step: int) -> int:
        return pd_student_steps(step, self.start_steps, self.min_steps, self.total_steps)

    def _teacher_velocity(self, x_t, t, labels):
        if self.teacher_net is None:
            raise ValueError("progressive distillation needs a teacher: --teacher CKPT (a 'flow' model)")
        return net_velocity(self.teacher_net, x_t, t, self.sigma_d, labels)

    @torch.no_grad()
    def _begin_round(self, net, n_steps: int) -> None:
        """A new round: the student so far becomes the teacher."""
        if self.round_steps is not None and n_steps != self.round_steps:
            self.teacher_net.load_state_dict(net.state_dict())
            self.restart_ema = True
        self.round_steps = n_steps

    def __call__(self, net, x0: torch.Tensor, labels: torch.Tensor | None = None, step: int = 0):
        n_steps = self.student_steps(step)
        self._begin_round(net, n_steps)
        h = (math.pi / 2) / n_steps
        i = torch.randint(1, n_steps + 1, (x0.shape[0],), device=x0.device)
        t = i.to(time_dtype(x0)) * h
        x_t = trigflow_noise(x0, self.sigma_d * torch.randn_like(x0), t)
        with torch.no_grad():
            t_mid, t_end = t - h / 2, t - h
            x_mid = ddim_step(x_t, t, t_mid, self._teacher_velocity(x_t, t, labels))
            x_end = ddim_step(x_mid, t_mid, t_end, self._teacher_velocity(x_mid, t_mid, labels))
            v_target = (math.cos(h) * x_t - x_end) / math.sin(h)
        v_pred = net_velocity(net, x_t, t, self.sigma_d, labels)
        mse = per_sample_mse(v_pred - v_target)
        return mse, {"mse": mse.detach().mean(), "student_steps": torch.tensor(float(n_steps))}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        if self.teacher_net is None:
            return {}
        out = dict(self.teacher_net.state_dict())
        if self.round_steps is not None:
            out["_round_steps"] = torch.tensor(self.round_steps)
        return out

    def extra_networks(self, net) -> dict[str, torch.nn.Module]:
        return {} if self.teacher_net is None else {"teacher": self.teacher_net}

    def load_state_tensors(self, net, tensors: dict[str, torch.Tensor]) -> None:
        tensors = dict(tensors)
        round_steps = tensors.pop("_round_steps", None)
        if tensors:
            if self.teacher_net is None:
                self.set_teacher(net)
            self.teacher_net.load_state_dict(tensors)
        self.round_steps = None if round_steps is None else int(round_steps)
