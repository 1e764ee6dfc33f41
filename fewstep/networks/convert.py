"""A student from a diffusion teacher's weights (diffusion fine-tuning, docs/math.md#stabilizers).

A TrigFlow ('flow') teacher's network is the student's network: its weights are copied as they
are. An EDM teacher's network fits too, after two changes. With `sigma = sigma_d tan(t)` and
`x_sigma = x_t / cos(t)`, EDM's preconditioning gives `c_skip x_sigma = cos(t) x_t`,
`c_out = sigma_d sin(t)` and `c_in x_sigma = x_t / sigma_d`, so

    D(x_sigma, sigma) = cos(t) x_t + sigma_d sin(t) F_edm(x_t / sigma_d, c_noise(sigma))
    TrigFlow:  x0-estimate = cos(t) x_t - sigma_d sin(t) F_trig(x_t / sigma_d, t)

and the two agree when `F_trig(x, t) = -F_edm(x, ln(sigma_d tan t) / 4)`: the same input, the
output negated, and a different time input. The student may not take EDM's log time input
(docs/math.md#the-network-contract: `sin(t) d c_noise/dt` is unbounded at pi/2), so instead its time-embedding MLP is
fitted so that `emb_student(t) = emb_teacher(ln(sigma_d tan t) / 4)`, with the teacher's
noise levels clamped to the range it was trained on (EDM's [0.002, 80]).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fewstep.core.edm import EPS, T_MAX
from fewstep.core.trigflow import SIGMA_D

# Keys a student may have that its teacher lacks: the guidance-scale embedding (zero-initialized).
# the last two: paper networks, and a diffusers student's adaptive-weight head
STUDENT_ONLY_PREFIXES = ("time_emb.guidance.", "time_emb.interval.", "guidance_emb.", "weight_head.")


def output_layer(net: nn.Module) -> nn.Module:
    """The last linear map of a fewstep network (UNet `conv_out`, MLP `linear_out`)."""
    for name in ("conv_out", "linear_out"):
        if hasattr(net, name):
            return getattr(net, name)
    raise TypeError(f"{type(net).__name__} has no conv_out/linear_out output layer")


def copy_teacher_weights(student: nn.Module, teacher: nn.Module, own: tuple[str, ...] = ()) -> None:
    """Load the teacher's weights into the student; the only keys allowed to differ are the
    student's own extra inputs (the guidance embedding), which keep their zero init, and the
    modules under the prefixes `own` that the student has in place of the teacher's (not copied)."""
    hint = "the student's network does not match the teacher's (the student takes the teacher's network config)"
    state = {k: v for k, v in teacher.state_dict().items() if not k.startswith(own)} if own else teacher.state_dict()
    try:
        missing, unexpected = student.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"{hint}: {str(e).splitlines()[1].strip()}") from None
    missing = [k for k in missing if not k.startswith(STUDENT_ONLY_PREFIXES + own)]
    if missing or unexpected:
        raise ValueError(f"{hint}: missing {missing[:5]}, unexpected {unexpected[:5]}")


def edm_time_input(t: torch.Tensor, sigma_d: float, sigma_min: float = EPS, sigma_max: float = T_MAX) -> torch.Tensor:
    """The EDM network's time input at TrigFlow time t: `ln(clamp(sigma_d tan t)) / 4`."""
    sigma = (sigma_d * torch.tan(t.clamp(max=math.pi / 2 - 1e-6))).clamp(sigma_min, sigma_max)
    return sigma.log() / 4


def fit_time_embedding(student_emb: nn.Module, teacher_emb: nn.Module, teacher_time, t: torch.Tensor,
                       steps: int = 2000, lr: float = 3e-3) -> float:
    """Fit `student_emb.mlp(pos(t))` to `teacher_emb.mlp(pos(teacher_time(t)))` on the grid `t`.

    Both are `fewstep.networks.layers.Conditioning`s; only the student's MLP changes (class
    and guidance embeddings are added after it). Full-batch Adam with cosine decay. Returns
    the final relative RMS error of the fit.
    """
    p = next(student_emb.parameters())
    t = t.to(p.device, p.dtype)
    with torch.no_grad():
        target = teacher_emb.mlp(teacher_emb.pos(teacher_time(t)))
    scale = target.square().mean().sqrt().clamp_min(1e-12)
    params = list(student_emb.mlp.parameters())
    optimizer = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    with torch.enable_grad():
        for _ in range(steps):
            loss = (student_emb.mlp(student_emb.pos(t)) - target).square().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sched.step()
    with torch.no_grad():
        err = (student_emb.mlp(student_emb.pos(t)) - target).square().mean().sqrt() / scale
    return float(err)


def student_from_teacher(student: nn.Module, teacher: nn.Module, formulation: str, sigma_d: float = SIGMA_D,
                         fit_steps: int = 2000, student_formulation: str = "trigflow") -> dict:
    """Initialize a student from a teacher network of the same architecture.

    Formulations: 'trigflow' (time input t) or 'edm' (time input `ln(sigma) / 4`; the discrete-time
    consistency models use it too). The same formulation: a plain copy (the student is exactly the
    teacher). Across formulations: copy, negate the output layer and fit the student's time
    embedding to the teacher's at the matching time (module docstring). Returns what was done,
    e.g. `{"time_embedding_fit_error": 0.01}`.
    """
    for name, value in (("formulation", formulation), ("student_formulation", student_formulation)):
        if value not in ("trigflow", "edm"):
            raise ValueError(f"{name} must be 'trigflow' or 'edm', got {value!r}")
    copy_teacher_weights(student, teacher)
    if formulation == student_formulation:
        return {}
    with torch.no_grad():
        out = output_layer(student)
        out.weight.neg_()
        out.bias.neg_()
    u = torch.linspace(0, 1, 512, dtype=torch.float64)
    log_sigma = math.log(EPS) + u * (math.log(T_MAX) - math.log(EPS))
    if student_formulation == "trigflow":
        # The fit grid: uniform in t, and uniform in the teacher's log noise level (dense near both ends).
        grid = torch.cat([u * (math.pi / 2), torch.atan(log_sigma.exp() / sigma_d)])
        teacher_time = lambda t: edm_time_input(t, sigma_d)  # noqa: E731
    else:  # a discrete-time student reads c = ln(sigma) / 4 for sigma in [eps, T]; the teacher t = arctan(sigma / sigma_d)
        grid = log_sigma / 4
        teacher_time = lambda c: torch.atan(torch.exp(4 * c) / sigma_d)  # noqa: E731
    err = fit_time_embedding(student.time_emb, teacher.time_emb, teacher_time, grid, steps=fit_steps)
    return {"time_embedding_fit_error": err}


def match_teacher(student: nn.Module, teacher_velocity, sample_x0, sigma_d: float, steps: int, lr: float = 2e-4,
                  seed: int = 0, gain=None, cond=None) -> dict:
    """The conversion stage (docs/math.md#students-of-diffusers-teachers): regress the student's TrigFlow
    velocity onto the teacher's, `E || F_student(x_t / sigma_d, t) - v_teacher(x_t, t) / sigma_d ||^2 / gain(t)^2`
    with t uniform in [0, pi/2] (the one-step sampler starts at pi/2), by Adam for `steps` steps. `gain(t)`:
    the teacher's |dF / d(its output)|, so that the error counts in the units the teacher was trained in
    (an epsilon teacher's velocity near pi/2 carries its noise-estimate error times ~300; default 1).

    For a student that reads the teacher's model in another parameterization (`network.prediction`): its
    weights are the teacher's, its velocity is not yet. `teacher_velocity(x_t, t, labels)`, `sample_x0()`
    -> (x0, labels). `cond(labels)`: the student's keyword conditioning for those labels (text-to-image:
    prompt indices -> `text`, `text_mask`; the student then gets no labels). TrigFlow students only (the caller checks). Returns the relative (weighted) RMS velocity error before and after; 0 at an exact start."""
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)

    def batch():
        x0, labels = sample_x0()
        t = torch.rand(x0.shape[0], generator=gen, dtype=torch.float64).to(x0.device, x0.dtype) * (math.pi / 2)
        z = torch.randn(x0.shape, generator=gen).to(x0) * sigma_d
        shape = (-1,) + (1,) * (x0.ndim - 1)
        x_t = torch.cos(t).view(shape) * x0 + torch.sin(t).view(shape) * z
        with torch.no_grad():
            target = teacher_velocity(x_t, t, labels) / sigma_d
        w = 1.0 if gain is None else (1 / gain(t)).view(shape)
        return x_t / sigma_d, t, labels, target, w

    def velocity(x, t, labels):
        return student(x, t, labels) if cond is None else student(x, t, None, **cond(labels))

    def error() -> float:
        with torch.no_grad():
            x, t, labels, target, w = batch()
            diff = w * (velocity(x, t, labels) - target)
            return float(diff.square().mean().sqrt() / (w * target).square().mean().sqrt().clamp_min(1e-12))

    before = error()
    if before == 0.0:  # an exact start: nothing to convert
        return {"convert_error_before": 0.0, "convert_error_after": 0.0}
    with torch.enable_grad():
        for _ in range(steps):
            x, t, labels, target, w = batch()
            loss = (w * (velocity(x, t, labels) - target)).square().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return {"convert_error_before": before, "convert_error_after": error()}
