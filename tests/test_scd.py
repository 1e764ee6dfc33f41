"""Continuous-time consistency distillation (sCD): the tangent with the teacher's velocity, CFG,
and a short distillation of a toy teacher. Math checks in float64 against docs/math.md#gaussian-closed-forms."""

import copy
import math

import pytest
import torch

from fewstep.data import EightGaussians
from fewstep.core.edm import edm_precond, edm_to_trigflow
from fewstep.training.ema import EMA
from fewstep.methods import METHODS, SCD, FlowMatching, make_teacher_velocity
from fewstep.methods.scm import scm_jvp, scm_tangent
from fewstep.metrics.toy import sliced_wasserstein
from fewstep.networks import MLP
from fewstep.core.ode import TrigFlowODE, solve, trigflow_net_velocity
from fewstep.core.samplers import multistep_sample, trigflow_sampler_fn
from helpers import MU, S, SD, ConsistencyOracle, OracleEDMNet, d_star, f_star, per_sample, v_star


def _data(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return MU + S * torch.randn(n, 4, generator=g, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# The tangent


def test_tangent_vanishes_for_the_exact_consistency_function_and_teacher():
    """With dx_t/dt = v* (exact teacher) and F from f*, `g = cos t df/dt = 0` along the ODE."""
    x0 = _data(64)
    z = SD * torch.randn(64, 4, dtype=torch.float64)
    t = torch.linspace(0.01, math.pi / 2 - 0.01, 64, dtype=torch.float64)
    x_t = torch.cos(t)[:, None] * x0 + torch.sin(t)[:, None] * z
    net = ConsistencyOracle()
    for teacher in (v_star, edm_to_trigflow(d_star, SD), make_teacher_velocity(OracleEDMNet(), "edm", SD)):
        dxdt = teacher(x_t, t, None)
        F_minus, jvp_out = scm_jvp(net, x_t, t, dxdt, SD)
        g = scm_tangent(x_t, t, dxdt, F_minus, jvp_out, SD, r=1.0)
        assert g.abs().max() < 1e-9, g.abs().max()
    # Control: a teacher with the wrong mean leaves a tangent of order 1.
    dxdt = v_star(x_t, t, mu=MU + 0.2)
    g = scm_tangent(x_t, t, dxdt, *scm_jvp(net, x_t, t, dxdt, SD), SD)
    assert g.abs().max() > 1e-2


def test_scd_loss_is_zero_at_the_exact_solution():
    method = SCD(teacher=v_star, warmup_steps=0, adaptive_weight=False)
    loss, stats = method(ConsistencyOracle(), _data(), None, step=0)
    assert loss.shape == (256,) and loss.max() < 1e-18
    assert stats["tangent_norm"] < 1e-9
    # Same, with an EDM teacher converted to TrigFlow (docs/math.md#trigflow).
    loss, stats = SCD(teacher=make_teacher_velocity(OracleEDMNet(), "edm", SD), warmup_steps=0,
                      adaptive_weight=False)(ConsistencyOracle(), _data(), None, 0)
    assert loss.max() < 1e-18 and stats["tangent_norm"] < 1e-9


def test_tangent_warmup_is_wired():
    """r = step / warmup_steps: at step 0 only the `cos^2 t (sigma_d F - dx/dt)` term is left,
    which is nonzero for the exact f*; at the end of the warmup the tangent vanishes."""
    method = SCD(teacher=v_star, adaptive_weight=False)
    assert method.warmup_steps == 10_000
    assert method(ConsistencyOracle(), _data(), None, step=0)[1]["tangent_norm"] > 1e-2
    assert method(ConsistencyOracle(), _data(), None, step=10_000)[1]["tangent_norm"] < 1e-9


# ---------------------------------------------------------------------------------------------
# Teacher, guidance, config


def _label_teacher(x, t, labels=None):
    lab = torch.full((x.shape[0],), 7) if labels is None else labels
    return x * (lab.to(x.dtype)[:, None] + 1) - per_sample(t, x)


def test_guided_teacher_velocity():
    x, t = _data(8), torch.full((8,), 0.8, dtype=torch.float64)
    labels = torch.arange(8) % 3
    cond, uncond = _label_teacher(x, t, labels), _label_teacher(x, t, None)
    for w in (0.0, 1.0, 2.0, 4.5):
        v = SCD(teacher=_label_teacher, guidance=w).teacher_velocity(x, t, labels)
        torch.testing.assert_close(v, uncond + w * (cond - uncond), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(SCD(teacher=_label_teacher, guidance=3.0).teacher_velocity(x, t, None), uncond)


def test_make_teacher_velocity_from_networks():
    torch.manual_seed(0)
    net = MLP(4, 32, 2, num_classes=3).double()
    for p in net.time_emb.label.parameters():
        torch.nn.init.normal_(p)
    x, t, labels = _data(6), torch.linspace(0.2, 1.5, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    v = make_teacher_velocity(net, "trigflow", SD)
    torch.testing.assert_close(v(x, t, labels), SD * net(x / SD, t, labels))
    v_cond, v_uncond = v(x, t, labels), v(x, t, None)
    guided = make_teacher_velocity(net, "trigflow", SD, guidance=2.0)(x, t, labels)
    torch.testing.assert_close(guided, v_uncond + 2.0 * (v_cond - v_uncond), rtol=1e-12, atol=1e-12)
    assert not guided.requires_grad  # the teacher is frozen
    # EDM: the network is read as an EDM-preconditioned denoiser; `cos t x_t - sin t v` is D.
    v_edm = make_teacher_velocity(net, "edm", SD)(x, t, labels)
    c_skip, c_out, c_in, c_noise = edm_precond(SD * torch.tan(t), SD)
    x_sigma = x / torch.cos(t)[:, None]
    D = c_skip[:, None] * x_sigma + c_out[:, None] * net(c_in[:, None] * x_sigma, c_noise, labels)
    torch.testing.assert_close(torch.cos(t)[:, None] * x - torch.sin(t)[:, None] * v_edm, D)
    with pytest.raises(ValueError, match="formulation"):
        make_teacher_velocity(net, "ve")


def test_scd_config():
    method = METHODS["scd"]()
    assert (method.p_mean, method.p_std, method.warmup_steps, method.guidance) == (-0.8, 1.6, 10_000, 1.0)
    assert "teacher" not in {f.name for f in __import__("dataclasses").fields(method)}  # not config
    with pytest.raises(ValueError, match="make_teacher_velocity"):
        method(ConsistencyOracle(), _data(), None, 0)
    with pytest.raises(ValueError, match="method.guidance"):
        SCD(guidance=-1.0)
    with pytest.raises(ValueError, match="method.tangent_norm"):
        SCD(tangent_norm="max")
    with pytest.raises(ValueError, match="method.warmup_steps"):
        SCD(warmup_steps=-5)


# Guidance as a student input. Class c has data N(MU_CLASS[c], S^2 I), the null label N(MU_NULL, S^2 I).
# The exact velocity is affine in the mean, so the CFG-guided velocity `v_null + w (v_c - v_null)` is
# exactly the velocity of N(mu_w, S^2 I) with `mu_w = MU_NULL + w (MU_CLASS[c] - MU_NULL)`: the guided
# ODE and its consistency function are closed forms too.
MU_CLASS = torch.stack([MU, -MU, MU.flip(0)])
MU_NULL = torch.tensor([0.1, 0.0, -0.2, 0.3], dtype=torch.float64)


def _class_mean(labels, n):
    if labels is None:
        return MU_NULL.expand(n, -1)
    return torch.cat([MU_CLASS, MU_NULL[None]])[labels]


def _guided_mean(labels, w, n):
    w = torch.ones(n, dtype=torch.float64) if w is None else torch.as_tensor(w, dtype=torch.float64).expand(n)
    return MU_NULL + w[:, None].double() * (_class_mean(labels, n) - MU_NULL)


def _class_teacher(x, t, labels=None):
    return v_star(x, t, mu=_class_mean(labels, x.shape[0]).to(x.dtype))


class OracleGuidedNet(torch.nn.Module):
    """A student that takes the guidance scale: its consistency function is f* for N(mu_w, S^2 I)."""

    num_classes, guidance_input = 3, True

    def __init__(self, use_w: bool = True):
        super().__init__()
        self.use_w = use_w

    def forward(self, y, t, labels=None, guidance=None):
        x = SD * y
        mu = _guided_mean(labels, guidance if self.use_w else None, x.shape[0]).to(x.dtype)
        return (per_sample(torch.cos(t), x) * x - f_star(x, t, mu=mu)) / (SD * per_sample(torch.sin(t), x))


def _class_data(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=g)
    return _class_mean(labels, n) + S * torch.randn(n, 4, generator=g, dtype=torch.float64), labels


def test_guided_velocity_of_gaussians_is_the_velocity_of_the_guided_mean():
    x, labels = _class_data(32)
    t = torch.linspace(0.1, 1.5, 32, dtype=torch.float64)
    w = torch.linspace(0.0, 5.0, 32, dtype=torch.float64)
    v = SCD(teacher=_class_teacher).teacher_velocity(x, t, labels, w)  # per-sample scales
    torch.testing.assert_close(v, v_star(x, t, mu=_guided_mean(labels, w, 32)), rtol=1e-12, atol=1e-12)


def test_scd_with_guidance_input_is_exact_at_the_guided_consistency_function():
    """A per-sample scale goes to the teacher and, the same one, to the student: the loss of the
    exact guided consistency function is 0; a student that ignores the scale is not."""
    x0, labels = _class_data()
    method = SCD(teacher=_class_teacher, guidance_range=[1.0, 4.0], warmup_steps=0, adaptive_weight=False)
    loss, stats = method(OracleGuidedNet(), x0, labels, 0)
    assert loss.max() < 1e-18 and stats["tangent_norm"] < 1e-9
    assert method(OracleGuidedNet(use_w=False), x0, labels, 0)[1]["tangent_norm"] > 1e-2
    # one fixed scale: a student with the guidance input is told that scale
    fixed = SCD(teacher=_class_teacher, guidance=2.5, warmup_steps=0, adaptive_weight=False)
    assert fixed(OracleGuidedNet(), x0, labels, 0)[0].max() < 1e-18
    w = method.draw_guidance(10_000, "cpu")
    assert 1.0 <= w.min() and w.max() <= 4.0 and abs(w.mean() - 2.5) < 0.05


def test_guidance_range_config():
    with pytest.raises(ValueError, match="guidance_range"):
        SCD(guidance_range=[3.0, 1.0])
    with pytest.raises(ValueError, match="not both"):
        SCD(guidance=2.0, guidance_range=[1.0, 3.0])
    x0, labels = _class_data(8)
    with pytest.raises(ValueError, match="network.guidance_input"):  # a student without the input
        SCD(teacher=_class_teacher, guidance_range=[1.0, 3.0])(ConsistencyOracle(), x0, labels, 0)


@pytest.mark.slow
def test_guidance_conditioned_student_learns_every_guided_consistency_function():
    """sCD with w ~ U[1, 4] per sample and the exact class-conditional teacher: one MLP student
    learns f* of the guided ODE at every w. Measured (1,500 steps, ~15 s): relative error of
    f_theta(., pi/2, c, w) against f* for N(mu_w, S^2 I) 0.07-0.11 at w = 1, 2.5, 4; against f*
    at the wrong scale w' = 5 - w it is 0.74 (w = 1) and 2.6 (w = 4). (A student trained at
    w = 1 only reaches 0.05 there in the same budget: the normalized tangent takes bounded steps.)"""
    torch.manual_seed(0)
    student = MLP(4, 64, 2, num_classes=3, guidance_input=True)
    method = SCD(teacher=_class_teacher, guidance_range=[1.0, 4.0], warmup_steps=0, adaptive_weight=False)
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    steps = 1500
    for step in range(steps):
        x0, labels = _class_data(256, seed=step)
        loss, _ = method(student, x0.float(), labels, step)
        opt.param_groups[0]["lr"] = 1e-3 * (1 - step / steps)
        opt.zero_grad()
        loss.mean().backward()
        opt.step()

    z = SD * torch.randn(2000, 4)
    labels = torch.arange(2000) % 3
    t = torch.full((2000,), math.pi / 2)
    with torch.no_grad():
        for w in (1.0, 2.5, 4.0):
            x = multistep_sample(trigflow_sampler_fn(student, SD, labels, torch.full((2000,), w)), z / SD, [math.pi / 2], SD)
            exact = f_star(z.double(), t.double(), mu=_guided_mean(labels, w, 2000))
            wrong = f_star(z.double(), t.double(), mu=_guided_mean(labels, 5.0 - w, 2000))
            err = ((x.double() - exact).norm() / exact.norm()).item()
            err_wrong = ((x.double() - wrong).norm() / wrong.norm()).item()
            print(f"w = {w}: relative error {err:.4f}, against f* at w' = {5 - w}: {err_wrong:.4f}")
            assert err < 0.2, (w, err)
            if w != 2.5:
                assert err_wrong > 3 * err


def test_scd_trains_a_student_network():
    torch.manual_seed(0)
    teacher_net = MLP(4, 32, 2, num_classes=3)
    student = copy.deepcopy(teacher_net)
    method = SCD(teacher=make_teacher_velocity(teacher_net, "trigflow", SD), guidance=1.5, warmup_steps=10)
    loss, stats = method(student, torch.randn(16, 4) * 0.5, torch.randint(0, 3, (16,)), step=3)
    assert loss.shape == (16,) and torch.isfinite(loss).all() and {"mse", "tangent_norm", "w_mean"} <= set(stats)
    loss.mean().backward()
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in teacher_net.parameters())


# ---------------------------------------------------------------------------------------------
# A short distillation


def _fit(net, objective, data, steps: int, lr: float, ema=None) -> None:
    """Adam on `objective(net, batch of 512, None, step)`, lr decayed linearly to 0; EMA if given."""
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for step in range(steps):
        loss, _ = objective(net, data.sample(512)[0], None, step)
        opt.param_groups[0]["lr"] = lr * (1 - step / steps)
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
        if ema is not None:
            ema.update(net, step)


@pytest.mark.slow
def test_scd_one_step_matches_the_many_step_teacher_on_8_gaussians():
    """Train a flow (TrigFlow) teacher on 8 gaussians, distil it with sCD for 400 steps starting
    from its weights, and compare one-step student samples with the teacher's 63-NFE Heun samples.

    Measured (10k samples vs the 10k held-out set, SW_2 with 512 projections; two independent
    10k data draws give 0.013-0.020): teacher Heun 32 steps (63 NFE) 0.0271, teacher one Euler
    step 0.1316, sCD student one step (EMA) 0.0369. Seeds 1, 2: teacher 0.0315 / 0.0293,
    student 0.0421 / 0.0407. ~20-35 s on 2 cores depending on load, hence `slow`.
    """
    torch.manual_seed(0)
    data = EightGaussians()
    teacher = MLP(2, 64, 2)
    _fit(teacher, FlowMatching(), data, 1000, 2e-3)
    teacher.eval().requires_grad_(False)

    student = copy.deepcopy(teacher).train().requires_grad_(True)  # diffusion fine-tuning
    ema = EMA(student, decay=0.99)
    _fit(student, SCD(teacher=make_teacher_velocity(teacher, "trigflow", SD), warmup_steps=100), data, 400, 5e-4, ema)

    gen = torch.Generator().manual_seed(1)
    reference = data.all()[0]  # 10k held-out points
    noise = torch.randn(10_000, 2, generator=gen)
    with torch.no_grad():
        teacher_many, nfe = solve(TrigFlowODE(trigflow_net_velocity(teacher, SD), SD), noise, 32, "heun")
        teacher_one, _ = solve(TrigFlowODE(trigflow_net_velocity(teacher, SD), SD), noise, 1, "euler")
        student_one = multistep_sample(trigflow_sampler_fn(ema.net, SD), noise, [math.pi / 2], SD)
    sw_teacher, sw_teacher_one, sw_student = (sliced_wasserstein(x, reference) for x in
                                              (teacher_many, teacher_one, student_one))
    print(f"SW: teacher {nfe} NFE {sw_teacher:.4f}, teacher 1 step {sw_teacher_one:.4f}, "
          f"sCD student 1 step {sw_student:.4f}")
    assert nfe == 63
    assert sw_student < 1.5 * sw_teacher + 0.01, (sw_student, sw_teacher)
    assert sw_student < 0.5 * sw_teacher_one, (sw_student, sw_teacher_one)


@pytest.mark.slow
def test_scd_from_an_edm_teacher_on_8_gaussians():
    """The same with an EDM teacher: the student starts from its weights through the conversion
    of fewstep.networks.convert (output negated, time embedding fitted), so that at step 0 it is
    already the converted teacher; sCD then makes it a one-step model.

    Measured (seed 0; SW_2 on 10k samples, floor 0.013-0.020): teacher EDM Heun 63 NFE 0.0302,
    the converted student's 1-step sample at init 0.473 (about the data mean: one DDIM step from
    pure noise), sCD student after 400 steps 0.0423 (~30 s on one core)."""
    from fewstep.methods import EDMDiffusion
    from fewstep.networks.convert import student_from_teacher
    from fewstep.core.ode import EDMODE, edm_net_denoiser

    torch.manual_seed(0)
    data = EightGaussians()
    teacher = MLP(2, 64, 2)
    _fit(teacher, EDMDiffusion(sigma_data=SD), data, 1000, 2e-3)
    teacher.eval().requires_grad_(False)

    student = MLP(2, 64, 2)
    info = student_from_teacher(student, teacher, "edm", SD)
    assert info["time_embedding_fit_error"] < 0.1
    ema = EMA(student, decay=0.99)
    method = SCD(teacher=make_teacher_velocity(teacher, "edm", SD), warmup_steps=100)
    gen = torch.Generator().manual_seed(1)
    reference = data.all()[0]
    noise = torch.randn(10_000, 2, generator=gen)
    with torch.no_grad():
        teacher_many, nfe = solve(EDMODE(lambda x, s: edm_net_denoiser(teacher, SD)(x, s)), noise, 32, "heun")
        at_init = multistep_sample(trigflow_sampler_fn(student, SD), noise, [math.pi / 2], SD)
    _fit(student, method, data, 400, 5e-4, ema)
    with torch.no_grad():
        student_one = multistep_sample(trigflow_sampler_fn(ema.net, SD), noise, [math.pi / 2], SD)
    sw_teacher, sw_init, sw_student = (sliced_wasserstein(x, reference) for x in (teacher_many, at_init, student_one))
    print(f"SW: EDM teacher {nfe} NFE {sw_teacher:.4f}, student at init {sw_init:.4f}, sCD 1 step {sw_student:.4f}")
    assert nfe == 63
    assert sw_student < 1.5 * sw_teacher + 0.015, (sw_student, sw_teacher)
    assert sw_student < 0.5 * sw_init
