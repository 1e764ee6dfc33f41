"""The tangent engine for unmodified networks (fewstep.jvp.engine, issue #10).

References: `torch.func.jvp` of each op in float64 (every rule), float64 central finite
differences of whole networks (fewstep's UNet and MLP, a reference DiT written here, diffusers'
UNet2DModel when installed).
"""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from fewstep.networks import MLP, UNet
from fewstep.jvp import JVP_MODES, NoTangentRuleError, check_tangent, jvp, tangent_forward, tangent_rule
from helpers import DropoutNet

DT = torch.float64
TOL = 1e-6


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def r(*shape):
    return torch.randn(*shape, dtype=DT)


# ---------------------------------------------------------------------------------------------
# Each rule against torch.func.jvp of its op (float64). op: (fn, primals, which have tangents)

W, B, CW = r(5, 4), r(5), r(6, 3, 3, 3)
G, BETA = r(6), r(6)
MASK = torch.rand(3, 3) > 0.3
MASK.fill_diagonal_(True)

OPS = {
    "linear": (lambda x: F.linear(x, W, B), (r(2, 4),)),
    "linear_weight_tangent": (lambda x, w: F.linear(x, w, B), (r(2, 4), r(5, 4))),
    "conv1d": (lambda x: F.conv1d(x, CW[:, :, :, 0], B.new_ones(6), padding=1), (r(2, 3, 7),)),
    "conv2d": (lambda x: F.conv2d(x, CW, None, stride=2, padding=1), (r(2, 3, 6, 6),)),
    "group_norm": (lambda x: F.group_norm(x, 3, G, BETA, 1e-5), (r(2, 6, 3, 3),)),
    "group_norm_plain": (lambda x: F.group_norm(x, 2), (r(2, 6, 4),)),
    "layer_norm": (lambda x: F.layer_norm(x, (6,), G, BETA), (r(3, 6),)),
    "layer_norm_affine_tangents": (lambda x, g, b: F.layer_norm(x, (6,), g, b), (r(3, 6), r(6), r(6))),
    "silu": (F.silu, (r(7),)),
    "gelu": (F.gelu, (r(7),)),
    "gelu_tanh": (lambda x: F.gelu(x, approximate="tanh"), (r(7),)),
    "relu": (torch.relu, (r(7),)),
    "sigmoid": (torch.sigmoid, (r(7),)),
    "tanh": (torch.tanh, (r(7),)),
    "softmax": (lambda x: F.softmax(x, dim=-1), (r(3, 5),)),
    "log_softmax": (lambda x: x.log_softmax(0), (r(3, 5),)),
    "exp": (torch.exp, (r(7),)),
    "sin": (torch.sin, (r(7),)),
    "cos": (lambda x: x.cos(), (r(7),)),
    "log": (lambda x: torch.log(x.abs() + 1), (r(7),)),
    "sqrt": (lambda x: (x * x + 1).sqrt(), (r(7),)),
    "rsqrt": (lambda x: torch.rsqrt(x * x + 1), (r(7),)),
    "pow": (lambda x: x ** 3 + x.pow(2) + (x * x + 1) ** 0.5, (r(7),)),
    "rpow": (lambda x: 2.0 ** x, (r(7),)),
    "add_sub_broadcast": (lambda a, b: a + b - 2 * b + torch.add(a, b, alpha=3) - (1 - a), (r(3, 4), r(4))),
    "mul_div_broadcast": (lambda a, b: a * b / (b * b + 1) + 2 / (a * a + 1) - a / 3, (r(3, 1), r(4))),
    "neg": (lambda a: -a + torch.neg(a), (r(4),)),
    "views": (lambda x: x.view(2, 12).reshape(4, 6).permute(1, 0).transpose(0, 1).flatten()
              .unsqueeze(0).squeeze(0).reshape(2, 3, 4).expand(2, 2, 3, 4).contiguous()[:, 1, ::2, 1:]
              .mT, (r(2, 3, 4),)),
    "T_2d": (lambda x: x.T @ x, (r(3, 2),)),
    "chunk_split_unbind": (lambda x: sum(c.sum() for c in x.chunk(2, 1)) * x.split(1, 0)[1]
                           + torch.stack(x.unbind(0), 1).sum(1), (r(2, 4),)),
    "cat_stack_constant": (lambda x: torch.cat([x, B[:4].expand(2, 4)], 1)
                           + torch.stack([x, x], 0).mean(0).repeat(1, 2),
                           (r(2, 4),)),
    "interpolate_nearest": (lambda x: F.interpolate(x, scale_factor=2.0, mode="nearest"), (r(1, 2, 3, 3),)),
    "interpolate_bilinear": (lambda x: F.interpolate(x, size=(5, 5), mode="bilinear"), (r(1, 2, 3, 3),)),
    "avg_pool_pad": (lambda x: F.pad(F.avg_pool2d(x, 2), (1, 1, 1, 1), value=3.0), (r(1, 2, 4, 4),)),
    "mean_sum": (lambda x: x.mean(1, keepdim=True) * x.sum() + x.sum((0, 1)), (r(2, 3),)),
    "matmul_bmm": (lambda a, b: (a @ b) + torch.bmm(a, b) + torch.matmul(a, b[0]), (r(2, 3, 4), r(2, 4, 3))),
    "einsum": (lambda a, b: torch.einsum("bij,bjk->bik", a, b), (r(2, 3, 4), r(2, 4, 3))),
    "sdpa": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v), (r(2, 2, 3, 4), r(2, 2, 3, 4), r(2, 2, 3, 4))),
    "sdpa_causal": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3),
                    (r(1, 2, 3, 4), r(1, 2, 3, 4), r(1, 2, 3, 4))),
    "sdpa_bool_mask": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=MASK),
                       (r(1, 2, 3, 4), r(1, 2, 3, 4), r(1, 2, 3, 4))),
    "sdpa_float_mask_q_only": (lambda q: F.scaled_dot_product_attention(q, W[None, :3, :3].mT, W[None, :3, :3],
                                                                      attn_mask=W[:3, :3]),
                               (r(1, 3, 3),)),
    "clamp": (lambda x: x.clamp(-0.5, 0.7) + torch.clamp(x, min=B * 0.1) + x.clamp_min(0.2) + torch.clamp_max(x, 0.3)
              + x.clip(max=0.1), (r(5),)),
    "dropout_eval": (lambda x: F.dropout(x, 0.5, training=False), (r(5),)),
    "embedding_plus": (lambda x: x + F.embedding(torch.tensor([0, 2]), W), (r(2, 4),)),
    "where_number": (lambda x: torch.where(x > 0, 2 * x, 1.0) + x.where(x < 0.5, torch.zeros(())), (r(3, 4),)),
    "where_getitem_setitem": (lambda x: _setitem(torch.where(x > 0, x, 2 * x)), (r(3, 4),)),
    "inplace_methods": (lambda x: _inplace(x), (r(3, 4),)),
}


def _setitem(y):
    y = y.clone()
    y[0] = y[1] * 3
    y[:, 1] = 0.5
    return y


def _inplace(x):
    y = x * 1.0
    y.mul_(2).add_(x).sin_()
    y += x
    y[0].zero_()  # a view modified in place: y keeps its (stale) tangent, row 0 is re-set below
    y[0] = x[0] * 2
    return F.relu(F.silu(y, True) - 0.1, inplace=True)


@pytest.mark.parametrize("name", list(OPS))
def test_rule_matches_func_jvp(name):
    fn, primals = OPS[name]
    tangents = tuple(torch.randn_like(p) for p in primals)
    out, tout, mode = tangent_forward(fn, primals, tangents, debug=True)
    with sdpa_kernel(SDPBackend.MATH):  # fused CPU attention has no forward-mode AD
        ref_out, ref_t = torch.func.jvp(fn, primals, tangents)
    assert torch.allclose(out, ref_out, rtol=1e-12, atol=1e-12)
    assert rel(tout, ref_t) <= TOL
    assert all(err is not None for _, err in mode.record), f"ops without a rule: {mode.record}"


def test_structured_outputs():
    x = r(3)
    out, tout = tangent_forward(lambda x: (x.sin(), None, {"y": 2 * x, "k": torch.ones(2)}), (x,), (torch.ones(3),))
    assert tout[1] is None and torch.equal(tout[2]["k"], torch.zeros(2))
    assert torch.allclose(tout[0], x.cos()) and torch.equal(tout[2]["y"], 2 * torch.ones(3, dtype=DT))


def test_sdpa_dropout_refuses():
    q = r(1, 2, 3, 4)
    with pytest.raises(NotImplementedError, match="dropout_p"):
        tangent_forward(lambda q: F.scaled_dot_product_attention(q, q, q, dropout_p=0.5), (q,), (q,))


def test_op_without_rule_falls_back_and_warns_once():
    x = r(5).abs() + 0.5
    fn = lambda x: torch.lgamma(x) + torch.lgamma(2 * x)  # noqa: E731
    with pytest.warns(UserWarning, match="no tangent rule") as record:
        out, tout = tangent_forward(fn, (x,), (torch.ones_like(x),))
    assert sum("lgamma" in str(w.message) for w in record) == 1
    assert torch.allclose(tout, torch.digamma(x) + 2 * torch.digamma(2 * x))


# ---------------------------------------------------------------------------------------------
# Transposed convolutions and the less common activations, against float64 central finite
# differences, eager and traced. op: (fn, primals); every primal gets a tangent.


def _pos(*shape):  # inputs away from log1p's pole
    return torch.rand(*shape, dtype=DT) + 0.1


def _inplace_forms(x):
    y = x * 1.0
    y.tan_().log1p_().expm1_()  # tan(x) > -1 for |x| < 0.7
    z = x * 2.0
    F.elu(z, 0.7, inplace=True)
    F.leaky_relu_(z, 0.2)
    return y + z + torch.selu_(x * 3.0) + F.hardtanh(x * 4.0, -0.5, 2.0, inplace=True)


RUN_MEAN, RUN_VAR = r(3), torch.rand(3, dtype=DT) + 0.5
IDX = torch.tensor([3, 0, 3])
TIE_A = r(2, 5)
TIE_B = torch.where(torch.tensor([True, False, True, False, True]), TIE_A, r(2, 5))  # every other entry ties


def _inplace_common(x, a):
    y = x * 1.0
    y.masked_fill_(MASK[:, :1], 0.5)
    y.addcmul_(a[:3, :4], x.cos(), value=0.3).addcdiv_(x, a[:3, 1:] ** 2 + 1).lerp_(x.sin(), 0.25)
    return y.sum(1) + x.new_zeros(3, 5).addmm_(x, a, beta=0.5).sum(1)


SCATTER_IDX = torch.tensor([[0, 2], [3, 1], [1, 0]])  # no repeats in a row: scatter's overwrite is defined
ROWS = torch.tensor([2, 0, 2])
NAN_A = torch.where(torch.tensor([True, False, True, True, False, True]), r(6), math.nan)
NAN_B = torch.where(torch.tensor([False, True, True, True, True, False]), r(6), math.nan)
CUMPROD_X = torch.tensor([[0.5, 0.0, 1.5, -2.0, 0.7], [1.2, 0.0, -0.8, 0.0, 1.1], [0.9, -1.3, 0.6, 1.4, 0.0]],
                         dtype=DT)  # a zero, two zeros, a last zero


NORM_X = torch.tensor([[0.5, -1.2, 0.8, 1.2], [0.0, 0.0, 0.0, 0.0], [0.7, 0.0, -1.5, 0.3]], dtype=DT)  # a tie
# for row 0's largest |x|, a zero row, a zero entry (p < 1 only where central differences are smooth)
NAN_INF = torch.where(torch.tensor([True, True, False, True, True, True]), NAN_A, math.inf) * torch.tensor(
    [1.0, 1.0, 1.0, -1.0, 1.0, 1.0], dtype=DT)


def _row_abs_max_twice():
    x = r(3, 4)
    x[0, 3] = -x[0].abs().max()
    return x


def _row_max_twice():
    x = r(3, 4)
    x[:, 3] = x[:, :3].max(1).values
    return x


MORE_OPS = {
    "conv_transpose1d": (lambda x, w, b: F.conv_transpose1d(x, w, b, stride=2, padding=1, output_padding=1),
                         (r(2, 4, 5), r(4, 3, 3), r(3))),
    "conv_transpose2d_groups": (lambda x, w, b: F.conv_transpose2d(x, w, b, 2, 1, 1, 2),
                                (r(2, 4, 5, 5), r(4, 3, 3, 3), r(6))),
    "conv_transpose3d_dilation": (lambda x, w: F.conv_transpose3d(x, w, None, 1, 1, 0, 1, 2),
                                  (r(1, 2, 3, 4, 4), r(2, 2, 2, 3, 3))),
    "tan": (lambda x: torch.tan(x) + x.tan(), (torch.rand(7, dtype=DT) * 2 - 1,)),
    "log1p": (lambda x: torch.log1p(x) + torch.special.log1p(x), (_pos(7),)),
    "expm1": (lambda x: torch.expm1(x) + x.expm1(), (r(7),)),
    "atan": (lambda x: torch.atan(x) + torch.arctan(2 * x), (r(7),)),
    "asinh": (lambda x: torch.asinh(x) + x.arcsinh(), (r(7),)),
    "sinh_cosh": (lambda x: torch.sinh(x) * torch.cosh(x), (r(7),)),
    "erf": (lambda x: torch.erf(x) + torch.special.erf(x / 2), (r(7),)),
    "reciprocal": (lambda x: torch.reciprocal(x), (_pos(7),)),
    "softplus": (lambda x: F.softplus(x) + F.softplus(x, beta=2.0, threshold=1.0), (r(7) * 2,)),
    "logsigmoid": (F.logsigmoid, (r(7) * 3,)),
    "mish": (F.mish, (r(7) * 2,)),
    "hardswish": (F.hardswish, (r(9) * 3,)),
    "hardsigmoid": (F.hardsigmoid, (r(9) * 3,)),
    "hardtanh_relu6": (lambda x: F.hardtanh(x, -0.5, 2.0) + F.relu6(x * 4), (r(9) * 2,)),
    "leaky_relu": (lambda x: F.leaky_relu(x) + F.leaky_relu(x, 0.2), (r(9),)),
    "elu_selu_celu": (lambda x: F.elu(x, 0.7) + F.selu(x) + F.celu(x, 1.5), (r(9),)),
    "softsign_tanhshrink": (lambda x: F.softsign(x) + F.tanhshrink(x), (r(9),)),
    "inplace_forms": (_inplace_forms, (torch.rand(9, dtype=DT) - 0.5,)),
    # normalizations, reductions and the common fused and indexing ops
    "rms_norm": (lambda x, w: F.rms_norm(x, (4,), w) + torch.rms_norm(x, (3, 4), eps=1e-3) + F.rms_norm(x, (4,)),
                 (r(2, 3, 4), r(4))),
    "batch_norm_train": (lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True, eps=1e-3)
                         + F.batch_norm(x, torch.zeros(3, dtype=DT), torch.ones(3, dtype=DT), training=True),
                         (r(4, 3, 2, 2), r(3), r(3))),
    "batch_norm_eval": (lambda x, w, b: F.batch_norm(x, RUN_MEAN, RUN_VAR, w, b, training=False, eps=1e-3),
                        (r(4, 3, 5), r(3), r(3))),
    "instance_norm": (lambda x, w, b: F.instance_norm(x, weight=w, bias=b, eps=1e-4)
                      + F.instance_norm(x, RUN_MEAN, RUN_VAR, use_input_stats=False), (r(2, 3, 3, 3), r(3), r(3))),
    "normalize": (lambda x: F.normalize(x) + F.normalize(x, p=3.0, dim=-1) + F.normalize(x, p=1.0, dim=0)
                  + F.normalize(x * 1e-14, eps=1e-12), (r(3, 4),)),
    "addmm_baddbmm": (lambda i, a, b, ib: torch.addmm(i, a, b, beta=0.5, alpha=2.0) + i.addmm(a, b)
                      + torch.baddbmm(ib, a.expand(2, 3, 4), b.expand(2, 4, 5), alpha=-1.5).sum(0)
                      + torch.addmm(i[0], a, b, beta=0) + torch.addmv(i[:, 0], a, b[:, 0])[:, None]
                      + torch.addr(i, a[:, 0], b[0]), (r(3, 5), r(3, 4), r(4, 5), r(2, 3, 5))),
    "masked_fill": (lambda x, v: x.masked_fill(MASK, -2.0) + torch.masked_fill(x, ~MASK, v)
                    + x.masked_fill(MASK[0], v), (r(3, 3), r(()))),
    "lerp": (lambda x, e, w: torch.lerp(x, e, w) + x.lerp(e, 0.3) + torch.lerp(x, e, w[0]), (r(3, 4), r(3, 4), r(4))),
    "addcmul_addcdiv": (lambda i, a, b: torch.addcmul(i, a, b, value=0.5) + i.addcdiv(a, b * b + 1, value=-2.0)
                        + torch.addcdiv(i, a, b.abs() + 1), (r(3, 4), r(3, 4), r(4))),
    "maximum_minimum_ties": (lambda a, b: torch.maximum(a, b) + torch.minimum(a, b) * 3 + torch.max(a, b[0])
                             + torch.min(a, b), (TIE_A, TIE_B)),
    "max_min_reductions": (lambda x: x.max() + torch.min(x, 1).values.sum() + x.max(dim=0, keepdim=True)[0].sum()
                           + x.amax(1).sum() + torch.amin(x, (0, 1), keepdim=True).sum(), (r(3, 4),)),
    # two entries tie for each row's maximum: the mean of their tangents, as central differences see it
    "amax_max_ties": (lambda x: x.amax(1) + x.max() + torch.amax(x, (0, 1), keepdim=True)[0], (_row_max_twice(),)),
    "steps": (lambda x: x * x.round() + torch.floor(x) * x.sign() + x.ceil() - torch.trunc(x) * x, (r(3, 4) * 3,)),
    "logsumexp": (lambda x: torch.logsumexp(x, 1) + x.logsumexp((0, 1), keepdim=True)[0]
                  + torch.logsumexp(x.masked_fill(F.pad(MASK, (0, 1)), float("-inf")), dim=-1), (r(3, 4),)),
    "var_std": (lambda x: x.var() + torch.var(x, 1) + x.std(0, True, True).sum() + torch.std(x, dim=1, correction=0)
                + x.var(dim=(0, 1), unbiased=False) + torch.std(x, False) + x.var(1, correction=2.5)
                + sum(torch.var_mean(x, 1)) + torch.std_mean(x, dim=0, keepdim=True)[0].sum(), (r(3, 4),)),
    "embedding": (lambda w: F.embedding(torch.tensor([[0, 2, 2], [1, 0, 3]]), w, padding_idx=0) * 2, (r(4, 5),)),
    "inplace_common": (lambda x, a: _inplace_common(x, a), (r(3, 4), r(4, 5))),
    "glu": (lambda x: F.glu(x) + F.glu(x.T, dim=0).T, (r(4, 6),)),
    "index_select_gather": (lambda x: x.index_select(1, IDX) + torch.gather(x, 1, IDX.expand(3, 3))
                            + torch.take_along_dim(x, IDX[None], 1), (r(3, 4),)),
    # the last common ops that fell back to forward-mode AD
    "fmax_fmin_nan": (lambda a, b: torch.fmax(a, b) + torch.fmin(a, other=b) * 3 + a.fmax(b), (NAN_A, NAN_B)),
    "scatter": (lambda x, s: x.scatter(1, SCATTER_IDX, s) + torch.scatter(x, 1, SCATTER_IDX, 0.5)
                + torch.scatter(x, 1, SCATTER_IDX, src=s)
                + x.scatter_add(1, SCATTER_IDX.fliplr().roll(1, 1), s), (r(3, 4), r(3, 2))),
    "index_add_put": (lambda x, v: x.index_add(0, ROWS, v, alpha=2.0) + torch.index_add(x, 0, ROWS, v)
                      + x.index_put((ROWS[:2],), v[:2]) + torch.index_put(x, (ROWS,), v, accumulate=True)
                      + x.index_put((ROWS[1:], IDX[:2]), v[0, :2]), (r(3, 4), r(3, 4))),
    "masked_select_scatter": (lambda x, s: torch.cat([x.masked_select(MASK), torch.masked_select(x, MASK[0]),
                                                      x.masked_scatter(MASK, s).flatten()]), (r(3, 3), r(9))),
    "scatter_inplace": (lambda x, s: _scatter_inplace(x, s), (r(3, 4), r(3, 2))),
    "torch_norms_direct": (lambda x, w, b: torch.batch_norm(x, w, b, None, None, True, 0.1, 1e-3, False)
                           + torch.batch_norm(x, w, None, RUN_MEAN, RUN_VAR, False, 0.1, 1e-3, False)
                           + torch.instance_norm(x, None, b, None, None, True, 0.1, 1e-4, False)
                           + torch.group_norm(x, 3, w, b, 1e-4, False) + torch.layer_norm(x, (5,), None, None),
                           (r(4, 3, 5), r(3), r(3))),
    "torch_embedding": (lambda w: torch.embedding(w, indices=torch.tensor([[0, 2, 2], [1, 0, 3]])) * 2, (r(4, 5),)),
    # p = inf with a two-way tie for the largest |x| in row 0: their mean, as central differences see it
    "normalize_any_p": (lambda x: F.normalize(x, p=math.inf) + F.normalize(x, p=-math.inf, dim=0)
                        + F.normalize(x, p=0.5) + F.normalize(x, p=0.0) + F.normalize(x, p=-1.5, dim=-1),
                        (_row_abs_max_twice(),)),
    "cumsum_cumprod": (lambda x: torch.cumsum(x, 1) + x.cumsum(0) + torch.cumprod(x, 1) + x.cumprod(0)
                       + torch.cumprod(x[:1], -1, dtype=DT), (CUMPROD_X,)),
    "clamp_tensor_bounds": (lambda x, lo: torch.clamp(x, lo, lo + 1) + x.clamp(min=lo) + torch.clamp_max(x, lo)
                            + x.clip(None, lo.exp()) + torch.clamp(x, lo + 1, lo), (r(3, 4), r(4))),
    "grid_sample": (lambda x, g: F.grid_sample(input=x, grid=g, align_corners=False)
                    + F.grid_sample(x, g, "nearest", "border", align_corners=True)
                    + F.grid_sample(x, g * 1.2, "bicubic", "reflection", align_corners=True)
                    + F.grid_sample(x, g * 1.1, "bilinear", "border", align_corners=False),
                    (r(2, 3, 4, 5), torch.rand(2, 3, 2, 2, dtype=DT) * 2 - 1)),
    "grid_sample_3d": (lambda x, g: F.grid_sample(x, g, align_corners=True)
                       + F.grid_sample(x, g * 1.2, padding_mode="reflection", align_corners=False),
                       (r(1, 2, 3, 4, 3), torch.rand(1, 2, 3, 2, 3, dtype=DT) * 2 - 1)),
    # the second pass: norms, max pooling, sorting and the rest that fell back to forward-mode AD
    "vector_norms": (lambda x: torch.linalg.vector_norm(x, dim=1) + torch.linalg.vector_norm(x, 3.0, -1)
                     + x.norm(dim=1) + torch.norm(x, p=1, dim=1) + torch.linalg.vector_norm(x, 1.5, (1,), True)[:, 0]
                     + torch.linalg.vector_norm(x[:2], 0.5, 1).sum() + torch.linalg.vector_norm(x, -1.5, 1)
                     + torch.linalg.vector_norm(x, math.inf, 1) + torch.linalg.vector_norm(x, -math.inf, 1)
                     + torch.linalg.vector_norm(x, 0, 1) + torch.linalg.vector_norm(x, dtype=DT) + x.norm()
                     + torch.norm(x, "fro", (0, 1), True)[0] + torch.linalg.norm(x, dim=1) + torch.linalg.norm(x)
                     + torch.linalg.norm(x, 3, 1) + torch.linalg.norm(x[0], 1) + torch.norm(x, math.inf, 1),
                     (NORM_X,)),
    "max_pool": (lambda x: torch.cat([
        F.max_pool2d(x, 2).flatten(), F.max_pool2d(x, 3, 1, 1, return_indices=True)[0].flatten(),
        F.max_pool1d(x.flatten(2), 3, 2).flatten(), F.max_pool3d(x, (1, 2, 2)).flatten(),
        F.adaptive_max_pool2d(x, (2, 3)).flatten(), F.adaptive_max_pool1d(x.flatten(2), 5, True)[0].flatten(),
        nn.MaxPool2d(2, ceil_mode=True)(x[:, :, :3]).flatten(), torch.max_pool2d(x, 2).flatten(),
        F.max_pool2d(x[0], 2, dilation=2).flatten(), F.max_pool2d_with_indices(x, 2)[0].flatten(),
        F.adaptive_max_pool3d(x, (2, 1, 3)).flatten()]),
        (r(2, 3, 4, 4),)),
    "topk_sort": (lambda x: torch.cat([torch.topk(x, 2).values.flatten(), x.topk(2, 0, False)[0].flatten(),
                                       torch.sort(x).values.flatten(), x.sort(0, descending=True)[0].flatten(),
                                       torch.sort(x, stable=True, dim=0).values.flatten()]), (r(3, 4),)),
    "prod_zeros": (lambda x: torch.prod(x, 1) + x.prod(dim=1, keepdim=True)[:, 0] + torch.prod(x) + x[0].prod()
                   + x[2, :4].prod() + x.prod(0).sum() + torch.prod(x, 1, dtype=DT), (CUMPROD_X,)),
    "atan2_log2_expit": (lambda a, b: torch.atan2(a, b) + a.atan2(b) * 0.5 + torch.arctan2(b, a)
                         + torch.log2(b.abs() + 0.5) + torch.log10(a.abs() + 0.5) + torch.special.expit(a),
                         (r(3, 4), r(4))),
    "nan_to_num": (lambda x: torch.nan_to_num(x, nan=2.0) + x.nan_to_num(posinf=1.0) * 3, (NAN_INF,)),
    "softmin_diff": (lambda x: F.softmin(x, 1) + F.softmin(x, dim=0, dtype=DT)
                     + torch.diff(x, n=2, dim=1, prepend=x[:, :1] * 2, append=x[:, 1:2])
                     + x.diff(dim=0, prepend=W[:1, :4]), (r(3, 4),)),
    "unfold_fold": (lambda x: F.fold(F.unfold(x, 2, padding=1) * 2, (4, 4), 2, padding=1)
                    + x.unfold(3, 2, 2).sum(-1).repeat_interleave(2, -1), (r(2, 3, 4, 4),)),
    "native_layer_norm": (lambda x, w, b: sum(torch.native_layer_norm(x, (4,), w, b, 1e-5))
                          + torch.native_layer_norm(x, (3, 4), None, None, 1e-3)[0], (r(2, 3, 4), r(4), r(4))),
}
NO_FORWARD_AD = {"grid_sample", "grid_sample_3d"}  # no forward-mode AD formula: checked against differences only


def _scatter_inplace(x, s):
    y = x * 1.0
    y.scatter_(1, SCATTER_IDX, s).scatter_add_(0, SCATTER_IDX[:1], s[:1]).index_add_(1, IDX[:2], s)
    y.index_put_((ROWS[:2],), s[0, 0], accumulate=True).masked_scatter_(torch.tensor([True, False, True, False]), s)
    return y


class _Fn(nn.Module):
    """A function as a module: the traced mode traces modules only."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *xs):
        return self.fn(*xs)


def _fd(fn, primals, tangents, h=1e-6):
    with torch.no_grad():
        plus = fn(*(p + h * t for p, t in zip(primals, tangents)))
        minus = fn(*(p - h * t for p, t in zip(primals, tangents)))
    return (plus - minus) / (2 * h)


@pytest.mark.parametrize("name", list(MORE_OPS))
def test_more_rules_against_finite_differences_eager_and_traced(name):
    from fewstep.jvp.traced import repeated_calls, runner_of

    fn, primals = MORE_OPS[name]
    tangents = tuple(torch.randn_like(p) for p in primals)
    fd = _fd(fn, primals, tangents)
    out, tout, mode = tangent_forward(fn, primals, tangents, debug=True)
    # a rule ran for every op (None: forward-mode AD of the op), and agrees with forward-mode AD
    assert all(err is not None and (err <= TOL or name in NO_FORWARD_AD and math.isnan(err))
               for _, err in mode.record), mode.record
    assert rel(tout, fd) < 1e-7
    net = _Fn(fn)
    with repeated_calls():
        out_traced, tout_traced = jvp(net, primals, tangents, mode="traced")
    assert runner_of(net).traces == 1, "fell back to the eager engine"
    assert rel(out_traced, out) < 1e-12 and rel(tout_traced, tout) < 1e-12


def test_native_layer_norm_statistics_against_finite_differences():
    """`torch.native_layer_norm`'s mean and 1/std outputs: forward-mode AD gives them tangent zero,
    the rule their derivative."""
    x, w = r(2, 3, 4), r(4)
    tx, tw = torch.randn_like(x), torch.randn_like(w)
    fn = lambda x, w: torch.native_layer_norm(x, (4,), w, None, 1e-5)  # noqa: E731
    _, tout = tangent_forward(fn, (x, w), (tx, tw))
    for t, fd in zip(tout, _fd(lambda x, w: torch.stack([y.expand(x.shape) for y in fn(x, w)]), (x, w), (tx, tw))):
        assert rel(t.expand(x.shape), fd) < 1e-7


@pytest.mark.filterwarnings("ignore:Implicit dimension choice")
@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 4)])
def test_softmax_without_a_dim_uses_the_dim_the_op_picks(shape):
    """`F.softmax(x)` (deprecated, still called) normalizes over dim 1 of 2-D x, dim 0 of 3-D x."""
    fn = lambda x: F.softmax(x) + F.log_softmax(x) * 2 + F.softmin(x) * 3  # noqa: E731
    x = r(*shape)
    tx = torch.randn_like(x)
    _, tout = tangent_forward(fn, (x,), (tx,))
    assert rel(tout, torch.func.jvp(fn, (x,), (tx,))[1]) < 1e-12


def test_channel_dropout_shares_the_primal_mask_eager_and_traced():
    """dropout1d/2d/3d and torch.dropout: the mask a plain forward draws from the same RNG state, in
    the primal and in the tangent (which central differences with that state confirm), eager and traced."""
    from fewstep.jvp.traced import repeated_calls, runner_of

    def fn(x):
        return (F.dropout2d(x, 0.5) + F.dropout1d(x.flatten(2), 0.3).view_as(x) + F.dropout3d(x, 0.4)
                + torch.dropout(x, 0.2, True) + F.dropout2d(x, 1.0) + F.dropout1d(x[0], 0.5))

    def run(f):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(7)
            return f()

    x = r(2, 3, 4, 4)
    tx = torch.randn_like(x)
    plain = run(lambda: fn(x))
    fd = (run(lambda: fn(x + 1e-6 * tx)) - run(lambda: fn(x - 1e-6 * tx))) / 2e-6
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no op fell back to forward-mode AD
        out, tout = run(lambda: tangent_forward(fn, (x,), (tx,)))
    assert torch.equal(out, plain) and rel(tout, fd) < 1e-7
    assert (F.dropout2d(x, 0.5) == 0).any()  # a mask that drops something
    net = _Fn(fn)
    with repeated_calls():
        out_traced, tout_traced = run(lambda: jvp(net, (x,), (tx,), mode="traced"))
    assert runner_of(net).traces == 1
    assert torch.equal(out_traced, plain) and rel(tout_traced, tout) < 1e-12


def test_fmax_fmin_ties_average_like_maximum():
    """At a tie fmax/fmin take the mean of the two tangents, as maximum/minimum do and as central
    differences see it (forward-mode AD of fmax takes the second argument's)."""
    a, b = TIE_A, TIE_B
    ta, tb = torch.randn_like(a), torch.randn_like(b)
    fn = lambda a, b: torch.fmax(a, b) + 3 * torch.fmin(a, b)  # noqa: E731
    _, tout = tangent_forward(fn, (a, b), (ta, tb))
    tie = a == b
    assert tie.any() and (~tie).any()
    assert rel(tout, _fd(fn, (a, b), (ta, tb))) < 1e-7
    torch.testing.assert_close(tout[tie], 4 * (ta + tb)[tie] / 2, rtol=1e-12, atol=1e-12)


class _UpNet(nn.Module):
    """A decoder stage of a user UNet: a grouped, strided transposed convolution upsamples, with
    activations the built-in networks do not use, and t through tan and log1p."""

    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2)
        self.act = nn.Sequential(nn.Mish(), nn.Conv2d(6, 6, 1), nn.LeakyReLU(0.1), nn.Conv2d(6, 6, 1), nn.Softplus())
        self.emb = nn.Linear(1, 4)

    def forward(self, x, t):
        e = self.emb(torch.log1p(torch.tan(t))[:, None])  # t in (0, 1.4)
        return self.act(self.up(x + e[:, :, None, None])) + F.hardswish(self.up(F.elu(x)))


@pytest.mark.parametrize("mode", ["tangent", "traced"])
def test_transposed_convolution_network_against_finite_differences(mode):
    from fewstep.jvp.traced import repeated_calls, runner_of

    net = _UpNet().double()
    x, t = r(2, 4, 5, 5), torch.rand(2, dtype=DT) * 1.3 + 0.05
    tx, tt = torch.randn_like(x), torch.randn_like(t)
    report = check_tangent(net, (x, t), (tx, tt))
    assert report["ops_without_rule"] == [] and report["first_bad_op"] is None, report
    with repeated_calls():
        out, tout = jvp(net, (x, t), (tx, tt), mode=mode)
    if mode == "traced":
        assert runner_of(net).traces == 1, "fell back to the eager engine"
    assert out.shape == (2, 6, 10, 10) and not tout.requires_grad
    assert rel(tout, _fd(net, (x, t), (tx, tt))) < 1e-7


class _NormNet(nn.Module):
    """The layers of user DiTs and SD3/Flux-style blocks that the built-in networks do not use:
    BatchNorm (train or eval), RMSNorm, a GLU feed-forward, an attention mask by masked_fill, a
    label embedding, F.normalize and logsumexp."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.emb, self.time = nn.Embedding(3, 4), nn.Linear(1, 4)
        self.norm, self.ff, self.out = nn.RMSNorm(4), nn.Linear(4, 8), nn.Linear(4, 2)

    def forward(self, x, t, labels):
        h = self.bn(self.conv(x)).flatten(2).transpose(1, 2)  # (B, L, 4)
        h = h + self.emb(labels)[:, None] + self.time(t[:, None])[:, None]
        h = F.glu(self.ff(self.norm(h)))
        keep = torch.ones(h.shape[1], h.shape[1], dtype=torch.bool, device=h.device).tril()
        scores = torch.baddbmm(h.new_zeros(()), h, h.transpose(1, 2), alpha=0.5).masked_fill(~keep, float("-inf"))
        h = h + torch.softmax(scores, -1) @ h
        h = F.normalize(h, dim=-1) * torch.logsumexp(h, -1, keepdim=True)
        return self.out(h).transpose(1, 2).reshape(x.shape)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("mode", ["tangent", "traced"])
def test_normalization_network_against_finite_differences(mode, train):
    from fewstep.jvp.traced import repeated_calls, runner_of

    net = _NormNet().double().train(train)
    with torch.no_grad():  # running statistics away from their initial (0, 1)
        net.bn.running_mean.normal_(0, 0.3), net.bn.running_var.uniform_(0.5, 2.0)
    x, t, labels = r(2, 2, 3, 3), torch.rand(2, dtype=DT), torch.tensor([2, 0])
    tx, tt = torch.randn_like(x), torch.randn_like(t)
    report = check_tangent(net, (x, t, labels), (tx, tt, None))
    assert report["ops_without_rule"] == [] and report["first_bad_op"] is None, report
    plain = copy.deepcopy(net)
    with repeated_calls():
        for _ in range(2):  # the first call traces (traced mode), the second replays
            out, tout = jvp(net, (x, t, labels), (tx, tt, None), mode=mode)
            plain(x, t, labels)
    if mode == "traced":
        assert runner_of(net).traces == 1, "fell back to the eager engine"
    for name, buffer in plain.named_buffers():  # BatchNorm's running statistics: updated once per call
        assert torch.equal(buffer, net.get_buffer(name)), name
    assert not tout.requires_grad
    assert rel(tout, _fd(lambda x, t: net(x, t, labels), (x, t), (tx, tt))) < 1e-7


# ---------------------------------------------------------------------------------------------
# Whole networks.


def tiny_unet():
    net = UNet(1, 8, model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,))
    with torch.no_grad():
        for p in net.parameters():  # zero-initialised output layers would hide errors
            p.add_(0.2 * torch.randn_like(p))
    return net


class DiT(nn.Module):
    """A plain reference DiT: patchify conv, adaLN-modulated blocks with LayerNorm, SDPA, GELU MLP."""

    def __init__(self, channels=1, size=8, patch=2, dim=16, heads=2, depth=2):
        super().__init__()
        self.patch, self.heads, self.size = patch, heads, size
        self.embed = nn.Conv2d(channels, dim, patch, stride=patch)
        self.pos = nn.Parameter(0.1 * torch.randn(1, (size // patch) ** 2, dim))
        self.t_mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(
            norm1=nn.LayerNorm(dim, elementwise_affine=False), qkv=nn.Linear(dim, 3 * dim),
            proj=nn.Linear(dim, dim), norm2=nn.LayerNorm(dim, elementwise_affine=False),
            mlp=nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(approximate="tanh"), nn.Linear(2 * dim, dim)),
            ada=nn.Linear(dim, 6 * dim))) for _ in range(depth))
        self.norm_out = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, patch * patch * channels)

    def time_embedding(self, t):
        half = self.pos.shape[-1] // 2
        freqs = torch.exp(-math.log(100.0) * torch.arange(half, dtype=t.dtype) / half)
        arg = t[:, None] * freqs
        return self.t_mlp(torch.cat([arg.cos(), arg.sin()], dim=-1))

    def forward(self, x, t):
        b, c = x.shape[:2]
        h = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        emb = F.silu(self.time_embedding(t))
        for blk in self.blocks:
            s1, b1, g1, s2, b2, g2 = blk["ada"](emb)[:, None].chunk(6, dim=-1)
            q, k, v = blk["qkv"](blk["norm1"](h) * (1 + s1) + b1).unflatten(-1, (3, self.heads, -1)).permute(
                2, 0, 3, 1, 4).unbind(0)
            a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(h.shape)
            h = h + g1 * blk["proj"](a)
            h = h + g2 * blk["mlp"](blk["norm2"](h) * (1 + s2) + b2)
        h = self.out(self.norm_out(h))
        n, p = self.size // self.patch, self.patch
        return h.reshape(b, n, n, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(x.shape)


NETS = {
    "unet": (tiny_unet, lambda: (torch.randn(2, 1, 8, 8), torch.rand(2))),
    "mlp": (lambda: MLP(2), lambda: (torch.randn(3, 2), torch.rand(3))),
    "dit": (DiT, lambda: (torch.randn(2, 1, 8, 8), torch.rand(2))),
}


@pytest.mark.parametrize("name", list(NETS))
def test_network_against_finite_differences(name):
    build, inputs = NETS[name]
    report = check_tangent(build(), inputs())
    assert report["rel_err_fd"] < 1e-6, report
    assert report["first_bad_op"] is None, report
    assert report["rel_err_jvp"] is None or report["rel_err_jvp"] < 1e-10, report


@pytest.mark.parametrize("name", list(NETS))
def test_primal_and_autograd_intact(name):
    build, inputs = NETS[name]
    net = build()
    x, t = inputs()
    plain = net(x, t)
    grads = torch.autograd.grad(plain.sum(), list(net.parameters()), allow_unused=True)
    out, tout = tangent_forward(net, (x, t), (torch.randn_like(x), 1.0))
    assert torch.equal(out, plain)
    assert tout.grad_fn is None and not tout.requires_grad
    for g, h in zip(grads, torch.autograd.grad(out.sum(), list(net.parameters()), allow_unused=True)):
        assert (g is None and h is None) or torch.equal(g, h)


def test_labels_without_tangent_and_hooks_fire():
    net = UNet(1, 8, model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(), num_classes=3).double()
    calls = []
    net.conv_in.register_forward_hook(lambda *a: calls.append(1))
    x, t, y = torch.randn(2, 1, 8, 8, dtype=DT), torch.rand(2, dtype=DT), torch.tensor([0, 2])
    x_dot = torch.randn_like(x)
    out, tout = tangent_forward(net, (x, t, y), (x_dot, None, None))
    assert calls == [1]
    _, ref = torch.func.jvp(lambda x: net(x, t, y), (x,), (x_dot,))
    assert rel(tout, ref) < 1e-10


def test_dropout_shares_the_primal_mask():
    net = DropoutNet().double().train()
    x, t = torch.randn(3, 4, dtype=DT), torch.rand(3, dtype=DT)
    x_dot, t_dot = torch.randn_like(x), torch.randn_like(t)

    def run(fn):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(7)
            return fn()

    out, tout = run(lambda: tangent_forward(net, (x, t), (x_dot, t_dot)))
    assert torch.equal(out, run(lambda: net(x, t)))  # same mask as a plain forward
    eps = 1e-6
    plus = run(lambda: net(x + eps * x_dot, t + eps * t_dot))
    fd = (plus - run(lambda: net(x - eps * x_dot, t - eps * t_dot))) / (2 * eps)
    assert rel(tout, fd) < 1e-6
    report = check_tangent(net, (x, t))
    assert report["rel_err_fd"] < 1e-6, report


def test_diffusers_unet2d_against_finite_differences():
    """diffusers' UNet2DModel with attention, unmodified (torch.func.jvp fails on it on CPU: the
    forward-AD formula of group_norm views a non-contiguous input). Its time embedding runs in
    float32 by design (`timesteps.float()`), so the t direction is checked with a wider step."""
    diffusers = pytest.importorskip("diffusers")
    net = _Wrap(diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                      block_out_channels=(8, 16), norm_num_groups=4,
                                      down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                      up_block_types=("AttnUpBlock2D", "UpBlock2D")))
    x, t = torch.randn(1, 1, 8, 8), torch.rand(1) * 10
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = check_tangent(net, (x, t), (torch.randn_like(x), None))
        assert report["rel_err_fd"] < 1e-6 and report["first_bad_op"] is None, report
        report = check_tangent(net, (x, t), (None, torch.ones_like(t)), eps=1e-3)
        assert report["rel_err_fd"] < 1e-3 and report["first_bad_op"] is None, report


class _Wrap(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, t):
        return self.net(x, t).sample


def test_check_tangent_names_the_op_and_module_without_a_rule():
    """An op with no rule still gets an exact tangent (forward-mode AD of that op), and the
    checker names it with the module it ran in."""

    class Erfc(torch.nn.Module):
        def forward(self, x):
            return torch.erfc(x)

    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Sequential(torch.nn.SiLU(), Erfc()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = check_tangent(net, (torch.randn(5, 3),))
    assert report["rel_err_fd"] < 1e-6
    assert report["first_bad_op"][0].endswith("erfc") and report["first_bad_op"][1] is None
    assert report["first_bad_module"] == "1.1"
    assert any(name.endswith("erfc") for name in report["ops_without_rule"])


@pytest.mark.parametrize("inplace, plain", [
    (torch.exp_, torch.exp), (torch.sigmoid_, torch.sigmoid), (F.relu_, F.relu),
    (lambda y: F.leaky_relu_(y, 0.1), lambda y: F.leaky_relu(y, 0.1)),
    (lambda y: F.silu(y, inplace=True), F.silu), (lambda y: y.exp_(), torch.exp)])
def test_functional_inplace_ops_run_once_with_the_right_tangent(inplace, plain):
    """`torch.exp_`, `F.relu_`, ...: in place by name; the op must run once on the real tensor
    (not again in the tangent's fallback) and carry its exact tangent."""

    class Net(torch.nn.Module):
        def forward(self, x):
            return inplace(x * 1.0)

    x, tx = torch.randn(7, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out, tout = tangent_forward(Net(), (x,), (tx,))
    ref, tref = torch.func.jvp(plain, (x,), (tx,))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tout, tref, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Your own op: `tangent_rule`, and `jvp` (fewstep.jvp) in every mode.


@torch.library.custom_op("fewstep_test::sinh_mul", mutates_args=())
def sinh_mul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`sinh(x) * w` through numpy: opaque to the engine and to forward-mode AD."""
    return torch.from_numpy(np.sinh(x.detach().cpu().numpy()) * w.detach().cpu().numpy()).to(x)


@torch.library.custom_op("fewstep_test::cosh_np", mutates_args=())
def cosh_np(x: torch.Tensor) -> torch.Tensor:
    """An opaque op that gets no rule."""
    return torch.from_numpy(np.cosh(x.detach().cpu().numpy())).to(x)


@tangent_rule(sinh_mul)
def _sinh_mul_tangent(ctx, x, w):
    tx, tw = ctx.tangent(x), ctx.tangent(w)
    terms = [tx * torch.cosh(x) * w if tx is not None else None, torch.sinh(x) * tw if tw is not None else None]
    terms = [t for t in terms if t is not None]
    return sum(terms) if terms else None


class _UsesCustomOp(nn.Module):
    def __init__(self, with_rule: bool = True):
        super().__init__()
        self.lin, self.with_rule = nn.Linear(3, 4), with_rule
        self.w = nn.Parameter(torch.randn(4))

    def forward(self, x, scale):
        return sinh_mul(self.lin(x), self.w * scale) if self.with_rule else cosh_np(self.lin(x))


def test_a_rule_for_your_own_op_matches_finite_differences():
    """A `torch.library` custom op computed in numpy: its rule, registered with `tangent_rule`,
    gives the exact JVP (float64 central differences), tangents on both inputs, through the
    op object and through `torch.ops.fewstep_test.sinh_mul`."""
    net = _UsesCustomOp().double()
    x, scale = r(5, 3), torch.tensor(1.3, dtype=DT)
    tx, ts = r(5, 3), torch.tensor(0.7, dtype=DT)
    _, tout = jvp(net, (x, scale), (tx, ts))
    h = 1e-6
    with torch.no_grad():
        fd = (net(x + h * tx, scale + h * ts) - net(x - h * tx, scale - h * ts)) / (2 * h)
    assert rel(tout, fd) < 1e-8
    report = check_tangent(net, (x, scale))
    assert report["rel_err_fd"] < 1e-8 and report["first_bad_op"] is None
    _, tout2 = jvp(lambda a: torch.ops.fewstep_test.sinh_mul(a, a), (x,), (tx,))
    torch.testing.assert_close(tout2, tx * (torch.cosh(x) * x + torch.sinh(x)))


def test_an_op_without_a_rule_is_a_one_line_error():
    net = _UsesCustomOp(with_rule=False).double()
    with pytest.raises(NoTangentRuleError, match=r"no tangent rule for the custom op .*cosh_np.*tangent_rule") as e:
        jvp(net, (r(2, 3), torch.tensor(1.0, dtype=DT)), (r(2, 3), None))
    assert "\n" not in str(e.value)
    for bad in ("no_such_torch_op", 3):
        with pytest.raises(ValueError, match="tangent_rule"):
            tangent_rule(bad)


@pytest.mark.parametrize("mode", JVP_MODES)
def test_jvp_modes_agree_with_finite_differences(mode):
    """`jvp` in each mode: the output with autograd (dropout masks as in a plain forward from the
    same RNG state), the tangent without a graph, keyword tensors with tangent zero even when
    they are an arg itself (MeanFlow's r = t)."""
    net = MLP(3, 16, 2, second_time=True).double()
    for p in net.parameters():
        p.data.normal_(0, 0.3)
    x, t = r(4, 3), torch.rand(4, dtype=DT)
    tx, tt = r(4, 3), r(4)
    out, tout = jvp(net, (x, t), (tx, tt), {"r": t}, mode=mode)
    assert out.requires_grad and not tout.requires_grad
    h = 1e-6
    with torch.no_grad():
        fd = (net(x + h * tx, t + h * tt, r=t) - net(x - h * tx, t - h * tt, r=t)) / (2 * h)
        torch.testing.assert_close(out, net(x, t, r=t), rtol=1e-12, atol=1e-12)
    assert rel(tout, fd) < 1e-8
    _, tnum = jvp(net, (x, t), (None, 1.0), {"r": t}, mode=mode)  # a number broadcasts like its arg
    _, tful = jvp(net, (x, t), (None, torch.ones_like(t)), {"r": t}, mode=mode)
    torch.testing.assert_close(tnum, tful, rtol=1e-12, atol=1e-12)


def test_jvp_checks_its_arguments():
    net = MLP(3, 16, 2).double()
    x, t = r(2, 3), torch.rand(2, dtype=DT)
    with pytest.raises(ValueError, match="mode must be one of"):
        jvp(net, (x, t), (x, None), mode="fd")
    with pytest.raises(ValueError, match="2 tangents for 3 args"):
        jvp(net, (x, t, None), (x, None))
    with pytest.raises(ValueError, match=r"args\[1\] is not a floating tensor"):
        jvp(lambda a, b: a, (x, torch.tensor([1, 2])), (x, torch.ones(2)))
