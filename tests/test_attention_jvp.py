"""Attention with tangents (docs/math.md#attention-tangent-rule): the math path against forward-mode AD and finite differences,
the primal against SDPA, and the fused Triton kernel against the math path.

The kernel tests run only under Triton's CPU interpreter:
    TRITON_INTERPRET=1 python -m pytest -q tests/test_attention_jvp.py
"""

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

from fewstep.jvp import attention as attention_jvp
from fewstep.jvp.attention import attention_tangent_math, attention_tangent_triton, attention_with_tangent

F64 = torch.float64


def math_attention(q, k, v, attn_mask=None, is_causal=False, scale=None):
    """Softmax attention written out: every op has forward-mode AD."""
    s = q.shape[-1] ** -0.5 if scale is None else scale
    scores = q @ k.transpose(-1, -2) * s
    if is_causal:
        keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    return torch.softmax(scores, dim=-1) @ v


def qkv(batch=(2, 3), L=5, S=7, E=4, Ev=6, dtype=F64, gen=None):
    q = torch.randn(*batch, L, E, dtype=dtype, generator=gen)
    k = torch.randn(*batch, S, E, dtype=dtype, generator=gen)
    v = torch.randn(*batch, S, Ev, dtype=dtype, generator=gen)
    return q, k, v


def tangents(q, k, v, which="qkv"):
    return tuple(torch.randn_like(x) if name in which else None for name, x in zip("qkv", (q, k, v)))


def mask_for(kind, batch, L, S):
    if kind == "bool":
        m = torch.rand(*batch, L, S) > 0.4
        m[..., 0] = True  # no fully masked row
        return m
    if kind == "float":
        return torch.randn(*batch, L, S, dtype=F64)
    return None


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# ----------------------------------------------------------------------------------------------
# Math path


@pytest.mark.parametrize("L,S", [(5, 7), (7, 5), (6, 6)])
@pytest.mark.parametrize("mask", [None, "bool", "float", "causal"])
@pytest.mark.parametrize("which", ["qkv", "q", "k", "v", "qk"])
def test_math_matches_forward_ad(L, S, mask, which):
    q, k, v = qkv(L=L, S=S)
    q_dot, k_dot, v_dot = tangents(q, k, v, which)
    attn_mask, causal = (None, True) if mask == "causal" else (mask_for(mask, (2, 3), L, S), False)
    out, out_dot = attention_with_tangent(q, k, v, q_dot, k_dot, v_dot, attn_mask=attn_mask, is_causal=causal,
                                          scale=0.7, backend="math")
    zeros = [torch.zeros_like(x) for x in (q, k, v)]
    dirs = tuple(z if t is None else t for z, t in zip(zeros, (q_dot, k_dot, v_dot)))
    ref, ref_dot = torch.func.jvp(lambda a, b, c: math_attention(a, b, c, attn_mask, causal, 0.7), (q, k, v), dirs)
    assert rel_err(out, ref) <= 1e-12
    assert rel_err(out_dot, ref_dot) <= 1e-6


def test_math_matches_finite_differences():
    q, k, v = qkv(L=6, S=9)
    q_dot, k_dot, v_dot = tangents(q, k, v)
    for attn_mask, causal in [(None, False), (None, True), (mask_for("bool", (2, 3), 6, 9), False)]:
        def sdpa(h):
            return F.scaled_dot_product_attention(q + h * q_dot, k + h * k_dot, v + h * v_dot,
                                                  attn_mask=attn_mask, is_causal=causal)
        h = 1e-5
        fd = (sdpa(h) - sdpa(-h)) / (2 * h)  # truncation ~h^2 = 1e-10, rounding ~1e-16 / h = 1e-11
        _, out_dot = attention_with_tangent(q, k, v, q_dot, k_dot, v_dot, attn_mask=attn_mask, is_causal=causal,
                                            backend="math")
        assert rel_err(out_dot, fd) <= 1e-7


def test_grouped_query_attention():
    q = torch.randn(2, 4, 5, 8, dtype=F64)
    k, v = torch.randn(2, 2, 7, 8, dtype=F64), torch.randn(2, 2, 7, 8, dtype=F64)
    q_dot, k_dot, v_dot = tangents(q, k, v)
    out, out_dot = attention_with_tangent(q, k, v, q_dot, k_dot, v_dot, enable_gqa=True)

    def f(a, b, c):
        return math_attention(a, b.repeat_interleave(2, -3), c.repeat_interleave(2, -3))
    ref, ref_dot = torch.func.jvp(f, (q, k, v), (q_dot, k_dot, v_dot))
    assert rel_err(out, ref) <= 1e-12 and rel_err(out_dot, ref_dot) <= 1e-6


def test_no_tangent_is_zero():
    q, k, v = qkv()
    out, out_dot = attention_with_tangent(q, k, v)
    assert torch.equal(out_dot, torch.zeros_like(out))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_primal_and_gradients_are_sdpa(dtype):
    q, k, v = (x.requires_grad_() for x in qkv(dtype=dtype))
    q_dot, k_dot, v_dot = tangents(q, k, v)
    mask = mask_for("bool", (2, 3), 5, 7)
    out, out_dot = attention_with_tangent(q, k, v, q_dot, k_dot, v_dot, attn_mask=mask)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.equal(out, ref)
    assert out_dot.grad_fn is None and not out_dot.requires_grad
    w = torch.randn_like(out)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for g, r in zip(grads, ref_grads):
        assert torch.equal(g, r)


def test_bad_backend():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="backend"):
        attention_with_tangent(q, k, v, q, k, v, backend="flash")


def test_triton_missing_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(attention_jvp, "HAVE_TRITON", False)
    q, k, v = qkv(dtype=torch.float32, E=16, Ev=16)
    with pytest.raises(RuntimeError, match="Triton is not installed"):
        attention_with_tangent(q, k, v, q, k, v, backend="triton")
    assert torch.isfinite(attention_with_tangent(q, k, v, q, k, v)[1]).all()  # auto falls back to math


# ----------------------------------------------------------------------------------------------
# Fused Triton kernel, under the interpreter (TRITON_INTERPRET=1 runs it on CPU tensors)

HAVE_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(
    not (HAVE_TRITON and INTERPRET),
    reason="Triton kernel tests need `import triton` and TRITON_INTERPRET=1 "
           "(run: TRITON_INTERPRET=1 python -m pytest -q tests/test_attention_jvp.py)")

# Tolerance of the fp32 kernel against the float64 math path, relative to the largest entry.
# Both are exact formulas; the kernel rounds to fp32 (eps 1.2e-7) in the scores, exponentials
# and the S-term sums of acc/t1/t2/mu, in a different order (blockwise, with exp(m_old - m_new)
# rescaling), so errors grow like eps * sqrt(S) * (a few): ~1e-6 at S = 64. Measured in the
# interpreter: at most 5.1e-7 (out) and 4.6e-7 (out_dot) over these cases with 5 seeds each,
# 1.0e-6 with 3x sharper logits. Bound 1e-5: 10-20x margin, and orders of magnitude below what a
# wrong term (a missing rescale, a dropped tangent) produces.
KERNEL_TOL = 1e-5
# fp16 inputs: the kernel rounds p and p * dS to fp16 before the P V dots (as FlashAttention does)
# and the outputs to fp16 (unit roundoff 4.9e-4). Measured: at most 3.8e-4 (out) and 6.8e-4
# (out_dot) against float64 math on the same fp16 values. Bound 5e-3. (bf16 cannot be checked
# here: the interpreter's tl.dot on bf16 returns garbage, numpy has no bfloat16.)
KERNEL_TOL_FP16 = 5e-3


def math_reference(q, k, v, q_dot, k_dot, v_dot, is_causal):
    up = [None if x is None else x.to(F64) for x in (q, k, v, q_dot, k_dot, v_dot)]
    out = F.scaled_dot_product_attention(*up[:3], is_causal=is_causal)
    return out, attention_tangent_math(*up, is_causal=is_causal)


@needs_interpreter
@pytest.mark.parametrize("L,S,E,Ev,causal,which", [
    (32, 32, 16, 16, False, "qkv"),
    (64, 64, 32, 32, True, "qkv"),
    (48, 32, 16, 32, False, "qk"),   # L != S
    (32, 48, 32, 16, True, "v"),     # L < S, causal
    (40, 25, 16, 16, True, "qkv"),   # tails: neither length a multiple of the block
    (21, 37, 16, 16, False, "q"),
    (37, 21, 16, 16, False, "k"),
])
def test_kernel_matches_math(L, S, E, Ev, causal, which):
    gen = torch.Generator().manual_seed(L * 100 + S)
    q, k, v = qkv(batch=(2,), L=L, S=S, E=E, Ev=Ev, dtype=torch.float32, gen=gen)
    q_dot, k_dot, v_dot = tangents(q, k, v, which)
    out, out_dot = attention_tangent_triton(q, k, v, q_dot, k_dot, v_dot, is_causal=causal, block_m=16, block_n=16)
    ref, ref_dot = math_reference(q, k, v, q_dot, k_dot, v_dot, causal)
    assert rel_err(out.to(F64), ref) <= KERNEL_TOL
    assert rel_err(out_dot.to(F64), ref_dot) <= KERNEL_TOL


@needs_interpreter
@pytest.mark.parametrize("causal", [False, True])
def test_kernel_fp16(causal):
    gen = torch.Generator().manual_seed(1)
    q, k, v = qkv(batch=(2,), L=40, S=56, E=32, Ev=16, dtype=torch.float16, gen=gen)
    q_dot, k_dot, v_dot = tangents(q, k, v)
    out, out_dot = attention_tangent_triton(q, k, v, q_dot, k_dot, v_dot, is_causal=causal, block_m=16, block_n=16)
    ref, ref_dot = math_reference(q, k, v, q_dot, k_dot, v_dot, causal)
    assert out.dtype == out_dot.dtype == torch.float16
    assert rel_err(out.to(F64), ref) <= KERNEL_TOL_FP16
    assert rel_err(out_dot.to(F64), ref_dot) <= KERNEL_TOL_FP16


@needs_interpreter
def test_kernel_through_the_api():
    """backend='triton' with batch and head dims, a scale, and inputs that require grad."""
    q, k, v = (x.requires_grad_() for x in qkv(batch=(1, 2), L=24, S=40, E=16, Ev=16, dtype=torch.float32))
    q_dot, k_dot, v_dot = tangents(q, k, v)
    out, out_dot = attention_with_tangent(q, k, v, q_dot, k_dot, v_dot, is_causal=True, scale=0.3, backend="triton")
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3))
    assert out_dot.grad_fn is None and out_dot.shape == out.shape
    up = [x.detach().to(F64) for x in (q, k, v, q_dot, k_dot, v_dot)]
    assert rel_err(out_dot.to(F64), attention_tangent_math(*up, is_causal=True, scale=0.3)) <= KERNEL_TOL


@needs_interpreter
def test_kernel_rejects_masks_and_odd_head_dims():
    q, k, v = qkv(batch=(2,), L=16, S=16, E=16, Ev=16, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="attn_mask"):
        attention_with_tangent(q, k, v, q, k, v, attn_mask=torch.ones(16, 16, dtype=torch.bool), backend="triton")
    q, k, v = qkv(batch=(2,), L=16, S=16, E=12, Ev=12, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="head dims"):
        attention_with_tangent(q, k, v, q, k, v, backend="triton")


@needs_interpreter
def test_tangent_engine_runs_the_kernel_through_a_dit(monkeypatch):
    """The tangent engine's attention rule with the Triton kernel, through fewstep's DiT (head
    dim 16): the same network tangent as with the math path, within the fp32 bound above."""
    from fewstep.networks import DiT
    from fewstep.jvp import attention as aj
    from fewstep.jvp.engine import tangent_forward

    torch.manual_seed(0)
    net = DiT(1, 8, patch_size=2, hidden_size=32, depth=1, heads=2)
    with torch.no_grad():
        for p in net.parameters():
            if not p.abs().sum():
                p.normal_(0, 0.1)
    x, t = torch.randn(2, 1, 8, 8), torch.rand(2)
    tangents = (torch.randn_like(x), torch.randn_like(t))
    monkeypatch.setattr(aj, "DEFAULT_BACKEND", "math")
    out, ref = tangent_forward(net, (x, t), tangents)
    monkeypatch.setattr(aj, "DEFAULT_BACKEND", "triton")
    out_k, got = tangent_forward(net, (x, t), tangents)
    assert torch.equal(out, out_k)  # the primal is SDPA's either way
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
