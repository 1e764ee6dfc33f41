"""MeanFlow (Geng, Deng, Bai, Kolter, He 2025, "Mean Flows for One-step Generative Modeling",
arXiv 2505.13447), docs/math.md#the-meanflow-identity: a network of two times learns the average velocity

    u(x_t, r, t) = 1 / (t - r) int_r^t v(x_s, s) ds,    so that    x_r = x_t - (t - r) u(x_t, r, t),

from the MeanFlow identity (paper Eq. 6), with `d/dt u = v . d_x u + d_t u` at fixed r:

    u(x_t, r, t) = v(x_t, t) - (t - r) d/dt u(x_t, r, t)

    F, jvp_out = JVP of F at (x_t / sigma_d, t; r) along ((t - r) v / sigma_d, t - r; 0)    # one pass
    target = v / sigma_d - jvp_out                                   # = u_tgt / sigma_d (paper Eq. 9-10)
    L = sg(w) ||F - sg(target)||^2 / D,   w = 1 / (sg(||F - target||^2 / D) + c)^p      # adaptive weight

with `u = sigma_d F(x_t / sigma_d, t, r=r)`. Scaling the tangent by `t - r` makes `jvp_out` the
whole correction `(t - r) dF/dt`, zero where r = t: so only the samples with r != t (a quarter, by
default) take the pass with tangents, the others a plain forward (`meanflow_loss`), which is what
keeps a MeanFlow step close to a flow-matching step. v is the conditional velocity of the pair
(x0, z) that made x_t, or with classifier-free guidance the paper's guided field (Eq. 16; with
kappa its Eq. 21): `v~ = w v + kappa u(x_t, t, t | c) + (1 - w - kappa) u(x_t, t, t | null)`, the
network's own velocities at r = t, without gradients; the null-label samples of `label_dropout`
learn the unconditional u. One network call per sample both ways then samples with CFG (1 NFE).

Time convention: TrigFlow (`x_t = cos t x0 + sin t z`, t in [0, pi/2], docs/math.md#noising-and-velocity), not the
paper's linear interpolation. Why:
- Every fewstep sampler, schedule (`--steps`, `--times`, previews: pi/2 then 1.1), editing routine
  and the network contract speak TrigFlow time; MeanFlow samples through `sampler` with those same
  times and needs nothing new anywhere else.
- At r = t the MeanFlow network is a TrigFlow flow-matching network (`u(x, t, t) = v`, `F = v /
  sigma_d`): the r = t samples (75% by default) are fewstep's flow-matching loss, a 'flow'
  checkpoint's weights start a MeanFlow network exactly (its r embedding starts at zero), and the
  r = t slice (`r=None`) can be sampled with the ODE solvers.
- The networks' time embedding was designed for t in [0, pi/2] with bounded `d emb / dt` (docs/math.md#stabilizers),
  which is what keeps the JVP bounded; the identity itself needs only `dx_t/dt = v` (docs/math.md#the-meanflow-identity).
- The paper's logit-normal time density carries over exactly: logit-normal(P_mean, P_std) on the
  linear t is log-normal(P_mean, P_std) on its noise level `sigma = t / (1 - t)`, and fewstep's
  `lognormal_times(P_mean, P_std)` draws TrigFlow times whose noise level `sigma_d tan t` has that
  same log-normal density. So the paper's (P_mean, P_std) are used as they are.

Defaults are the paper's ImageNet ablation settings (its Table 1): (r, t) from two log-normal draws
(-0.4, 1.0), sorted, with r != t for a quarter of the batch (`ratio_r_neq_t`); adaptive weighting
power p = 1, c = 1e-3. (py-meanflow's CIFAR-10 config: p = 0.75, 75% r != t, and logit-normal(-2, 2)
on its linear time, where t = 1 is noise as in the paper (not reversed), which is `p_mean=-2.0,
p_std=2.0` here: `MeanFlow(**PY_MEANFLOW_CIFAR10)`.) One departure: ||.||^2 is the mean over
dimensions (fewstep's `per_sample_mse`, as in every fewstep loss), where the paper sums, so `c`
means the same at every resolution.

Sampling (`sample`): `x = sigma_d z` at `times[0]` (pi/2), then `x <- x - (t - s) u(x, s, t)` for
consecutive times t > s and finally s = 0: 1 NFE for `[pi/2]`, 2 for `[pi/2, 1.1]`; deterministic.
The JVP goes through the traced tangent engine (`jvp_mode='traced'`: one joint primal+tangent graph
per input signature, any network; 'tangent' runs the engine eagerly); 'separate' (`torch.func.jvp`
plus a graded forward) and 'single' (forward-mode AD with autograd) are there for comparison.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ClassVar

import torch

from fewstep.jvp import JVP_MODES, jvp
from fewstep.methods.base import Method, register_method
from fewstep.methods.common import check_choice, check_range, per_sample_mse
from fewstep.methods.flow import drop_labels
from fewstep.networks.contract import network_info
from fewstep.core.trigflow import (HALF_PI, SIGMA_D, expand_to, lognormal_times, net_velocity, time_dtype, trigflow_noise,
                              trigflow_velocity)

# py-meanflow's CIFAR-10 recipe as MeanFlow fields (module docstring): its logit-normal(-2, 2) on the
# linear time, where t = 1 is noise, is log-normal(-2, 2) on the noise level, so p_mean = -2.0.
PY_MEANFLOW_CIFAR10 = {"p_mean": -2.0, "p_std": 2.0, "ratio_r_neq_t": 0.75, "adaptive_p": 0.75}


def check_second_time(net) -> None:
    """MeanFlow's network takes the second time r (`second_time = True`; the network contract)."""
    if not network_info(net).second_time:
        raise ValueError("method 'meanflow' needs a network that takes a second time r: set network.second_time=true "
                         "(fewstep's UNet, MLP, DiT), or give your network an `r` keyword and `second_time = True`")


def meanflow_times(n: int, p_mean: float, p_std: float, ratio_r_neq_t: float, sigma_d: float, device=None,
                   dtype=torch.float32, generator=None):
    """`(r, t)` as in the paper: two log-normal times (`lognormal_times`), t the larger and r the
    smaller; then r = t except for `round(ratio_r_neq_t * n)` samples chosen at random. (The paper
    flips a coin per sample: the same in expectation. A fixed count gives every process the same
    forward passes in `meanflow_loss`, which FSDP's collectives need.)"""
    a = lognormal_times(n, p_mean, p_std, sigma_d, device, dtype, generator)
    b = lognormal_times(n, p_mean, p_std, sigma_d, device, dtype, generator)
    t, r = torch.maximum(a, b), torch.minimum(a, b)
    differ = torch.zeros(n, dtype=torch.bool, device=device)
    differ[torch.randperm(n, generator=generator, device=device)[:round(ratio_r_neq_t * n)]] = True
    return torch.where(differ, r, t), t


def meanflow_jvp(net, x_t: torch.Tensor, r: torch.Tensor, t: torch.Tensor, v: torch.Tensor, sigma_d: float,
                 labels: torch.Tensor | None = None, cond: dict | None = None, mode: str = "traced"):
    """`(F_theta, (t - r) dF/dt)`: the network's output with autograd, and its JVP along `(v, 0, 1)` on
    `(x_t, r, t)` (no graph), in F units (`u = sigma_d F`), by `fewstep.jvp.jvp` in `mode` (`JVP_MODES`)."""
    # r rides in the keyword inputs: its tangent is zero even when the caller passes t itself as r
    cond = {**(cond or {}), "r": r}
    dt = t - r
    return jvp(net, (x_t / sigma_d, t, labels), (expand_to(dt, x_t) * v / sigma_d, dt, None), cond, mode=mode)


def meanflow_loss(net, x_t: torch.Tensor, r: torch.Tensor, t: torch.Tensor, v: torch.Tensor, sigma_d: float,
                  labels: torch.Tensor | None = None, *, adaptive_p: float = 1.0, adaptive_c: float = 1e-3,
                  jvp_mode: str = "traced", cond: dict | None = None):
    """Per-sample MeanFlow loss and stats for given `x_t`, `(r, t)` and velocity `v` (the conditional
    velocity, a guided one, or a teacher's): `sg(w) ||F - sg(v / sigma_d - (t - r) dF/dt)||^2 / D`,
    `w = 1 / (||.||^2 / D + c)^p` (p = 0: plain squared error)."""
    moving = r != t
    n_moving = int(moving.sum())
    if 0 < n_moving < len(r):
        # Only the samples with r != t need the JVP (at r = t it is multiplied by 0): they take the
        # pass with tangents, the others a plain forward. Samples are permuted, moving ones first.
        order = torch.cat([moving.nonzero()[:, 0], (~moving).nonzero()[:, 0]])
        part = [order[:n_moving], order[n_moving:]]
        n = len(r)
        F_m, jvp_m = meanflow_jvp(net, x_t[part[0]], r[part[0]], t[part[0]], v[part[0]], sigma_d,
                                  _take(labels, part[0], n), _take(cond, part[0], n), jvp_mode)
        F_s = net(x_t[part[1]] / sigma_d, t[part[1]], _take(labels, part[1], n),
                  **{**_take(cond or {}, part[1], n), "r": r[part[1]].detach().clone()})
        F_theta, jvp_out = torch.cat([F_m, F_s]), torch.cat([jvp_m, torch.zeros_like(F_s.detach())])
        x_t, v = x_t[order], v[order]
    else:
        order = None
        F_theta, jvp_out = meanflow_jvp(net, x_t, r, t, v, sigma_d, labels, cond, jvp_mode)
    wide = torch.promote_types(x_t.dtype, torch.float32)  # the target and loss in float32 at least
    target = v.to(wide) / sigma_d - jvp_out.to(wide)
    mse = per_sample_mse(F_theta.to(wide) - target)
    w = (mse.detach() + adaptive_c).pow(-adaptive_p)
    loss = w * mse
    if order is not None:  # back to the batch's order
        loss = torch.empty_like(loss).index_copy(0, order, loss)
    return loss, {"mse": mse.detach().mean(), "weight_mean": w.mean()}


def _take(value, index: torch.Tensor, n: int):
    """The samples `index` of per-sample inputs (tensors of `n` rows, or such tensors in a dict)."""
    if isinstance(value, dict):
        return {k: _take(v, index, n) for k, v in value.items()}
    return value[index] if isinstance(value, torch.Tensor) and value.ndim > 0 and len(value) == n else value


@contextlib.contextmanager
def _eval_mode(net):
    """`net` in eval mode inside the block; every submodule's own mode restored after."""
    modes = [(m, m.training) for m in net.modules()] if isinstance(net, torch.nn.Module) else []
    if modes:
        net.eval()
    try:
        yield
    finally:
        for m, was in modes:
            m.training = was


@torch.no_grad()
def guided_velocity(net, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor, labels: torch.Tensor, sigma_d: float,
                    guidance: float, kappa: float = 0.0, null_label: int | None = None,
                    active: torch.Tensor | None = None) -> torch.Tensor:
    """MeanFlow's CFG field: `w v + kappa u(x_t, t, t | c) + (1 - w - kappa) u(x_t, t, t | null)` (paper
    Eq. 16 and 21), with the network's own velocities (r = t) in one batched no-grad call in eval mode
    (no dropout: the target must not depend on the dropout draws; as the official code and FastGen).
    Samples with the null label, and those outside `active` (a bool mask, e.g. a time interval), keep `v`."""
    null = int(net.num_classes if null_label is None else null_label)
    n = x_t.shape[0]
    with _eval_mode(net):
        both = net_velocity(net, torch.cat([x_t, x_t]), torch.cat([t, t]), sigma_d,
                            torch.cat([labels, torch.full_like(labels, null)]), r=torch.cat([t, t]))
    u_cond, u_null = both[:n], both[n:]
    guided = guidance * v + kappa * u_cond + (1.0 - guidance - kappa) * u_null
    keep = labels != null if active is None else (labels != null) & active
    return torch.where(expand_to(keep, v), guided.to(v.dtype), v)


@register_method("meanflow")
@dataclass
class MeanFlow(Method):
    """MeanFlow, trained from data (module docstring). Its network takes the second time r
    (`network.second_time=true`)."""

    network_options: ClassVar[dict] = {"second_time": True}  # what its network must be built with

    sigma_d: float = SIGMA_D
    p_mean: float = -0.4  # log-normal times (the paper's logit-normal, exactly; module docstring)
    p_std: float = 1.0
    ratio_r_neq_t: float = 0.25  # fraction of the batch with r != t (paper: 25%)
    adaptive_p: float = 1.0  # adaptive weight 1 / (||delta||^2 + c)^p; 0: plain squared error
    adaptive_c: float = 1e-3
    guidance: float = 1.0  # CFG scale w of the training target (1: none); needs labels and label_dropout > 0
    guidance_kappa: float = 0.0  # the paper's kappa (its Appendix); effective scale w / (1 - kappa)
    guidance_interval: list[float] | None = None  # [t_min, t_max] (TrigFlow time) where CFG applies; None: all t
    label_dropout: float = 0.0  # probability of the null label (the paper: 0.1 with CFG)
    jvp_mode: str = "traced"  # "traced" (the engine traced), "tangent" (eager), "separate" (torch.func.jvp), "single"

    def __post_init__(self):
        check_range("method.sigma_d", self.sigma_d, 0, low_open=True)
        check_range("method.p_std", self.p_std, 0, low_open=True)
        check_range("method.ratio_r_neq_t", self.ratio_r_neq_t, 0, 1)
        check_range("method.adaptive_p", self.adaptive_p, 0)
        check_range("method.adaptive_c", self.adaptive_c, 0, low_open=True)
        check_range("method.guidance", self.guidance, 0)
        check_range("method.label_dropout", self.label_dropout, 0, 1)
        check_choice("method.jvp_mode", self.jvp_mode, JVP_MODES)
        if self.guidance_kappa < 0 or self.guidance_kappa >= 1:
            raise ValueError(f"method.guidance_kappa must be in [0, 1), got {self.guidance_kappa}")
        if self.guidance_interval is not None:
            lo_hi = self.guidance_interval
            if len(lo_hi) != 2 or not 0 <= lo_hi[0] < lo_hi[1] <= HALF_PI + 1e-6:
                raise ValueError(f"method.guidance_interval must be [t_min, t_max] with 0 <= t_min < t_max <= pi/2, "
                                 f"got {lo_hi}")
        if self.guided and self.label_dropout <= 0:
            raise ValueError("method.guidance needs method.label_dropout > 0: the unconditional velocity it mixes in "
                             "is learned from the dropped labels (the paper: 0.1)")

    @property
    def guided(self) -> bool:
        return self.guidance != 1.0 or self.guidance_kappa != 0.0

    def setup(self, net, total_steps: int) -> None:
        check_second_time(net)

    def __call__(self, net, x0: torch.Tensor, labels: torch.Tensor | None = None, step: int = 0):
        check_second_time(net)
        if self.guided and (labels is None or not network_info(net).num_classes):
            raise ValueError("method.guidance needs class labels: set network.class_conditional=true "
                             "(on labelled data)")
        labels = drop_labels(labels, self.label_dropout, net)
        r, t = meanflow_times(x0.shape[0], self.p_mean, self.p_std, self.ratio_r_neq_t, self.sigma_d,
                              device=x0.device, dtype=time_dtype(x0))
        z = torch.randn_like(x0) * self.sigma_d
        x_t = trigflow_noise(x0, z, t)
        v = trigflow_velocity(x0, z, t)
        if self.guided:
            active = None
            if self.guidance_interval is not None:
                active = (t >= self.guidance_interval[0]) & (t <= self.guidance_interval[1])
            v = guided_velocity(net, x_t, t, v, labels, self.sigma_d, self.guidance, self.guidance_kappa,
                                active=active)
        return meanflow_loss(net, x_t, r, t, v, self.sigma_d, labels, adaptive_p=self.adaptive_p,
                             adaptive_c=self.adaptive_c, jvp_mode=self.jvp_mode)

    def sampler(self, net, step=None):
        """Flow-map sampling with the average velocity u(z, r, t)."""
        from fewstep.core.samplers import FlowMapSampler

        return FlowMapSampler(net, self.sigma_d, guidance_input=network_info(net).guidance_input)


__all__ = ["JVP_MODES", "PY_MEANFLOW_CIFAR10", "MeanFlow", "check_second_time", "guided_velocity", "meanflow_jvp",
           "meanflow_loss", "meanflow_times"]
