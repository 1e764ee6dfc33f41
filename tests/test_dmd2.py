"""DMD2 and rCM (docs/math.md#distribution-matching-dmd2): the DMD gradient against the reverse KL
in closed form (Gaussian data, a Gaussian generator, exact scores), the fake score's update as
plain denoising, the two time scales' schedule and its exact resume, rCM with lambda = 0 as sCD,
and sampling a trained generator."""

import copy
import functools
import json
import math

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from fewstep import fit
from fewstep.config import OptimConfig
from fewstep.methods import DMD2, RCM, SCD, EDMDiffusion, FlowMatching, Method, register_method
from fewstep.methods.base import Auxiliary
from fewstep.networks import MLP
from fewstep.training import checkpoint as ckpt
from fewstep.training.build import learning_rate, make_optimizer
from fewstep.training.fit import NonFiniteLossError
from helpers import MU, S, SD, randomize_zero_params_, v_star


class GaussianScore(nn.Module):
    """The exact TrigFlow velocity network of N(mu, s^2 I) data: `F(x, t) = v*(sigma_d x, t) / sigma_d`."""

    def __init__(self, mu, s):
        super().__init__()
        self.register_buffer("mu", mu.detach().clone())
        self.s = float(s)

    def forward(self, x, t, labels=None):
        return v_star(SD * x, t, mu=self.mu, s=self.s) / SD


def _whitened(n: int, dims: int, seed: int = 0):
    """(z, n) of shape (N, dims) each, with per-dimension sample mean 0 and sample covariance I
    (1/N): averages of affine and quadratic functions of them are exact expectations."""
    g = torch.Generator().manual_seed(seed)
    pair = torch.randn(dims, n, 2, generator=g, dtype=torch.float64)
    pair = pair - pair.mean(dim=1, keepdim=True)
    cov = pair.transpose(1, 2) @ pair / n
    pair = pair @ torch.linalg.inv(torch.linalg.cholesky(cov)).transpose(1, 2)
    return pair[..., 0].T.contiguous(), pair[..., 1].T.contiguous()


def _reverse_kl(a, b, t):
    """Per-dimension KL(p_fake,t || p_real,t) averaged over dimensions (docs/math.md#dmd-closed-forms)."""
    c2, s2 = math.cos(t) ** 2, math.sin(t) ** 2
    q_r, q_f = c2 * S ** 2 + s2 * SD ** 2, c2 * a ** 2 + s2 * SD ** 2
    return (0.5 * (q_f / q_r + c2 * (b - MU) ** 2 / q_r - 1 - torch.log(q_f / q_r))).mean()


def _gaussian_method(a, b, weighting):
    method = DMD2(weighting=weighting)
    method.teacher, method.formulation = v_star, "trigflow"  # the exact real score
    method.fake = GaussianScore(b.detach(), a.detach())  # the exact fake score of G(z) = a z + b
    return method


@pytest.mark.parametrize("t", [0.3, 0.9, 1.4])
def test_dmd_gradient_is_the_reverse_kl_gradient(t):
    a = torch.tensor(0.35, dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0.1, -0.2, 0.7, 0.4], dtype=torch.float64, requires_grad=True)
    z, n = _whitened(4096, 4)
    loss, _ = _gaussian_method(a, b, "kl").dmd_loss(a * z + b, None, torch.full((4096,), t, dtype=torch.float64),
                                                      SD * n)
    grad_dmd = torch.autograd.grad(loss.mean(), (a, b))
    grad_kl = torch.autograd.grad(_reverse_kl(a, b, t), (a, b))
    assert grad_kl[0].abs() > 1e-4 and grad_kl[1].abs().min() > 1e-4  # not a vacuous check
    for got, want in zip(grad_dmd, grad_kl):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("weighting", ["dmd", "kl"])
def test_dmd_gradient_vanishes_at_the_data_distribution(weighting):
    a = torch.tensor(S, dtype=torch.float64, requires_grad=True)
    b = MU.clone().requires_grad_(True)
    z, n = _whitened(512, 4, seed=1)
    t = torch.rand(512, dtype=torch.float64) * 1.5 + 0.03
    loss, _ = _gaussian_method(a, b, weighting).dmd_loss(a * z + b, None, t, SD * n)
    for g in torch.autograd.grad(loss.mean(), (a, b)):
        assert g.abs().max() < 1e-12
    for g in torch.autograd.grad(_reverse_kl(a, b, 0.7), (a, b)):  # the KL is at its minimum there too
        assert g.abs().max() < 1e-12


def test_the_generator_is_the_consistency_function_at_its_times():
    """A one-step generator is `f(sigma_d z, pi/2)`; a 2-step one simulates its first step (no grad)."""
    torch.manual_seed(0)
    net = randomize_zero_params_(MLP(4, 16, 2).double())
    method = DMD2(generator_steps=2, times=[math.pi / 2, 0.8])
    like = torch.zeros(6, 4, dtype=torch.float64)
    sampler = method.sampler(net)
    assert sampler.schedule().times == (math.pi / 2, 0.8)
    for last in (0, 1):
        seed = 0
        while torch.manual_seed(seed) and int(torch.randint(2, ())) != last:  # a seed whose drawn step is `last`
            seed += 1
        torch.manual_seed(seed)
        x = method.generator_output(net, like)
        torch.manual_seed(seed)
        torch.randint(2, ())
        noise = torch.randn(6, 4, dtype=torch.float64)
        want = sampler.sample(noise, sampler.schedule(times=[math.pi / 2, 0.8][:last + 1]))
        torch.testing.assert_close(x, want, rtol=1e-12, atol=1e-12)
        assert x.requires_grad


@pytest.mark.parametrize("formulation, loss_cls", [("trigflow", FlowMatching), ("edm", EDMDiffusion)])
def test_fake_score_update_is_denoising_on_generator_samples(formulation, loss_cls):
    torch.manual_seed(0)
    teacher, student = (randomize_zero_params_(MLP(4, 16, 2, num_classes=3).double(), seed=s) for s in (1, 2))
    method = DMD2(generator_steps=2)
    method.set_teacher(teacher, formulation)
    aux = method.auxiliaries(student)["fake_score"]
    assert aux.updates_per_step == 5.0 and aux.lr == method.fake_lr
    fake = aux.net
    assert all(torch.equal(p, q) for p, q in zip(fake.parameters(), teacher.parameters()))  # from the teacher
    x0 = torch.randn(8, 4, dtype=torch.float64)
    labels = torch.randint(3, (8,))
    torch.manual_seed(5)
    got, _ = aux.loss(fake, student, x0, labels, 0)
    torch.manual_seed(5)
    x = method.generate(student, x0, labels)
    plain = loss_cls(**({"sigma_d": SD, "p_mean": method.dmd_p_mean, "p_std": method.dmd_p_std}
                        if formulation == "trigflow" else {"sigma_data": SD}), adaptive_weight=False)
    want, _ = plain(fake, x, labels)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    got.mean().backward()
    assert fake.linear_out.weight.grad is not None and all(p.grad is None for p in student.parameters())


# ---------------------------------------------------------------------------------------------
# The two time scales in fit


@register_method("test-counting-aux")
class _Counting(Method):
    """A flow loss for the net and a denoising loss for one auxiliary, counting its calls per step."""

    def __init__(self, ratio=2.5):
        self.ratio, self.calls, self.aux_net = ratio, {}, None

    def __call__(self, net, x0, labels=None, step=0):
        return FlowMatching(adaptive_weight=False)(net, x0, labels, step)

    def auxiliaries(self, net):
        self.aux_net = randomize_zero_params_(copy.deepcopy(net), seed=3)
        return {"helper": Auxiliary(self.aux_net, self._loss, lr=3e-3, updates_per_step=self.ratio, ema_decay=0.9)}

    def _loss(self, model, net, x0, labels, step):
        self.calls[step] = self.calls.get(step, 0) + 1
        with torch.no_grad():
            target = net(x0 / SD, torch.full((x0.shape[0],), 1.0, dtype=x0.dtype))
        return (model(x0 / SD, torch.full((x0.shape[0],), 0.5, dtype=x0.dtype)) - target).square().mean(1), {}


def _batches():
    g = torch.Generator().manual_seed(4)
    return [0.5 * torch.randn(8, 2, generator=g, dtype=torch.float64) for _ in range(12)]


def _fit(method, out, steps, optim=None, **kw):
    torch.manual_seed(0)
    net = MLP(2, 16, 1).double()
    if optim is not None:  # the optimizer and schedule `build` makes from `optim`, over 8 steps
        kw.update(optimizer=make_optimizer(optim, net.parameters()),
                  lr_schedule=functools.partial(learning_rate, optim, total_steps=8))
    return fit(net, method, _batches(), out, steps=steps, device="cpu", progress=False, ckpt_every=1,
               keep_ckpts=20, log_every=1, **kw)


def test_the_schedule_runs_the_owed_updates_each_step(tmp_path):
    method = _Counting(2.5)
    _fit(method, tmp_path / "a", 4, grad_accum=2)
    assert method.calls == {0: 2 * 2, 1: 3 * 2, 2: 2 * 2, 3: 3 * 2}  # floor(2.5 (s + 1)) by step s, 2 micro-batches
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert all("helper.loss" in r and "helper.grad_norm" in r for r in log)
    slow = _Counting(0.5)
    _fit(slow, tmp_path / "b", 4)
    assert slow.calls == {1: 1, 3: 1}
    _, meta = ckpt.load_checkpoint(tmp_path / "b")
    assert meta["auxiliaries"]["helper"]["updates"] == 2


@pytest.mark.parametrize("ratio", [1.25, 0.5])
def test_resume_inside_a_cycle_is_exact(tmp_path, ratio):
    """Stopped at step 2 (the 4-step cycle of 1.25 updates per step half done; 0.5: after the
    skipped half), resumed to 5: every tensor equals the straight run's, the auxiliary's included.
    Inside a 4-step warmup too: the auxiliary's rate, like the net's, is a function of the step."""
    optim = OptimConfig(warmup_steps=4)
    _fit(_Counting(ratio), tmp_path / "straight", 5, optim)
    _fit(_Counting(ratio), tmp_path / "split", 2, optim)
    resumed = _Counting(ratio)
    _fit(resumed, tmp_path / "split", 5, optim)
    assert min(resumed.calls, default=2) >= 2  # it did not redo the first two steps' updates
    a, meta_a = ckpt.load_checkpoint(tmp_path / "straight")
    b, meta_b = ckpt.load_checkpoint(tmp_path / "split")
    assert meta_a["auxiliaries"]["helper"]["updates"] == meta_b["auxiliaries"]["helper"]["updates"] == int(5 * ratio)
    assert {k for k in a if k.startswith("aux.helper.")} >= {"aux.helper.net.linear_out.weight",
                                                              "aux.helper.ema.linear_out.weight"}
    for key in a:
        if not key.startswith("rng."):
            assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("name, cls", [("adam", torch.optim.Adam), ("radam", torch.optim.RAdam)])
def test_the_fake_score_follows_the_runs_optimizer_and_schedule(tmp_path, name, cls):
    """`optim.name` and `optim.eps` pick the fake score's optimizer too; its rate is `fake_lr` times
    the run's warmup (4 steps) and linear decay (to 0 at step 8), checked at each of its updates."""
    teacher, student = _teacher_and_student()
    method = DMD2(fake_updates=2, fake_lr=2e-4)
    method.set_teacher(teacher, "trigflow")
    optim = OptimConfig(name=name, lr=1e-3, warmup_steps=4, schedule="linear", eps=1e-6)
    optimizer = make_optimizer(optim, student.parameters())
    seen = []  # (the optimizer, its rate) at each step, in order
    hook = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: seen.append((opt, opt.param_groups[0]["lr"])))
    try:
        fit(student, method, _batches(), tmp_path / name, steps=6, optimizer=optimizer, device="cpu", progress=False,
            lr_schedule=functools.partial(learning_rate, optim, total_steps=8), log_every=1)
    finally:
        hook.remove()
    shape = [min(1, (s + 1) / 4) * (1 - max(0, s - 4) / 4) for s in range(6)]  # 1/4, 1/2, 3/4, 1, 1, 3/4
    assert [lr for opt, lr in seen if opt is optimizer] == pytest.approx([1e-3 * f for f in shape], rel=1e-12)
    fake = [(opt, lr) for opt, lr in seen if opt is not optimizer]
    assert {type(opt) for opt, _ in fake} == {type(optimizer)} == {cls}
    assert {opt.defaults["eps"] for opt, _ in fake} == {1e-6}
    assert [lr for _, lr in fake] == pytest.approx([2e-4 * f for f in shape for _ in range(2)], rel=1e-12)
    log = [json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
    assert [r["fake_score.lr"] for r in log] == pytest.approx([2e-4 * f for f in shape], rel=1e-6)
    with pytest.raises(ValueError, match="base rate"):  # the schedule's shape is relative to a rate > 0
        fit(student, method, _batches(), tmp_path / "zero", steps=1, device="cpu", progress=False,
            optimizer=torch.optim.Adam(student.parameters(), lr=0.0), lr_schedule=lambda step: 1e-3)


def test_a_non_finite_auxiliary_loss_is_skipped_and_counted(tmp_path):
    class Bad(_Counting):
        def _loss(self, model, net, x0, labels, step):
            loss, stats = super()._loss(model, net, x0, labels, step)
            return loss * (float("nan") if step == 1 else 1.0), stats

    class Broken(_Counting):
        def _loss(self, model, net, x0, labels, step):
            loss, stats = super()._loss(model, net, x0, labels, step)
            return loss * float("nan"), stats

    register_method("test-bad-aux")(Bad)
    method = Bad(1.0)
    summary = _fit(method, tmp_path / "bad", 3)
    assert summary["nonfinite_total"] == 1 and all(torch.isfinite(p).all() for p in method.aux_net.parameters())
    register_method("test-broken-aux")(Broken)
    with pytest.raises(NonFiniteLossError, match="3 non-finite"):  # an auxiliary that never recovers stops the run
        _fit(Broken(1.0), tmp_path / "broken", 6, max_nonfinite=3)


# ---------------------------------------------------------------------------------------------
# rCM


def _teacher_and_student():
    torch.manual_seed(0)
    teacher = randomize_zero_params_(MLP(2, 16, 2).double(), seed=1)
    return teacher, copy.deepcopy(teacher)


def test_rcm_with_lambda_zero_is_scd(tmp_path):
    teacher, student = _teacher_and_student()
    runs = {}
    for name, method in (("scd", SCD(warmup_steps=2)), ("rcm", RCM(warmup_steps=2, dmd_weight=0.0))):
        method.set_teacher(teacher, "trigflow")
        torch.manual_seed(0)
        fit(copy.deepcopy(student), method, _batches(), tmp_path / name, steps=3, device="cpu", progress=False)
        runs[name] = ckpt.load_checkpoint(tmp_path / name)[0]
    assert not any(k.startswith("aux.") for k in runs["rcm"])
    for key, value in runs["scd"].items():
        torch.testing.assert_close(runs["rcm"][key], value, rtol=0, atol=1e-15, msg=key)


def test_rcm_adds_lambda_times_the_dmd_loss():
    teacher, student = _teacher_and_student()
    x0 = 0.5 * torch.randn(8, 2, dtype=torch.float64)
    method = RCM(dmd_weight=0.3, dmd_warmup_steps=10)
    method.set_teacher(teacher, "trigflow")
    scd = SCD()
    scd.set_teacher(teacher, "trigflow")
    torch.manual_seed(1)
    total, stats = method(student, x0, None, step=5)
    torch.manual_seed(1)
    part, _ = scd(student, x0, None, step=5)
    dmd, _ = method.dmd_loss(method.generator_output(student, x0), None)
    torch.testing.assert_close(total, part + 0.15 * dmd, rtol=1e-12, atol=1e-15)  # lambda ramps: 0.3 * 5/10
    assert "dmd_loss" in stats and "tangent_norm" in stats


def test_gan_head_reads_the_fake_scores_features_and_trains(tmp_path):
    teacher, student = _teacher_and_student()
    method = DMD2(gan_weight=0.1, fake_updates=1)
    method.set_teacher(teacher, "trigflow")
    head_before = None
    summary = fit(student, method, _batches(), tmp_path / "gan", steps=2, device="cpu", progress=False, log_every=1)
    assert head_before is None and "fake_score.gan_d" in summary["final"] and "gan_g" in summary["final"]
    tensors, _ = ckpt.load_checkpoint(tmp_path / "gan")
    assert "aux.fake_score.net.head.1.weight" in tensors


def test_bad_options_are_one_line_errors():
    for kwargs, words in (({"generator_steps": 5}, "generator_steps"), ({"times": [1.0, 1.2], "generator_steps": 2},
                                                                       "times"),
                          ({"weighting": "l1"}, "weighting"), ({"fake_updates": 0}, "fake_updates")):
        with pytest.raises(ValueError, match=words):
            DMD2(**kwargs)
    with pytest.raises(ValueError, match="teacher"):
        DMD2().auxiliaries(MLP(2, 16, 1))
    with pytest.raises(ValueError, match="guidance_range"):
        RCM(guidance_range=[1.0, 2.0])


# ---------------------------------------------------------------------------------------------
# From the command line


def test_dmd2_trains_samples_and_edits_from_the_cli(tmp_path, capsys):
    """A class-conditional UNet teacher (label dropout, for CFG); a 2-step DMD2 generator with the
    teacher guided at 2 and the GAN head on trains, resumes, samples at its own times and edits."""
    from fewstep.cli import main

    teacher, student = tmp_path / "teacher", tmp_path / "dmd2"
    common = ["--batch-size", "8", "--no-progress", "--device", "cpu", "--set", "train.sample_every=0",
              "--set", "train.num_samples=4", "--set", "network.model_channels=8", "--set", "network.channel_mult=[1]",
              "--set", "network.attn_resolutions=[]"]
    assert main(["train", "--steps", "2", *common, "--method", "flow", "--set", "network.class_conditional=true",
                 "--set", "method.label_dropout=0.2", "--out", str(teacher)]) == 0
    dmd = ["train", *common[:9], "--method", "dmd2", "--teacher", str(teacher),
           "--set", "method.generator_steps=2", "--set", "method.guidance=2", "--set", "method.gan_weight=0.01",
           "--set", "method.fake_updates=2", "--out", str(student)]
    assert main([*dmd, "--steps", "1"]) == 0
    assert main([*dmd, "--steps", "2"]) == 0
    assert "resumed from" in capsys.readouterr().out
    tensors, meta = ckpt.load_checkpoint(student)
    assert meta["auxiliaries"]["fake_score"]["updates"] == 4 and "aux.fake_score.net.head.1.weight" in tensors
    assert main(["sample", str(student), "--num", "4", "--label", "3", "--out", str(tmp_path / "s.png")]) == 0
    assert "NFE 2" in capsys.readouterr().out  # the generator's own 2 steps by default
    assert main(["edit", str(student), "--task", "inpaint", "--num", "2", "--device", "cpu",
                 "--out", str(tmp_path / "e.png")]) == 0
