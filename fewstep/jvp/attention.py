"""Scaled-dot-product attention with its forward-mode tangent (docs/math.md#attention-tangent-rule).

`attention_with_tangent(q, k, v, q_dot, k_dot, v_dot)` returns `(out, out_dot)`:

- `out` is `F.scaled_dot_product_attention(q, k, v, ...)` itself, whatever backend PyTorch picks;
  autograd records it as usual, so the training backward is PyTorch's own (flash-style) backward.
- `out_dot` is the exact JVP, computed under `torch.no_grad()` from detached values (the tangent
  carries no graph: in sCT/sCD it belongs to the target network). Per head, with `s` the scale:

      S  = q k^T s (+ mask),   P = softmax(S),   O = P v
      dS = (q_dot k^T + q k_dot^T) s
      dP = P * (dS - rowsum(P * dS))
      dO = dP v + P v_dot

Two ways to compute `out_dot`:

- `backend="math"`: the formula above with plain ops, in float32 at least (float64 stays float64).
  Any mask (bool or float), causal, any head dims. O(L S) memory.
- `backend="triton"`: a fused kernel, one pass over the K/V blocks, carrying the tangent through
  FlashAttention's online softmax (below). O(L) memory, never the (L, S) matrix. CUDA tensors, or
  CPU tensors when `TRITON_INTERPRET=1` is set before Triton is first imported (its interpreter, for
  tests). fp16/bf16/fp32, head dims in {16, 32, 64, 128}, no attn_mask (is_causal is fine). Only the
  tangent comes from the kernel; the primal is still SDPA's, so autograd and its backward are untouched.

`backend="auto"` (default) takes the kernel on CUDA when Triton is installed and the call is
supported, else the math path.

The online softmax with tangents (docs/math.md#attention-tangent-rule), per query row, over key blocks j:

    m  = running max of S_ij          alpha = exp(m_old - m_new) rescales all of:
    l  = sum_j p_ij                   p_ij = exp(S_ij - m)
    acc = sum_j p_ij v_j              mu = sum_j p_ij dS_ij
    t1 = sum_j p_ij dS_ij v_j         t2 = sum_j p_ij v_dot_j
    end:  O = acc / l,   dO = (t1 + t2) / l - (mu / l) O

Causal follows `F.scaled_dot_product_attention`: top-left aligned, query i sees keys j <= i.
"""

# Annotations stay strings: the kernel's `tl.constexpr` is read by Triton, and `tl` exists only
# once Triton is imported, lazily (below).
from __future__ import annotations

import importlib.util
import os

import torch
import torch.nn.functional as F

# Triton is optional and imported on first use, not here: `triton.jit` and Triton's own library
# choose between compiling and interpreting (TRITON_INTERPRET=1) when Triton is imported, so the
# environment at the first kernel call decides, not the environment when fewstep was imported.
triton = tl = None
HAVE_TRITON = importlib.util.find_spec("triton") is not None

__all__ = ["attention_with_tangent", "attention_tangent_math", "attention_tangent_triton", "triton_supported"]

BACKENDS = ("auto", "math", "triton")
# What `attention_tangent(backend=None)` uses, e.g. in the tangent engine's attention rule; tests
# set "triton" to run the kernel in Triton's CPU interpreter through whole networks.
DEFAULT_BACKEND = "auto"
KERNEL_HEAD_DIMS = (16, 32, 64, 128)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def attention_with_tangent(q, k, v, q_dot=None, k_dot=None, v_dot=None, attn_mask=None, is_causal=False,
                           scale=None, enable_gqa=False, backend="auto"):
    """`F.scaled_dot_product_attention(q, k, v, ...)` and its tangent along `(q_dot, k_dot, v_dot)`.

    q: (..., L, E), k: (..., S, E), v: (..., S, Ev); tangents have their primal's shape, or None
    (zero). With `enable_gqa=True`, k and v may have fewer heads (dim -3) than q, as in SDPA.
    Returns `(out, out_dot)`; `out_dot` has no grad_fn and is all zeros when every tangent is None.
    """
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                                         enable_gqa=enable_gqa)
    out_dot = attention_tangent(q, k, v, q_dot, k_dot, v_dot, attn_mask, is_causal, scale, backend)
    return out, (torch.zeros_like(out, memory_format=torch.contiguous_format) if out_dot is None
                 else out_dot.to(out.dtype))


@torch.no_grad()
def attention_tangent(q, k, v, q_dot=None, k_dot=None, v_dot=None, attn_mask=None, is_causal=False, scale=None,
                      backend: str | None = None) -> torch.Tensor | None:
    """The tangent of SDPA alone (from detached values, no graph), None when every tangent is
    None. K/V with fewer heads than q (grouped-query attention) are repeated. `backend`: 'auto'
    (the Triton kernel on CUDA when it supports the call, else the math path), 'math', 'triton'.
    The tangent engine's rule for `F.scaled_dot_product_attention` (`fewstep.jvp.engine`);
    None: `DEFAULT_BACKEND`."""
    backend = DEFAULT_BACKEND if backend is None else backend
    if backend not in BACKENDS:
        raise ValueError(f"attention_with_tangent: backend must be one of {BACKENDS}, got {backend!r}")
    if q_dot is None and k_dot is None and v_dot is None:
        return None
    q, k, v = q.detach(), k.detach(), v.detach()
    q_dot, k_dot, v_dot = (None if t is None else t.detach() for t in (q_dot, k_dot, v_dot))
    if k.shape[-3:-2] != q.shape[-3:-2] and q.dim() >= 3:  # grouped-query attention: repeat K/V heads
        rep = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(rep, -3), v.repeat_interleave(rep, -3)
        k_dot = None if k_dot is None else k_dot.repeat_interleave(rep, -3)
        v_dot = None if v_dot is None else v_dot.repeat_interleave(rep, -3)
    if backend == "auto":
        backend = "triton" if q.is_cuda and triton_supported(q, k, v, attn_mask) is None else "math"
    if backend == "math":
        return attention_tangent_math(q, k, v, q_dot, k_dot, v_dot, attn_mask, is_causal, scale)
    reason = triton_supported(q, k, v, attn_mask)
    if reason is not None:
        raise RuntimeError(f"attention_with_tangent(backend='triton'): {reason}")
    scale = None if scale is None else float(scale)
    return attention_tangent_fused(q, k, v, q_dot, k_dot, v_dot, bool(is_causal), scale)


# A custom op, so that tracers and torch.compile see the kernel as one opaque node (the traced JVP
# records it in its graph; a raw Triton launch would be invisible to make_fx).
@torch.library.custom_op("fewstep::attention_tangent_fused", mutates_args=())
def attention_tangent_fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_dot: torch.Tensor | None,
                            k_dot: torch.Tensor | None, v_dot: torch.Tensor | None, is_causal: bool,
                            scale: float | None) -> torch.Tensor:
    """The tangent of SDPA from the fused Triton kernel (no attn_mask), in q's dtype."""
    return attention_tangent_triton(q, k, v, q_dot, k_dot, v_dot, None, is_causal, scale)[1]


@attention_tangent_fused.register_fake
def _(q, k, v, q_dot, k_dot, v_dot, is_causal, scale):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


# ----------------------------------------------------------------------------------------------
# Math path (docs/math.md#attention-tangent-rule, exact under any mask)


def attention_tangent_math(q, k, v, q_dot, k_dot, v_dot, attn_mask=None, is_causal=False, scale=None):
    """The tangent of SDPA with plain ops, in float32 at least; O(L S) memory."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    s = q.shape[-1] ** -0.5 if scale is None else scale
    scores = q @ k.transpose(-1, -2) * s
    if is_causal:
        keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        scores = (scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool
                  else scores + attn_mask.to(dtype))
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # fully masked rows: SDPA returns 0, so does its tangent
    out_dot = None
    ds = None
    if q_dot is not None:
        ds = q_dot.to(dtype) @ k.transpose(-1, -2)
    if k_dot is not None:
        qk_dot = q @ k_dot.to(dtype).transpose(-1, -2)
        ds = qk_dot if ds is None else ds + qk_dot
    if ds is not None:
        ds = ds * s
        dp = p * (ds - (p * ds).sum(-1, keepdim=True))
        out_dot = dp @ v
    if v_dot is not None:
        pv = p @ v_dot.to(dtype)
        out_dot = pv if out_dot is None else out_dot + pv
    return out_dot


# ----------------------------------------------------------------------------------------------
# Fused Triton kernel: primal and tangent in one pass over the K/V blocks


def _interpret():
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_supported(q, k, v, attn_mask=None):
    """None when the fused kernel can run this call, else the reason it cannot (one line)."""
    if not HAVE_TRITON:
        return "Triton is not installed (pip install triton)"
    if not (q.is_cuda or _interpret()):
        return "the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)"
    if attn_mask is not None:
        return "the Triton kernel takes no attn_mask (is_causal is supported)"
    if q.dtype not in KERNEL_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"the Triton kernel needs q, k, v of one dtype in {KERNEL_DTYPES}"
    if q.shape[-1] not in KERNEL_HEAD_DIMS or v.shape[-1] not in KERNEL_HEAD_DIMS:
        return f"the Triton kernel needs head dims in {KERNEL_HEAD_DIMS}, got {q.shape[-1]} and {v.shape[-1]}"
    if q.dim() < 2 or k.shape[:-2] != q.shape[:-2] or v.shape[:-2] != q.shape[:-2] or k.shape[-2] != v.shape[-2]:
        return "the Triton kernel needs q, k, v with the same batch dims (no broadcasting)"
    return None


def _default_blocks(head_dim_v):
    # Three (BLOCK_M, Ev) fp32 accumulators (acc, t1, t2) live in registers; at Ev = 128 a narrower
    # key block keeps them from spilling. Untuned guesses: tune on a GPU (benchmarks/attention_jvp.py).
    return (64, 64) if head_dim_v <= 64 else (64, 32)


def attention_tangent_triton(q, k, v, q_dot, k_dot, v_dot, attn_mask=None, is_causal=False, scale=None,
                             block_m=None, block_n=None, num_warps=4, num_stages=2):
    """`(out, out_dot)` of SDPA from the fused kernel; fp32 accumulation, outputs in q's dtype."""
    reason = triton_supported(q, k, v, attn_mask)
    if reason is not None:
        raise RuntimeError(f"attention_with_tangent(backend='triton'): {reason}")
    batch, L, E, S, Ev = q.shape[:-2], q.shape[-2], q.shape[-1], k.shape[-2], v.shape[-1]
    dm, dn = _default_blocks(Ev)
    block_m, block_n = block_m or dm, block_n or dn

    def flat(x, length, width):  # (..., N, D) -> contiguous (B*H, N, D)
        return None if x is None else x.to(q.dtype).reshape(-1, length, width).contiguous()

    q3, k3, v3 = flat(q, L, E), flat(k, S, E), flat(v, S, Ev)
    qd3, kd3, vd3 = flat(q_dot, L, E), flat(k_dot, S, E), flat(v_dot, S, Ev)
    bh = q3.shape[0]
    o = torch.empty(bh, L, Ev, dtype=q.dtype, device=q.device)
    od = torch.empty_like(o)
    s = E ** -0.5 if scale is None else float(scale)
    grid = ((L + block_m - 1) // block_m, bh)
    _kernel(_interpret())[grid](
        q3, k3, v3, q3 if qd3 is None else qd3, k3 if kd3 is None else kd3, v3 if vd3 is None else vd3, o, od,
        s, L, S,
        HEAD_DIM=E, HEAD_DIM_V=Ev, BLOCK_M=block_m, BLOCK_N=block_n, IS_CAUSAL=bool(is_causal),
        HAS_QD=qd3 is not None, HAS_KD=kd3 is not None, HAS_VD=vd3 is not None,
        HAS_DS=qd3 is not None or kd3 is not None,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32: no TF32 rounding
        num_warps=num_warps, num_stages=num_stages,
    )
    return o.reshape(*batch, L, Ev), od.reshape(*batch, L, Ev)


_KERNEL = {}


def _kernel(interpret):
    """The jitted kernel, wrapped on first use (importing Triton then)."""
    global triton, tl
    if not _KERNEL:
        import triton
        import triton.language as tl
        imported_interpreting = type(tl.zeros).__name__ == "InterpretedFunction"  # Triton's library's mode
        _KERNEL.update(fn=triton.jit(_attention_jvp_fwd), interpret=imported_interpreting)
    if _KERNEL["interpret"] != interpret:
        raise RuntimeError(f"attention_with_tangent(backend='triton'): TRITON_INTERPRET is "
                           f"{os.environ.get('TRITON_INTERPRET')!r} now but Triton was imported with"
                           f"{'' if _KERNEL['interpret'] else 'out'} it; set it before the first import of triton")
    return _KERNEL["fn"]


def _attention_jvp_fwd(Q, K, V, QD, KD, VD, O, OD, scale, L, S,
                       HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_QD: tl.constexpr,
                       HAS_KD: tl.constexpr, HAS_VD: tl.constexpr, HAS_DS: tl.constexpr,
                       DOT_PRECISION: tl.constexpr):
    # One program: BLOCK_M query rows of one (batch, head); tensors are contiguous (BH, N, D).
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    row_ok = offs_m[:, None] < L
    q_ptrs = bh * L * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    q = tl.load(Q + q_ptrs, mask=row_ok, other=0.0)
    if HAS_QD:
        qd = tl.load(QD + q_ptrs, mask=row_ok, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    mu = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_V], dtype=tl.float32)
    t1 = tl.zeros([BLOCK_M, HEAD_DIM_V], dtype=tl.float32)
    t2 = tl.zeros([BLOCK_M, HEAD_DIM_V], dtype=tl.float32)

    hi = S
    if IS_CAUSAL:  # key blocks past the last row of this block are fully masked
        hi = tl.minimum(S, (pid_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        kn = start_n + offs_n
        col_ok = kn[None, :] < S
        k_ptrs = bh * S * HEAD_DIM + kn[:, None] * HEAD_DIM + offs_d[None, :]
        v_ptrs = bh * S * HEAD_DIM_V + kn[:, None] * HEAD_DIM_V + offs_dv[None, :]
        k = tl.load(K + k_ptrs, mask=kn[:, None] < S, other=0.0)
        v = tl.load(V + v_ptrs, mask=kn[:, None] < S, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
        keep = col_ok
        if IS_CAUSAL:
            keep = keep & (kn[None, :] <= offs_m[:, None])
        scores = tl.where(keep, scores, float("-inf"))
        # Key 0 is kept for every row (causal is top-left aligned), so m_new is finite.
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        if HAS_DS:
            ds = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            if HAS_QD:
                ds += tl.dot(qd, tl.trans(k), input_precision=DOT_PRECISION)
            if HAS_KD:
                kd = tl.load(KD + k_ptrs, mask=kn[:, None] < S, other=0.0)
                ds += tl.dot(q, tl.trans(kd), input_precision=DOT_PRECISION)
            pds = p * (ds * scale)  # p = 0 where masked
            mu = mu * alpha + tl.sum(pds, 1)
            t1 = t1 * alpha[:, None] + tl.dot(pds.to(v.dtype), v, input_precision=DOT_PRECISION)
        if HAS_VD:
            vd = tl.load(VD + v_ptrs, mask=kn[:, None] < S, other=0.0)
            t2 = t2 * alpha[:, None] + tl.dot(p.to(vd.dtype), vd, input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    out_dot = (t1 + t2) / l_i[:, None] - (mu / l_i)[:, None] * out
    o_ptrs = bh * L * HEAD_DIM_V + offs_m[:, None] * HEAD_DIM_V + offs_dv[None, :]
    tl.store(O + o_ptrs, out.to(O.dtype.element_ty), mask=row_ok)
    tl.store(OD + o_ptrs, out_dot.to(OD.dtype.element_ty), mask=row_ok)
