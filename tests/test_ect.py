"""Easy Consistency Tuning (docs/math.md#meanflow), checked against math and end to end:

- the mapping function and its curriculum (dt halves per stage with q = 2);
- at the exact consistency function of Gaussian data (docs/math.md#gaussian-closed-forms), the residual
  `f*(x_t, t) - f*(x_r, r)` on the shared-noise pair has a closed-form law: the loss matches it,
  and vanishes as dt -> 0 at the order the math says (measured across stages);
- r = 0 is the diffusion (denoising) loss, and the two passes share their dropout masks;
- teacher initialization through `fewstep.training.build` (a flow run's weights are the student's), training
  from scratch, the config checks, and sampling from the API and the CLI.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fewstep.methods import ECT
from fewstep.methods.ect import ect_loss, ect_mapping, ect_stage
from fewstep.networks import MLP
from fewstep.core.trigflow import HALF_PI
from helpers import MU, SD, S, ConsistencyOracle

F64 = torch.float64


def test_mapping_function():
    t = torch.tensor([0.01, 0.5, 2.0, 80.0], dtype=F64)
    n = 1 + 8 * torch.sigmoid(-t)
    for stage in range(4):
        r = ect_mapping(t, stage)  # q = 2, k = 8, b = 1
        torch.testing.assert_close(r, (t * (1 - n / 2 ** (stage + 1))).clamp(min=0))
    # stage 0: small t map to r = 0 (the diffusion loss); every later stage halves dt where r > 0
    assert (ect_mapping(t, 0)[:2] == 0).all()
    dt = [t - ect_mapping(t, s) for s in (2, 3, 4)]
    torch.testing.assert_close(dt[0] / dt[1], torch.full_like(t, 2.0))
    torch.testing.assert_close(dt[1] / dt[2], torch.full_like(t, 2.0))
    # 'const' drops n(t); ECT's 1-hour recipe: q = 256 at stage 0
    torch.testing.assert_close(ect_mapping(t, 1, mapping="const"), t * 0.75)
    torch.testing.assert_close(ect_mapping(t, 0, q=256.0), t * (1 - n / 256))


def test_curriculum_stages():
    assert [ect_stage(s, 800, 8) for s in (0, 99, 100, 450, 799, 5000)] == [0, 0, 1, 4, 7, 7]
    assert ect_stage(10, 0, 8) == 0  # no run length: stage 0
    method = ECT(from_teacher=False)
    method.setup(None, 80)
    assert method.total_steps == 80 and method.stage(79) == 7
    t, r = method.draw(4096, 79, torch.zeros(1))
    assert (r < t).all() and (r > 0).float().mean() > 0.99  # late: r close to t


# ---------------------------------------------------------------------------------------------
# The loss at the exact consistency function


def _residual_law(t, r, s=S):
    """Per-dimension variance of `f*(x_t, t) - f*(x_r, r)` on the shared-noise pair: with
    `a(sigma) = s / sqrt(s^2 + sigma^2)`, the residual is `s n (a_t - a_r) + eps (t a_t - r a_r)`
    (n, eps standard normal), a zero-mean Gaussian."""
    a = lambda x: s / math.sqrt(s ** 2 + x ** 2)  # noqa: E731
    return s ** 2 * (a(t) - a(r)) ** 2 + (t * a(t) - r * a(r)) ** 2


@pytest.mark.parametrize("t_sigma", [0.2, 1.0, 5.0])
def test_loss_at_exact_consistency_function_vanishes_at_the_right_order(t_sigma):
    """At the exact f*, Delta = f*(x_t, t) - f*(x_r, r) with x_t = x0 + t eps, x_r = x0 + r eps is a
    zero-mean Gaussian of per-dimension variance V(t, r) (closed form) = dt^2 s^4 / (s^2 + t^2)^2
    + O(dt^3): it never vanishes sample by sample (the pair follows the conditional path, not the ODE),
    but its size goes to 0 with dt. Across stages (dt halves each), with the same draws:
    - squared L2 (mean over dims): matches V, order 2 in dt;
    - squared L2 with ECT's weight 1/(t - r): order 1;
    - ECT's default, ||Delta|| / (t - r): order 0, tending to sqrt(v) E||N(0, I_D)||, v = s^4 / (s^2 + t^2)^2.
    """
    n, D = 20000, MU.numel()
    g = torch.Generator().manual_seed(0)
    x0 = MU + S * torch.randn(n, D, generator=g, dtype=F64)
    eps = torch.randn(n, D, generator=g, dtype=F64)
    net = ConsistencyOracle()
    t = torch.full((n,), t_sigma, dtype=F64)
    rows = []
    for stage in range(2, 10):
        r = ect_mapping(t, stage)
        dt = float(t[0] - r[0])
        sq, _ = ect_loss(net, x0, eps, t, r, SD, metric="l2", weighting="none")
        sq_w, _ = ect_loss(net, x0, eps, t, r, SD, metric="l2", weighting="inv_dt")
        ect, stats = ect_loss(net, x0, eps, t, r, SD)  # defaults: sqrt(||.||^2 + 0) / (t - r)
        law = _residual_law(t_sigma, float(r[0]))
        assert abs(sq.mean().item() / law - 1) < 0.03, (stage, sq.mean().item(), law)
        rows.append((dt, sq.mean().item(), sq_w.mean().item(), ect.mean().item()))
        assert stats["r_zero"] == 0

    def order(col, k):  # log2 of the loss ratio when dt halves, at the late stages
        return math.log2(rows[k][col] / rows[k + 1][col])

    # the measured order tends to 2, 1, 0, its deviation halving with dt (the O(dt) correction)
    for col, expect in ((1, 2.0), (2, 1.0), (3, 0.0)):
        dev = [order(col, k) - expect for k in (-3, -2)]
        assert abs(dev[1]) < 0.03 and 0 < dev[1] < 0.6 * dev[0], (col, dev, rows)
    v = S ** 4 / (S ** 2 + t_sigma ** 2) ** 2
    mean_norm = math.sqrt(2) * math.gamma((D + 1) / 2) / math.gamma(D / 2)  # E||N(0, I_D)||
    assert abs(rows[-1][3] / (math.sqrt(v) * mean_norm) - 1) < 0.03
    assert rows[-1][0] < 1e-2 * t_sigma


class _NaNAtZero(nn.Module):
    """A network that is undefined at t = 0 (e.g. a log-time input): r = 0 must not read it."""

    num_classes = 0

    def forward(self, y, t, labels=None):
        return y * torch.log(t / t.detach().clamp_min(1e-30))[:, None] + 0.1 / t[:, None]


def test_r_zero_is_the_diffusion_loss():
    """Stage 0 maps small t to r = 0, where the target is x0 itself (f(x, 0) = x): the loss is the
    denoising loss ||D(x_t, t) - x0|| / t, with no evaluation of the network at t = 0."""
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(64, 3, generator=g, dtype=F64), torch.randn(64, 3, generator=g, dtype=F64)
    t = torch.full((64,), 0.05, dtype=F64)
    r = ect_mapping(t, 0)
    assert (r == 0).all()
    net = _NaNAtZero()
    loss, stats = ect_loss(net, x0, eps, t, r, SD)
    tt = torch.atan(t / SD)[:, None]
    x_t = torch.cos(tt) * x0 + torch.sin(tt) * SD * eps
    f = torch.cos(tt) * x_t - torch.sin(tt) * SD * net(x_t / SD, tt[:, 0])
    torch.testing.assert_close(loss, (f - x0).norm(dim=1) / t)
    assert stats["r_zero"] == 1
    r[::2] = 0.04  # a mixed batch: the network runs at r > 0 only where r > 0
    assert torch.isfinite(ect_loss(net, x0, eps, t, r, SD)[0]).all()


def test_the_two_passes_share_dropout_masks():
    """With dropout 0.5 in training mode, dt -> 0 makes the residual vanish only if both passes draw the
    same masks (ECT's shared dropout)."""
    torch.manual_seed(0)
    net = MLP(3, 32, 2, dropout=0.5).train()
    x0, eps = torch.randn(32, 3), torch.randn(32, 3)
    t = torch.full((32,), 1.0)
    _, stats = ect_loss(net, x0, eps, t, ect_mapping(t, 20), SD)
    assert stats["distance"] < 1e-4
    with torch.no_grad():  # different masks: an O(1) difference
        a, b = net(x0, torch.ones(32)), net(x0, torch.ones(32))
    assert (a - b).abs().mean() > 0.05


# ---------------------------------------------------------------------------------------------
# Config, teacher initialization, training and sampling


def _config(method: dict, steps: int = 6, **train):
    from fewstep.config import config_from_dict
    from fewstep.training.registries import validate_against_registries

    return validate_against_registries(config_from_dict({
        "data": {"name": "8gaussians"}, "network": {"width": 32, "depth": 2}, "method": method,
        "optim": {"lr": 1e-3},
        "train": {"steps": steps, "batch_size": 64, "sample_every": 0, "ckpt_every": 0, "progress": False,
                  "num_samples": 16, "log_every": 2, **train}}))


@pytest.mark.parametrize("times", [(HALF_PI,), (HALF_PI, 1.1)], ids=["1-step", "2-step"])
def test_sampling_starts_at_sigma_max_as_ect(times):
    """Defect 5: ECT samples from sigma_max = 80, x = 80 eps. With the exact consistency function of
    N(mu, s^2) data, its one step is, in closed form, `f(80 eps, 80) = mu + s (80 eps - mu) / sqrt(s^2 + 80^2)`
    (not `mu + s eps`, the exact sample from sigma = inf); fewstep's ECT sampling must give it."""
    method = ECT(sigma_d=SD)
    assert method.t_max == pytest.approx(math.atan(80.0 / SD), rel=1e-15)
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(512, MU.numel(), generator=g, dtype=F64)
    sampler = method.sampler(ConsistencyOracle(MU, S, SD))
    assert sampler.schedule(1).times == (method.t_max,)  # the default schedule starts there too
    one = sampler.sample(eps, sampler.schedule(times=times[:1]))
    torch.testing.assert_close(one, MU + S * (80.0 * eps - MU) / math.sqrt(S ** 2 + 80.0 ** 2), rtol=0, atol=1e-12)
    # Not vacuous: the exact sample from t = pi/2 differs by about s mu / 80.
    assert (one - (MU + S * eps)).abs().max() > 1e-3
    # Further steps re-noise from the first as before (the second time is not moved), and a schedule
    # that starts below t_max (SDEdit-like) is left as it is.
    if len(times) > 1:
        from fewstep.core.samplers import multistep_sample
        from fewstep.core.trigflow import trigflow_consistency

        net = ConsistencyOracle(MU, S, SD)
        sampler = method.sampler(net)
        out = sampler.sample(eps, sampler.schedule(times=times), generator=torch.Generator().manual_seed(1))
        fn = lambda x, t: trigflow_consistency(net, x, t, SD)  # noqa: E731
        expect = multistep_sample(fn, math.sin(method.t_max) * eps, [method.t_max, 1.1], SD,
                                  torch.Generator().manual_seed(1))
        torch.testing.assert_close(out, expect, rtol=0, atol=1e-12)
        low = sampler.sample(eps, sampler.schedule(times=[1.2, 0.8]), generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(low, multistep_sample(fn, eps, [1.2, 0.8], SD, torch.Generator().manual_seed(2)))


def test_config_checks():
    from fewstep.config import ConfigError

    with pytest.raises(ConfigError, match="--teacher"):
        _config({"name": "ect"})  # ECT tunes a diffusion model: its checkpoint is needed...
    _config({"name": "ect", "from_teacher": False})  # ...unless from scratch
    with pytest.raises(ConfigError, match="train.teacher"):
        _config({"name": "ect", "from_teacher": False}, teacher="runs/x")
    for bad in ({"q": 1.0}, {"stages": 0}, {"metric": "lpips"}, {"weighting": "x"}, {"mapping": "x"}):
        with pytest.raises(ConfigError):
            _config({"name": "ect", "from_teacher": False, **bad})


def test_tuning_from_a_flow_teacher_and_from_scratch(tmp_path, capsys):
    """`fewstep train --method flow`, then ECT with `--teacher RUN`: the student starts as the teacher's
    (EMA) network, weight for weight; it trains, saves, and samples in 1 and 2 steps (API and CLI).
    Without a teacher it trains from random weights, or starts from `train.init_from` alike."""
    from fewstep.apps.train import train
    from fewstep.training.build import build
    from fewstep.cli import main
    from fewstep.apps.generate import Schedule, generate, load_model
    from fewstep.apps.callbacks import SamplePreviews
    from fewstep.training.fit import fit

    assert main(["train", "--preset", "8gaussians", "--method", "flow", "--set", "network.width=32", "--set",
                 "network.depth=2", "--steps", "8", "--set", "train.sample_every=0", "--no-progress", "--device",
                 "cpu", "--out", str(tmp_path / "flow")]) == 0
    teacher = load_model(tmp_path / "flow")

    cfg = _config({"name": "ect"}, steps=6, teacher=str(tmp_path / "flow"))
    built = build(cfg, tmp_path / "ect")
    teacher_weights = teacher.net.state_dict()
    assert set(built.net.state_dict()) == set(teacher_weights)
    for key, value in built.net.state_dict().items():
        assert torch.equal(value, teacher_weights[key]), key
    previews = [SamplePreviews(0, 64, None, built.data)]  # what `train` adds: the final 1- and 2-step metrics
    summary = fit(*built, tmp_path / "ect", **{**built.options, "callbacks": previews})
    assert summary["steps"] == 6 and set(summary["metrics"]) == {"1-step", "2-step"}

    model = load_model(tmp_path / "ect")
    assert model.sampler.consistency_fn() is not None and model.method.name == "ect" and model.method.total_steps == 6
    for steps, times in ((1, (HALF_PI,)), (2, (HALF_PI, 1.1))):
        x, nfe, _ = generate(model, Schedule("multistep", steps, times), 64, progress=False)
        assert x.shape == (64, 2) and nfe == steps and torch.isfinite(x).all()
    assert main(["sample", str(tmp_path / "ect"), "--steps", "1", "--num", "16", "--device", "cpu",
                 "--out", str(tmp_path / "one.png")]) == 0
    assert "NFE 1" in capsys.readouterr().out

    summary = train(_config({"name": "ect", "from_teacher": False}, steps=4), tmp_path / "scratch")
    assert summary["steps"] == 4
    built = build(_config({"name": "ect", "from_teacher": False}, init_from=str(tmp_path / "flow")))
    for key, value in built.net.state_dict().items():
        assert torch.equal(value, teacher_weights[key]), key
