"""Progressive distillation (docs/math.md#progressive-distillation): the TrigFlow DDIM step, the distillation target, the round
schedule, and one round on Gaussian data against the exact teacher."""

import json
import math

import pytest
import torch

from fewstep.methods import ProgressiveDistillation
from fewstep.methods.pd import ddim_step, pd_num_rounds, pd_student_steps
from fewstep.networks import MLP
from fewstep.core.ode import TrigFlowODE, sample_ddim, trigflow_net_velocity
from helpers import MU, S, SD, f_star, v_star


class ExactVelocityNet(torch.nn.Module):
    """`F` with `sigma_d F(x / sigma_d, t) = v*` (Gaussian data N(MU, S^2 I))."""

    num_classes = 0

    def forward(self, y, t, labels=None):
        return v_star(SD * y, t) / SD


def test_ddim_step_is_exact_for_a_straight_trigflow_path():
    """For data that is a single point x0 (S = 0) the DDIM step of the exact velocity lands exactly
    on the trajectory, whatever the step: x_s = cos s x0 + sin s z."""
    x0 = MU.expand(5, -1)
    z = SD * torch.randn(5, 4, dtype=torch.float64)
    t, s = torch.full((5,), 1.3, dtype=torch.float64), torch.full((5,), 0.4, dtype=torch.float64)
    x_t = torch.cos(t)[:, None] * x0 + torch.sin(t)[:, None] * z
    v = v_star(x_t, t, s=0.0)
    torch.testing.assert_close(ddim_step(x_t, t, s, v), torch.cos(s)[:, None] * x0 + torch.sin(s)[:, None] * z)


def test_round_schedule():
    assert pd_num_rounds(64, 1) == 6 and pd_num_rounds(16, 2) == 3
    steps = [pd_student_steps(k, 16, 2, 600) for k in (0, 199, 200, 399, 400, 599, 10_000)]
    assert steps == [8, 8, 4, 4, 2, 2, 2]
    with pytest.raises(ValueError, match="power of 2"):
        ProgressiveDistillation(start_steps=12)


def test_teacher_swaps_at_the_first_step_of_a_round_and_is_checkpointed():
    """The swap happens when a new round's first step runs, even if the step before was skipped;
    the sampling EMA is told to restart; the teacher and its round survive a checkpoint."""
    torch.manual_seed(0)
    student = MLP(4, 16, 1).double()
    pd = ProgressiveDistillation(MLP(4, 16, 1).double(), sigma_d=SD, start_steps=8, min_steps=2, total_steps=4)
    x0 = MU + S * torch.randn(16, 4, dtype=torch.float64)
    pd(student, x0, step=0)
    assert pd.round_steps == 4 and not pd.restart_ema
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.1)  # "training"; step 1 is skipped (non-finite), so nothing is called for it
    pd(student, x0, step=2)  # round 2 (2 steps) begins
    assert pd.round_steps == 2 and pd.restart_ema
    for a, b in zip(pd.teacher_net.parameters(), student.parameters()):
        torch.testing.assert_close(a, b)
    saved = pd.state_tensors()
    fresh = ProgressiveDistillation(MLP(4, 16, 1).double(), sigma_d=SD, start_steps=8, min_steps=2, total_steps=4)
    fresh.load_state_tensors(student, {k: v.clone() for k, v in saved.items()})
    assert fresh.round_steps == 2
    for a, b in zip(fresh.teacher_net.parameters(), student.parameters()):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="power of 2"):
        ProgressiveDistillation(start_steps=64, min_steps=3)


def test_target_is_two_teacher_steps_in_one():
    """A student that outputs the target velocity reproduces, in one DDIM step, the teacher's two."""
    pd = ProgressiveDistillation(ExactVelocityNet(), sigma_d=SD, start_steps=8, min_steps=4, total_steps=10)
    x0 = MU + S * torch.randn(64, 4, dtype=torch.float64)
    captured = {}

    class Recorder(torch.nn.Module):
        def forward(self, y, t, labels=None):
            captured["x_t"], captured["t"] = SD * y, t
            return torch.zeros_like(y)

    torch.manual_seed(0)
    loss, stats = pd(Recorder(), x0)
    x_t, t = captured["x_t"], captured["t"]
    h = (math.pi / 2) / 4
    assert float(stats["student_steps"]) == 4 and torch.allclose((t / h).round() * h, t)
    mid = ddim_step(x_t, t, t - h / 2, v_star(x_t, t))
    end = ddim_step(mid, t - h / 2, t - h, v_star(mid, t - h / 2))
    v_target = (math.cos(h) * x_t - end) / math.sin(h)
    torch.testing.assert_close(ddim_step(x_t, t, t - h, v_target), end)
    torch.testing.assert_close(loss, v_target.square().mean(1))  # the zero student's loss is |v*|^2


@pytest.mark.slow
def test_one_round_halves_the_steps_on_gaussian_data():
    """Round 0 from the exact teacher (8 DDIM steps) to a 4-step MLP student, 600 steps: the
    student's 4-step DDIM samples are closer to the teacher's 8-step ones than the teacher's own
    4-step samples are. Measured RMS distance to the teacher at 8 steps: teacher at 4 steps 0.0358,
    student at 4 steps 0.0036 (the teacher at 8 steps is 0.0412 from the exact ODE endpoint: the
    student learns the teacher's 8-step DDIM map, not the exact ODE)."""
    torch.manual_seed(0)
    student = MLP(4, 64, 2)
    pd = ProgressiveDistillation(ExactVelocityNet(), sigma_d=SD, start_steps=8, min_steps=4, total_steps=600)
    opt = torch.optim.Adam(student.parameters(), lr=2e-3)
    for step in range(600):
        x0 = (MU + S * torch.randn(256, 4, dtype=torch.float64)).float()
        loss, _ = pd(student, x0)
        opt.param_groups[0]["lr"] = 2e-3 * (1 - step / 600)
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
    x_T = SD * torch.randn(4000, 4, dtype=torch.float64)
    teacher = TrigFlowODE(lambda x, t: v_star(x, t), SD)
    uniform = [torch.linspace(math.pi / 2, 0, n + 1, dtype=torch.float64) for n in (4, 8)]
    t4, _ = sample_ddim(teacher, x_T, uniform[0])
    t8, _ = sample_ddim(teacher, x_T, uniform[1])
    with torch.no_grad():
        s4, nfe = sample_ddim(TrigFlowODE(trigflow_net_velocity(student, SD), SD), x_T.float(), uniform[0].float())
    exact = f_star(x_T, math.pi / 2)

    def rms(a, b):
        return (a.double() - b).square().mean().sqrt().item()

    print(f"vs teacher 8 steps: teacher 4 steps {rms(t4, t8):.4f}, student 4 steps {rms(s4, t8):.4f}; "
          f"teacher 8 steps vs exact {rms(t8, exact):.4f}")
    assert nfe == 4 and rms(s4, t8) < rms(t4, t8) / 2


def test_progressive_distillation_via_cli(tmp_path, capsys):
    """`--method pd --teacher FLOW`: rounds halve the steps (16 -> 8, 4, 2 over 6 steps), the
    current teacher is checkpointed, and sampling defaults to DDIM at the student's step count."""
    from fewstep.training import checkpoint as ckpt
    from fewstep.cli import main

    common = ["--preset", "8gaussians", "--batch-size", "32", "--no-progress", "--set", "network.width=32",
              "--set", "network.depth=1", "--set", "train.sample_every=0"]
    teacher, student = tmp_path / "teacher", tmp_path / "pd"
    assert main(["train", *common, "--method", "flow", "--steps", "3", "--out", str(teacher)]) == 0
    assert main(["train", *common, "--method", "pd", "--teacher", str(teacher), "--steps", "6",
                 "--set", "method.start_steps=16", "--set", "method.min_steps=2", "--set", "train.log_every=1",
                 "--out", str(student)]) == 0
    tensors, _ = ckpt.load_checkpoint(student)
    assert any(k.startswith("target.") for k in tensors)
    steps = [json.loads(line)["student_steps"] for line in (student / "log.jsonl").read_text().splitlines()]
    assert steps == [8, 8, 4, 4, 2, 2]
    capsys.readouterr()
    assert main(["sample", str(student), "--num", "8", "--out", str(tmp_path / "s.png")]) == 0
    assert "NFE 2" in capsys.readouterr().out
