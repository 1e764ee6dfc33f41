"""Tangent rules: the forward-mode derivative of each op, computed without a graph.

The sCM objective needs `F_theta(x, t)` (graded) and its JVP `dF^-/dt` with
`theta^- = stopgrad(theta)` (SPEC 2.2). Because the target network IS the trained one, the
JVP's primal output is the graded forward: each layer's `forward_tangent(x, x_dot, ...)`
computes `y` with ordinary, autograd-recorded ops and `y_dot` with the rules below, which run
under `torch.no_grad()` on detached values. The step then costs one forward, one tangent pass
(about one forward of FLOPs) and one backward, with the activation memory of a plain forward:
no weight tangents (the weights are constants of the JVP), no graph through the tangent.

Each rule takes the primal input (and the primal intermediates the forward already has) and
the input tangent, and returns the output tangent only.

Normalizations and pointwise activations have symmetric Jacobians, so their JVP equals their
VJP: the rules call ATen's fused backward kernels with the tangent in place of the gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------------------------------------
# Linear maps: the tangent goes through the same map without its bias (SPEC 2.2: no weight
# tangent, theta^- is a constant).


@torch.no_grad()
def affine_tangent(module: nn.Module, x_dot: torch.Tensor) -> torch.Tensor:
    """Tangent of `nn.Linear`, `nn.Conv{1,2,3}d` or `nn.Identity`: `W x_dot`."""
    if isinstance(module, nn.Identity):
        return x_dot
    if isinstance(module, nn.Linear):
        return F.linear(x_dot, module.weight)
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return module._conv_forward(x_dot, module.weight, None)  # handles every padding mode
    raise TypeError(f"no tangent rule for {type(module).__name__}")


def affine_forward_tangent(module: nn.Module, x: torch.Tensor, x_dot: torch.Tensor):
    """`(module(x), W x_dot)` for a Linear, Conv or Identity module."""
    return module(x), affine_tangent(module, x_dot)


# ---------------------------------------------------------------------------------------------
# Pointwise activations: y_dot = f'(x) x_dot.


@torch.no_grad()
def silu_tangent(x: torch.Tensor, x_dot: torch.Tensor) -> torch.Tensor:
    """`x_dot * sigmoid(x) (1 + x (1 - sigmoid(x)))` in one fused kernel."""
    x_dot = x_dot.to(x.dtype)
    return torch.ops.aten.silu_backward(x_dot, x)


def silu_forward_tangent(x: torch.Tensor, x_dot: torch.Tensor):
    return F.silu(x), silu_tangent(x, x_dot)


@torch.no_grad()
def gelu_tangent(x: torch.Tensor, x_dot: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """`x_dot * GELU'(x)` (exact erf form, or the tanh approximation)."""
    x_dot = x_dot.to(x.dtype)
    return torch.ops.aten.gelu_backward(x_dot, x, approximate=approximate)


# ---------------------------------------------------------------------------------------------
# Normalizations. With xhat = (x - mean) * rstd over a group of n elements,
#   xhat_dot = rstd * (x_dot - mean(x_dot) - xhat * mean(xhat * x_dot)),
# whose Jacobian is symmetric: it is exactly what the normalization's backward computes.


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4
        return torch.is_autocast_enabled() if device_type == "cuda" else torch.is_autocast_cpu_enabled()


def _norm_args(x, weight, bias):
    """Autocast runs group/layer norm in float32; do the same for the native ops it would call."""
    if _autocast_on(x.device.type):
        x = x.float()
        weight = None if weight is None else weight.float()
        bias = None if bias is None else bias.float()
    return x.contiguous(), weight, bias


def group_norm_forward_tangent(x: torch.Tensor, x_dot: torch.Tensor, num_groups: int,
                               weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                               eps: float = 1e-5):
    """`(F.group_norm(x, ...), its tangent)` for x of shape (N, C, *)."""
    x, weight, bias = _norm_args(x, weight, bias)
    n, c = x.shape[:2]
    hw = x[0, 0].numel()
    # native_group_norm is what F.group_norm runs; it also returns the statistics.
    y, mean, rstd = torch.native_group_norm(x, weight, bias, n, c, hw, num_groups, eps)
    with torch.no_grad():
        x_dot = x_dot.to(x.dtype).contiguous()
        y_dot = torch.ops.aten.native_group_norm_backward(
            x_dot, x, mean, rstd, None, n, c, hw, num_groups, [True, False, False])[0]
        if weight is not None:
            y_dot = y_dot * weight.reshape(1, c, *([1] * (x.ndim - 2)))
    return y, y_dot


def layer_norm_forward_tangent(x: torch.Tensor, x_dot: torch.Tensor, normalized_shape,
                               weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                               eps: float = 1e-5):
    """`(F.layer_norm(x, ...), its tangent)`."""
    x, weight, bias = _norm_args(x, weight, bias)
    normalized_shape = list(normalized_shape)
    y, mean, rstd = torch.native_layer_norm(x, normalized_shape, weight, bias, eps)
    with torch.no_grad():
        x_dot = x_dot.to(x.dtype).contiguous()
        y_dot = torch.ops.aten.native_layer_norm_backward(
            x_dot, x, normalized_shape, mean, rstd, None, None, [True, False, False])[0]
        if weight is not None:
            y_dot = y_dot * weight
    return y, y_dot


def norm_forward_tangent(norm: nn.Module, x: torch.Tensor, x_dot: torch.Tensor):
    """`(norm(x), tangent)` for an `nn.GroupNorm` or `nn.LayerNorm` module."""
    if isinstance(norm, nn.GroupNorm):
        return group_norm_forward_tangent(x, x_dot, norm.num_groups, norm.weight, norm.bias, norm.eps)
    if isinstance(norm, nn.LayerNorm):
        return layer_norm_forward_tangent(x, x_dot, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    raise TypeError(f"no tangent rule for {type(norm).__name__}")


@torch.no_grad()
def pnorm_tangent(v: torch.Tensor, v_dot: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Tangent of `pnorm(v) = v r`, `r = rsqrt(mean_c(v^2) + eps)`:
    `r (v_dot - v r^2 mean_c(v v_dot))` (channel dim 1)."""
    r = torch.rsqrt(v.square().mean(dim=1, keepdim=True) + eps)
    proj = (v * v_dot).mean(dim=1, keepdim=True) * r.square()
    return r * (v_dot - v * proj)


# ---------------------------------------------------------------------------------------------
# Dropout: ONE mask, shared by the primal and the tangent.


def dropout_forward_tangent(x: torch.Tensor, x_dot: torch.Tensor, p: float, training: bool):
    """`(dropout(x), the same mask applied to x_dot)`.

    `torch.native_dropout` returns its mask; on CPU it draws the same mask as `F.dropout`
    from the same RNG state.
    """
    if not training or p == 0.0:
        return x, x_dot
    if p >= 1.0:
        return x * 0.0, torch.zeros_like(x_dot)
    y, mask = torch.native_dropout(x, p, True)
    with torch.no_grad():
        y_dot = x_dot * mask * (1.0 / (1.0 - p))
    return y, y_dot


# ---------------------------------------------------------------------------------------------
# Generic modules.


@torch.no_grad()
def add_tangents(fresh: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """`fresh + other` (a residual sum), in place in `fresh` (a temporary nothing else holds)
    unless that would lower the precision (e.g. a bfloat16 branch under autocast)."""
    if torch.promote_types(fresh.dtype, other.dtype) == fresh.dtype:
        return fresh.add_(other)
    return fresh + other


def module_forward_tangent(module: nn.Module, x: torch.Tensor, x_dot: torch.Tensor):
    """`(module(x), tangent)` for a module with its own `forward_tangent(x, x_dot)` or one of
    the standard layers above, including an `nn.Sequential` of them."""
    if hasattr(module, "forward_tangent"):
        return module.forward_tangent(x, x_dot)
    if isinstance(module, nn.Sequential):
        for layer in module:
            x, x_dot = module_forward_tangent(layer, x, x_dot)
        return x, x_dot
    if isinstance(module, (nn.Identity, nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return affine_forward_tangent(module, x, x_dot)
    if isinstance(module, nn.SiLU):
        return silu_forward_tangent(x, x_dot)
    if isinstance(module, nn.GELU):
        return F.gelu(x, approximate=module.approximate), gelu_tangent(x, x_dot, module.approximate)
    if isinstance(module, (nn.GroupNorm, nn.LayerNorm)):
        return norm_forward_tangent(module, x, x_dot)
    if isinstance(module, nn.Dropout):
        return dropout_forward_tangent(x, x_dot, module.p, module.training)
    raise TypeError(f"no tangent rule for {type(module).__name__}")


# ---------------------------------------------------------------------------------------------
# Attention (SPEC 6): S = Q K^T / sqrt(d), P = softmax(S), O = P V,
#   S' = (Q' K^T + Q K'^T) / sqrt(d),  mu_i = sum_j P_ij S'_ij,  O' = (P * S') V - mu O + P V'.

@torch.no_grad()
def attention_tangent(q, k, v, p, o, q_dot, k_dot, v_dot) -> torch.Tensor:
    """`O'` of SPEC 6 from the primal `q, k, v`, the probabilities `p` and the output `o`."""
    scale = q.shape[-1] ** -0.5
    s_dot = (q_dot @ k.transpose(-1, -2) + q @ k_dot.transpose(-1, -2)) * scale
    ps = s_dot.mul_(p) if s_dot.dtype == p.dtype else p * s_dot
    mu = ps.sum(dim=-1, keepdim=True)
    return (ps @ v + p @ v_dot) - mu * o


def attention_forward_tangent(q, k, v, q_dot, k_dot, v_dot):
    """Softmax attention and its exact tangent; q, k, v: (B, heads, N, d).

    The primal ops are those of `layers.math_attention`; the probabilities it already holds
    (autograd saves them for the backward) feed the tangent, so nothing is recomputed.
    """
    scores = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5)
    p = torch.softmax(scores, dim=-1)
    o = p @ v
    return o, attention_tangent(q, k, v, p, o, q_dot, k_dot, v_dot)
