"""The continuous-time consistency (sCM) objective shared by sCT and sCD (docs/math.md#sct-and-scd).

Given `x_t`, `t` and the ODE direction `dx_t/dt` (sCT: the conditional velocity; sCD: the
teacher's velocity), with `theta^- = stopgrad(theta)`:

    F^-, jvp_out = jvp(F, (x_t / sigma_d, t), (cos t sin t dx_t/dt, cos t sin t sigma_d))   # docs/math.md#the-jvp-rearrangement
                                                                      # (`fewstep.jvp.jvp`, any mode)
    g = -cos^2 t (sigma_d F^- - dx_t/dt) - r (cos t sin t x_t + jvp_out)                     # = cos t df/dt
    g = g / (||g|| + c)                                                                       # tangent normalization
    L = exp(w(t)) / D || F_theta - F^- - g ||^2 - w(t)                                        # docs/math.md#the-loss

`jvp_out` already equals `sigma_d cos t sin t dF^-/dt`; the rearrangement keeps every factor
bounded near t = pi/2, which is what keeps fp16 finite.
"""

from __future__ import annotations

import torch

from fewstep.core.trigflow import expand_to
from fewstep.jvp import JVP_MODES, forward_ad_attention, jvp
from fewstep.methods.common import adaptive_weighting, per_sample_mse

TANGENT_NORMS = ("l2", "rms", "clip", "none")


def _cond(guidance, cond: dict | None = None) -> dict:
    """Keyword inputs besides `(x, t, labels)`: the CFG scale of a guidance-conditioned student, and
    any other cond of the network contract (e.g. `text`, `text_mask`), constant along the tangent."""
    return {**(cond or {}), **({} if guidance is None else {"guidance": guidance})}


def scm_jvp(net, x_t: torch.Tensor, t: torch.Tensor, dxdt: torch.Tensor, sigma_d: float,
            labels: torch.Tensor | None = None, guidance=None, mode: str = "traced", cond: dict | None = None):
    """`(F, sigma_d cos t sin t dF/dt)` at `(x_t / sigma_d, t)` along `dx_t/dt`, by `fewstep.jvp.jvp`:
    `F` with autograd (unless called under `torch.no_grad()`), the JVP without a graph."""
    cs = torch.cos(t) * torch.sin(t)
    return jvp(net, (x_t / sigma_d, t, labels), (expand_to(cs, x_t) * dxdt, cs * sigma_d, None), _cond(guidance, cond),
               mode=mode)


def scm_tangent(x_t, t, dxdt, F_minus, jvp_out, sigma_d: float, r: float = 1.0) -> torch.Tensor:
    """`g = cos(t) df^-/dt` from the JVP output (docs/math.md#the-loss), before normalization."""
    cos, sin = torch.cos(expand_to(t, x_t)), torch.sin(expand_to(t, x_t))
    return -cos.square() * (sigma_d * F_minus - dxdt) - r * (cos * sin * x_t + jvp_out)


def normalize_tangent(g: torch.Tensor, kind: str = "l2", c: float = 0.1) -> torch.Tensor:
    """Tangent normalization per sample: `g / (||g|| + c)` ('l2', the paper),
    `g / (||g|| / sqrt(D) + c)` ('rms': the same c at every resolution), clip to [-1, 1]
    ('clip'), or nothing ('none')."""
    if kind == "none":
        return g
    if kind == "clip":
        return g.clamp(-1.0, 1.0)
    norm = torch.linalg.vector_norm(g.flatten(1), dim=1)
    if kind == "rms":
        norm = norm / (g[0].numel() ** 0.5)
    elif kind != "l2":
        raise ValueError(f"tangent_norm must be one of {TANGENT_NORMS}, got {kind!r}")
    return g / expand_to(norm + c, g)


def tangent_warmup(step: int, warmup_steps: int) -> float:
    """Tangent warmup `r`: linear from 0 to 1 over the first `warmup_steps` iterations."""
    return 1.0 if warmup_steps <= 0 else min(1.0, step / warmup_steps)


def scm_loss(net, x_t, t, dxdt, sigma_d: float, labels=None, *, r: float = 1.0,
             tangent_norm: str = "l2", norm_const: float = 0.1, adaptive_weight: bool = True,
             jvp_mode: str = "traced", guidance=None, cond: dict | None = None):
    """Per-sample sCM loss and stats for given `x_t`, `t` and `dx_t/dt` (docs/math.md#sct-and-scd).
    `guidance`: the per-sample CFG scale a guidance-conditioned student (sCD) takes as input;
    `cond`: other keyword inputs of the network (a text-to-image student's `text`, `text_mask`)."""
    F_theta, jvp_out = scm_jvp(net, x_t, t, dxdt, sigma_d, labels, guidance, mode=jvp_mode, cond=cond)
    F_minus = F_theta.detach()  # theta^- = stopgrad(theta): the same pass, so the same dropout masks

    # Tangent math in float32 at least, whatever precision the network ran in.
    wide = torch.promote_types(x_t.dtype, torch.float32)
    g = scm_tangent(x_t.to(wide), t.to(wide), dxdt.to(wide), F_minus.to(wide), jvp_out.to(wide), sigma_d, r)
    g_norm = torch.linalg.vector_norm(g.flatten(1), dim=1)
    g = normalize_tangent(g, tangent_norm, norm_const)
    mse = per_sample_mse(F_theta.to(wide) - F_minus.to(wide) - g)
    loss, w = adaptive_weighting(mse, net, t, adaptive_weight)
    stats = {"mse": mse.detach().mean(), "tangent_norm": g_norm.mean()}
    if w is not None:
        stats["w_mean"] = w.detach().mean()
    return loss, stats


__all__ = ["JVP_MODES", "TANGENT_NORMS", "forward_ad_attention", "normalize_tangent", "scm_jvp", "scm_loss",
           "scm_tangent", "tangent_warmup"]
