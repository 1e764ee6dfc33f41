"""A tangent engine for unmodified networks (issue #10): `F(x, t)` with autograd AND the
forward-mode tangent `J F . (x_dot, t_dot)` without a graph, in ONE call of `net(...)`.

    out, out_dot = tangent_forward(net, (x, t), (x_dot, t_dot))

Design: a `torch.overrides.TorchFunctionMode`, not a tensor subclass. Inside the mode every
torch op is intercepted once at its outermost entry (`F.linear`, `F.group_norm`,
`F.scaled_dot_product_attention`, `Tensor.__add__`, ...): the op runs unchanged on the real
tensors (so autograd records the primal exactly as in a plain forward, fused kernels and all,
and module hooks fire because `net.__call__` is used), then, if any input has a tangent, the
op's tangent rule runs under `torch.no_grad()` on DETACHED primals. Tangents live beside the
tensors in a `TangentStore`, keyed by tensor identity with weak references, so a tangent
dies with its primal. Why a mode rather than a subclass: a subclass would have to wrap every tensor the
network creates (parameters, buffers, `torch.zeros` inside forward, outputs of custom
autograd Functions), changes `type(x)` seen by user code (isinstance checks, `.data`, C++
extensions reject subclasses), and adds a wrapper allocation per op; the mode sees every op
(factory functions included) with plain tensors everywhere, and its per-op cost is a walk
over the op's arguments plus a dictionary lookup per tensor (the overhead per op with a
tangent on top of the tangent's own arithmetic: 25-45 us per op on one shared CPU thread,
measured on fewstep's UNet (410 ops); `torch.utils._pytree` and `WeakIdKeyDictionary`
cost about twice that, so this path uses neither).

Rules (exact JVPs, each registered with the public `@tangent_rule(*ops)`, which takes rules for
your own ops too; a rule sees a `TangentContext`): linear, conv1d/2d/3d and
conv_transpose1d/2d/3d, group_norm, layer_norm, silu, gelu, relu, sigmoid, tanh, softplus, mish,
hardswish, hardsigmoid, hardtanh, relu6, leaky_relu, elu, selu, celu, logsigmoid, softsign,
tanhshrink, softmax, log_softmax, softmin, exp, expm1, sin, cos, tan, sinh, cosh, atan, atan2,
asinh, erf, log, log2, log10, log1p, sqrt, rsqrt, reciprocal, abs, square, pow, nan_to_num,
add/sub/mul/div (tangents on either side, broadcasting), neg, views and reshapes, getitem and
setitem, chunk/split/unbind, cat/stack, index_select/gather/take_along_dim, scatter (src or value)/
scatter_add/index_add/index_put/masked_select/masked_scatter (and their in-place forms), cumsum,
cumprod and prod (zeros included), diff, unfold/fold, interpolate, pooling by averages, max pooling
(F.max_pool1d/2d/3d, F.adaptive_max_pool1d/2d/3d: the tangent at the argmax), topk/sort (the
values' tangent at the returned indices), pad, grid_sample (tangents of the
input and of the grid; 4-D and 5-D, every mode), mean/sum, matmul/bmm/mm/einsum,
addmm/baddbmm/addbmm/addmv/addr, addcmul/addcdiv, lerp, masked_fill, clamp (bounds with tangents
too), maximum/minimum and max/min/amax/amin (ties: the mean of the tied tangents, as forward-mode
AD; max/min along a dim: the tangent at the returned index), fmax/fmin (the non-NaN side; ties as
maximum), logsumexp, var/std/var_mean/std_mean (any dim, correction or unbiased, keepdim),
rms_norm, batch_norm (train: batch statistics; eval: running ones), instance_norm (F. and torch.
forms, as layer_norm and group_norm), native_layer_norm (its mean and 1/std too), normalize and the
vector norms (`torch.linalg.vector_norm`, `torch.norm`, `Tensor.norm`, `torch.linalg.norm`; any p:
+-inf, p < 1, 0; zero vectors: tangent 0), embedding (F. and torch.
forms: the weight's tangent gathered), glu, steps (round/floor/ceil/trunc/sign: zero),
tensors made after another (`new_zeros`, `zeros_like`, ...: constants), `scaled_dot_product_attention` (docs/math.md#attention-tangent-rule, causal flag, bool/float masks,
GQA), dropout (ONE mask: `F.dropout` and `torch.dropout` run as `torch.native_dropout`, which returns its
mask; on CPU it draws the same mask as `F.dropout` from the same RNG state; dropout1d/2d/3d take
their mask from the op run on ones, which draws what the call on the input draws). Tensors without a
tangent (weights, constants, labels, embedding tables) have tangent zero, never materialized
unless an op needs it (cat of a tangent and a constant). Any other op falls back to
forward-mode AD of that single op (`torch.autograd.forward_ad`), logged once per op name; a
`torch.library` custom op without a rule, or an op forward-mode AD cannot run, is a one-line
`NoTangentRuleError`.

Limits: an in-place op on a VIEW updates the view's tangent, not its base's (`y[0].zero_()`
leaves y's tangent stale; `y[0] = v` is handled); SDPA with `dropout_p > 0` raises (its mask is
internal to the kernel); a random op without a rule (`F.alpha_dropout`, `F.rrelu` in training)
draws again in its forward-mode AD fallback, so its tangent does not use the primal's draw; a
Python tensor object that dies while its C++ tensor lives on (stored only in C++) loses its tangent.

`check_tangent(net, inputs)` compares the engine with float64 central finite differences
(and `torch.func.jvp` where it runs) and, in a debug pass, every rule with forward-mode AD of
its op, naming the first op that disagrees or had no rule.
"""

from __future__ import annotations

import copy
import inspect
import math
import warnings
import weakref

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

__all__ = ["NoRule", "NoTangentRuleError", "RULES", "TangentContext", "TangentMode", "check_tangent", "tangent_forward",
           "tangent_rule"]


class NoRule(Exception):
    """Raised by a rule for a case it does not cover: the op falls back to forward-mode AD."""


class NoTangentRuleError(ValueError):
    """An op with no tangent rule that forward-mode AD cannot run either (a `torch.library` custom
    op, an op without a forward-AD formula): register a rule with `tangent_rule`."""


_WARNED: set[str] = set()


def op_name(func) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)


def _warn_once(name: str, why: str) -> None:
    if name not in _WARNED:
        _WARNED.add(name)
        warnings.warn(f"tangent engine: {why} {name}; using forward-mode AD of this op", stacklevel=3)


def _is_float(x) -> bool:
    return isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex())


def _map(fn, x):
    """`fn` applied to the leaves of nested tuples/lists/dicts (a faster `pytree.tree_map` for
    op arguments: this runs on every op)."""
    if isinstance(x, (list, tuple)) and not isinstance(x, torch.Size):
        ys = [_map(fn, y) for y in x]
        if type(x) is tuple:
            return tuple(ys)
        if type(x) is list:
            return ys
        return type(x)(*ys) if hasattr(x, "_fields") else type(x)(ys)
    if isinstance(x, dict):
        return {k: _map(fn, v) for k, v in x.items()}
    return fn(x)


def _leaves(x):
    if isinstance(x, (list, tuple)) and not isinstance(x, torch.Size):
        for y in x:
            yield from _leaves(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _leaves(y)
    else:
        yield x


def _any_tangent(store: dict, xs) -> bool:
    """Whether any tensor among `xs` (nested tuples, lists, dicts) has a tangent in `store`
    (`TangentStore._d`): the mode's first question for every op, without generators."""
    for x in xs:
        if isinstance(x, torch.Tensor):
            entry = store.get(id(x))
            if entry is not None and entry[0]() is x:
                return True
        elif isinstance(x, (list, tuple)):
            if not isinstance(x, torch.Size) and _any_tangent(store, x):
                return True
        elif isinstance(x, dict) and _any_tangent(store, x.values()):
            return True
    return False


class TangentContext:
    """What a tangent rule sees (`tangent_rule`).

    - `ctx.op`: the op that ran (the callable the rule is registered for);
    - `ctx.out`: its primal output, detached (None in a `primal=True` rule, which runs the op itself);
    - `ctx.tangent(x)`: the tangent of the argument `x`, or None where it is zero (weights, labels,
      numbers, tensors the tangents do not reach);
    - `ctx.set_tangent(y, ty)`: `primal=True` rules only: attach `ty` to the tensor `y` (None: zero).

    A rule may raise `NoRule` for a case it does not cover: the op then falls back to forward-mode AD.
    """

    __slots__ = ("op", "out", "_tangents", "_store")

    def __init__(self, op, out, tangents: dict[int, torch.Tensor] | None = None, store: "TangentStore | None" = None):
        self.op, self.out, self._tangents, self._store = op, out, tangents, store

    def tangent(self, x):
        if not isinstance(x, torch.Tensor):
            return None
        if self._store is not None:
            return self._store.get(x)
        return self._tangents.get(id(x))

    def set_tangent(self, y: torch.Tensor, ty) -> None:
        if self._store is None:
            raise RuntimeError("ctx.set_tangent is for primal=True rules; a plain rule returns the tangent")
        if ty is None:
            self._store.pop(y)
        else:
            self._store[y] = ty


def _sum(*terms):
    """Sum of the tangent terms that are not None (None if all are)."""
    total = None
    for term in terms:
        if term is not None:
            total = term if total is None else total + term
    return total


def _sum_fresh(terms):
    """`_sum` of tensors this rule just made (no one else holds them): accumulated in place, one
    allocation less per term -- the rules run on activation-sized tensors."""
    terms = [t for t in terms if t is not None]
    if not terms:
        return None
    total = terms[0]
    for term in terms[1:]:
        if total.shape == term.shape and total.dtype == term.dtype:
            total.add_(term)
        else:
            total = total + term
    return total


# ---------------------------------------------------------------------------------------------
# Rules: rule(ctx, *args, **kwargs) -> tangent (same structure as the op's output) or None.

RULES: dict = {}  # op -> rule, filled by `tangent_rule`
PRIMAL_RULES: dict = {}  # op -> rule that also runs the op (`tangent_rule(..., primal=True)`)
_WHERE = (torch, torch.Tensor, F)


def _resolve(op) -> list:
    """The callables an op of `tangent_rule` stands for: a name is every torch, torch.Tensor and
    torch.nn.functional callable of that name; a `torch.library` custom op is its overload and its
    packet (what `torch.ops.ns.name` calls); any other callable is itself."""
    if isinstance(op, str):
        found = [f for f in (getattr(where, op, None) for where in _WHERE) if f is not None and callable(f)]
        if not found:
            raise ValueError(f"tangent_rule: no torch, torch.Tensor or torch.nn.functional callable is named {op!r}")
        return found
    overload = getattr(op, "_opoverload", None)  # torch.library.custom_op's CustomOpDef
    if isinstance(overload, torch._ops.OpOverload):
        op = overload
    if isinstance(op, torch._ops.OpOverload):
        return [op, op.overloadpacket]
    if isinstance(op, torch._ops.OpOverloadPacket):
        return [op] + [getattr(op, name) for name in op.overloads()]
    if not callable(op):
        raise ValueError(f"tangent_rule: an op is a callable or a name, got {type(op).__name__}")
    return [op]


def tangent_rule(*ops, primal: bool = False):
    """Register the decorated function as the tangent rule of `ops` (callables such as `torch.exp`,
    `F.linear`, a `torch.library` custom op, or names looked up in torch, torch.Tensor and F).

        @tangent_rule(my_lib_op)
        def _(ctx, x, scale=1.0):          # the op's own arguments, detached
            return ctx.tangent(x) * ...    # the output's tangent (None: zero)

    The rule runs without autograd on detached arguments after the op ran; it returns the tangent
    with the structure of the op's output. `ctx` is a `TangentContext`. With `primal=True` the rule
    runs the op itself on the live arguments, returns its output and attaches tangents with
    `ctx.set_tangent` (ops whose tangent needs something the primal draws, such as dropout's mask).
    A later registration for the same op replaces the earlier one."""
    if not ops:
        raise ValueError("tangent_rule needs at least one op")
    funcs = [f for op in ops for f in _resolve(op)]

    def register(rule):
        for f in funcs:
            (PRIMAL_RULES if primal else RULES)[f] = rule
            (RULES if primal else PRIMAL_RULES).pop(f, None)
        _DISPATCH.clear()
        return rule
    return register


_DISPATCH: dict = {}  # op -> what the mode needs to know of it (`_dispatch`); cleared by `tangent_rule`


def _dispatch(func) -> tuple:
    """`(primal rule, in-place twin's name, op whose rule applies, that rule, op name)` of `func`,
    worked out once per op: the name parsing and lookups would otherwise run at every call."""
    entry = _DISPATCH.get(func)
    if entry is None:
        twin = _inplace_name(func)
        rule_func = func
        if twin is not None:  # the out-of-place op's rule, on a saved copy of the input
            rule_func = next((f for f in (getattr(where, twin, None) for where in (torch.Tensor, torch, F))
                              if f is not None and f in RULES), None)
        entry = _DISPATCH[func] = (PRIMAL_RULES.get(func), twin, rule_func,
                                   None if rule_func is None else RULES.get(rule_func), op_name(func))
    return entry


def _linear_in_all(c, *args, **kwargs):
    """Ops linear in all their floating tensor inputs jointly (views, cat, sums, interpolation):
    the same op on the tangents (zeros for the inputs that have none)."""
    def sub(x):
        if not _is_float(x):
            return x
        tx = c.tangent(x)
        return tx if tx is not None else torch.zeros_like(x)
    return c.op(*_map(sub, args), **_map(sub, kwargs))


_LINEAR_NAMES = (
    "view", "view_as", "reshape", "reshape_as", "permute", "transpose", "swapaxes", "swapdims", "t",
    "flatten", "unflatten", "unsqueeze", "squeeze", "expand", "expand_as", "contiguous", "clone",
    "__getitem__", "chunk", "split", "tensor_split", "unbind", "cat", "concat", "concatenate", "stack",
    "hstack", "vstack", "movedim", "moveaxis", "narrow", "select", "flip", "roll", "repeat",
    "repeat_interleave", "tile", "mean", "sum", "neg", "negative", "__neg__", "to", "float", "double",
    "half", "bfloat16", "type_as", "interpolate", "upsample", "avg_pool1d", "avg_pool2d", "avg_pool3d",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "pixel_shuffle",
    "pixel_unshuffle", "diagonal", "tril", "triu", "real", "imag", "conj", "__pos__", "as_tensor",
    "asarray", "index_select", "gather", "take_along_dim", "cumsum", "scatter_add", "index_add", "index_put",
    "masked_select", "masked_scatter", "diff", "unfold", "fold",
)
tangent_rule(*_LINEAR_NAMES, torch._C._nn.avg_pool2d, torch.Tensor.T.__get__, torch.Tensor.mT.__get__)(_linear_in_all)


def _multilinear(c, *args, **kwargs):
    """Ops linear in each tensor input separately (mul, matmul, einsum): the sum over inputs with
    a tangent of the op with that input replaced by its tangent."""
    terms = []
    for x in _leaves((args, kwargs)):
        tx = c.tangent(x)
        if tx is not None:
            sub = lambda y, x=x, tx=tx: tx if y is x else y  # noqa: E731
            terms.append(c.op(*_map(sub, args), **_map(sub, kwargs)))
    return _sum_fresh(terms)


tangent_rule("mul", "multiply", "__mul__", "__rmul__", "matmul", "__matmul__", "__rmatmul__", "mm",
                 "bmm", "einsum", "outer", "dot", "bilinear")(_multilinear)


@tangent_rule("round", "floor", "ceil", "trunc", "fix", "sign")
def _piecewise_constant(c, x, *args, **kwargs):
    """Steps: zero tangent (forward-mode AD's choice at the jumps too)."""
    return None


@tangent_rule("new_zeros", "new_ones", "new_full", "new_empty", "new_tensor", "zeros_like", "ones_like", "full_like",
              "empty_like", "rand_like", "randn_like", "randint_like")
def _fresh(c, x, *args, **kwargs):
    """Tensors made after another one's shape and dtype: constants, no tangent."""
    return None


@tangent_rule("detach")
def _detach(c, x):
    """`detach` cuts the tangent as it cuts the gradient (as forward-mode AD does)."""
    return None


@tangent_rule("add", "__add__", "__radd__")
def _add(c, a, b, *, alpha=1):
    ta, tb = c.tangent(a), c.tangent(b)
    return _sum(ta, None if tb is None else (tb if alpha == 1 else tb * alpha))


@tangent_rule("sub", "subtract", "__sub__")
def _sub(c, a, b, *, alpha=1):
    ta, tb = c.tangent(a), c.tangent(b)
    return _sum(ta, None if tb is None else -tb * alpha)


@tangent_rule("__rsub__")
def _rsub(c, a, b, *, alpha=1):  # b - alpha a
    ta, tb = c.tangent(a), c.tangent(b)
    return _sum(tb, None if ta is None else -ta * alpha)


@tangent_rule("div", "divide", "true_divide", "__truediv__", "__div__")
def _div(c, a, b, *, rounding_mode=None):
    if rounding_mode is not None:
        return None  # piecewise constant
    ta, tb = c.tangent(a), c.tangent(b)
    return _sum(None if ta is None else ta / b, None if tb is None else -tb * c.out / b)


@tangent_rule("__rtruediv__", "__rdiv__")
def _rdiv(c, a, b):  # b / a
    ta, tb = c.tangent(a), c.tangent(b)
    return _sum(None if tb is None else tb / a, None if ta is None else -ta * c.out / a)


def _unary(deriv):
    def rule(c, x, *args, **kwargs):
        tx = c.tangent(x)
        return None if tx is None else tx * deriv(x, c.out, *args, **kwargs)
    return rule


tangent_rule("exp")(_unary(lambda x, y: y))
tangent_rule("sin")(_unary(lambda x, y: torch.cos(x)))
tangent_rule("cos")(_unary(lambda x, y: -torch.sin(x)))
tangent_rule("log")(_unary(lambda x, y: 1.0 / x))
tangent_rule("sqrt")(_unary(lambda x, y: 0.5 / y))
tangent_rule("rsqrt")(_unary(lambda x, y: -0.5 * y * y * y))
tangent_rule("abs")(_unary(lambda x, y: torch.sign(x)))
tangent_rule("square")(_unary(lambda x, y: 2.0 * x))
tangent_rule("tan")(_unary(lambda x, y: 1.0 + y * y))
tangent_rule("log1p", torch.special.log1p)(_unary(lambda x, y: 1.0 / (1.0 + x)))
tangent_rule("expm1", torch.special.expm1)(_unary(lambda x, y: y + 1.0))
tangent_rule("atan", "arctan")(_unary(lambda x, y: 1.0 / (1.0 + x * x)))
tangent_rule("asinh", "arcsinh")(_unary(lambda x, y: torch.rsqrt(x * x + 1.0)))
tangent_rule("sinh")(_unary(lambda x, y: torch.cosh(x)))
tangent_rule("cosh")(_unary(lambda x, y: torch.sinh(x)))
tangent_rule("erf", torch.special.erf)(_unary(lambda x, y: (2.0 / math.sqrt(math.pi)) * torch.exp(-x * x)))
tangent_rule("reciprocal")(_unary(lambda x, y: -y * y))
tangent_rule("logsigmoid")(_unary(lambda x, y: torch.sigmoid(-x)))  # d log s(x) = 1 - s(x) = s(-x)
tangent_rule("softsign")(_unary(lambda x, y: (1.0 + x.abs()).pow(-2)))
tangent_rule("tanhshrink")(_unary(lambda x, y: torch.tanh(x).square()))
tangent_rule("log2")(_unary(lambda x, y: 1.0 / (x * math.log(2.0))))
tangent_rule("log10")(_unary(lambda x, y: 1.0 / (x * math.log(10.0))))


@tangent_rule("atan2", "arctan2")
def _atan2(c, input, other):
    """`atan2(y, x)`: `(x dy - y dx) / (x^2 + y^2)`."""
    ty, tx = c.tangent(input), c.tangent(other)
    r2 = input * input + other * other
    return _sum(None if ty is None else ty * other / r2, None if tx is None else -tx * input / r2)


@tangent_rule("nan_to_num")
def _nan_to_num(c, x, nan=0.0, posinf=None, neginf=None, *, out=None):
    """The replaced entries are constants; the finite ones keep their tangent."""
    return torch.where(x.isfinite(), c.tangent(x), 0.0)


def _fused_unary(backward):
    """Elementwise ops have a diagonal Jacobian, so the JVP is the VJP: PyTorch's fused backward
    kernel of the op, fed the tangent as its incoming gradient (one pass, one allocation)."""
    def rule(c, x, *args, **kwargs):
        tx = c.tangent(x)
        return None if tx is None else backward(tx.to(x.dtype), x, c.out, *args, **kwargs)
    return rule


tangent_rule("sigmoid", torch.special.expit)(_fused_unary(lambda tx, x, y: torch.ops.aten.sigmoid_backward(tx, y)))
tangent_rule("tanh")(_fused_unary(lambda tx, x, y: torch.ops.aten.tanh_backward(tx, y)))
tangent_rule("relu")(_unary(lambda x, y, inplace=False: (x > 0).to(x.dtype)))


tangent_rule("silu", torch._C._nn.silu)(
    _fused_unary(lambda tx, x, y, inplace=False: torch.ops.aten.silu_backward(tx, x)))
tangent_rule("gelu")(_fused_unary(lambda tx, x, y, approximate="none":
                                  torch.ops.aten.gelu_backward(tx, x, approximate=approximate)))
_aten = torch.ops.aten
tangent_rule("softplus")(_fused_unary(lambda tx, x, y, beta=1.0, threshold=20.0:
                                      _aten.softplus_backward(tx, x, beta, threshold)))
tangent_rule("mish")(_fused_unary(lambda tx, x, y, inplace=False: _aten.mish_backward(tx, x)))
tangent_rule("hardswish")(_fused_unary(lambda tx, x, y, inplace=False: _aten.hardswish_backward(tx, x)))
tangent_rule("hardsigmoid")(_fused_unary(lambda tx, x, y, inplace=False: _aten.hardsigmoid_backward(tx, x)))
tangent_rule("hardtanh")(_fused_unary(lambda tx, x, y, min_val=-1.0, max_val=1.0, inplace=False:
                                      _aten.hardtanh_backward(tx, x, min_val, max_val)))
tangent_rule("relu6")(_fused_unary(lambda tx, x, y, inplace=False: _aten.hardtanh_backward(tx, x, 0.0, 6.0)))
tangent_rule("leaky_relu")(_fused_unary(lambda tx, x, y, negative_slope=0.01, inplace=False:
                                        _aten.leaky_relu_backward(tx, x, negative_slope, False)))
# elu(x, alpha, scale, input_scale) of aten: F.elu is (alpha, 1, 1), selu fixed alpha and scale,
# celu (alpha, 1, 1 / alpha)
_SELU_ALPHA, _SELU_SCALE = 1.6732632423543772848170429916717, 1.0507009873554804934193349852946
tangent_rule("elu")(_fused_unary(lambda tx, x, y, alpha=1.0, inplace=False:
                                 _aten.elu_backward(tx, alpha, 1.0, 1.0, False, x)))
tangent_rule("selu")(_fused_unary(lambda tx, x, y, inplace=False:
                                  _aten.elu_backward(tx, _SELU_ALPHA, _SELU_SCALE, 1.0, False, x)))
tangent_rule("celu")(_fused_unary(lambda tx, x, y, alpha=1.0, inplace=False:
                                  _aten.elu_backward(tx, alpha, 1.0, 1.0 / alpha, False, x)))


@tangent_rule("where")
def _where(c, *args, **kwargs):
    """`torch.where(cond, a, b)`, `a.where(cond, b)`: the tangents picked by cond, zero for a number or
    a tensor without a tangent (the linear rule would take a number for its own tangent)."""
    if len(args) != 3 or kwargs:
        raise NoRule  # where(cond) (indices), keyword calls: forward-mode AD of the op
    cond, a, b = (args[1], args[0], args[2]) if c.op is torch.Tensor.where else args
    ta, tb = c.tangent(a), c.tangent(b)
    if ta is None and tb is None:
        return None
    zero = torch.zeros((), dtype=c.out.dtype, device=c.out.device)
    return torch.where(cond, zero if ta is None else ta, zero if tb is None else tb)


def _clamp_tangent(c, x, lo, hi):
    """`min(max(x, lo), hi)`: x's tangent where x is within the bounds (ends included, as autograd),
    the crossed bound's outside (zero for a number); `lo > hi` gives hi, as the op does."""
    tx, tlo, thi = c.tangent(x), c.tangent(lo), c.tangent(hi)
    if tx is None and tlo is None and thi is None:
        return None
    zero = torch.zeros((), dtype=c.out.dtype, device=c.out.device)
    t = zero if tx is None else tx
    if lo is not None:
        t = torch.where(x < lo, zero if tlo is None else tlo, t)
    if hi is not None:
        t = torch.where((x if lo is None else x.clamp_min(lo)) > hi, zero if thi is None else thi, t)
    return t


tangent_rule("clamp", "clip")(lambda c, x, min=None, max=None: _clamp_tangent(c, x, min, max))
tangent_rule("clamp_min")(lambda c, x, min: _clamp_tangent(c, x, min, None))
tangent_rule("clamp_max")(lambda c, x, max: _clamp_tangent(c, x, None, max))


@tangent_rule("pow", "__pow__")
def _pow(c, x, exponent):
    if isinstance(exponent, torch.Tensor) and c.tangent(exponent) is not None:
        raise NoRule
    tx = c.tangent(x)
    if tx is None:
        return None
    if not isinstance(x, torch.Tensor):
        raise NoRule
    return tx * exponent * x.pow(exponent - 1)


@tangent_rule("__rpow__")
def _rpow(c, x, base):  # base ** x, base a number
    tx = c.tangent(x)
    if tx is None or isinstance(base, torch.Tensor):
        raise NoRule
    return tx * c.out * math.log(base)


def _softmax_dim(x, dim):
    """`F.softmax(x)` without a dim picks one (deprecated, but still called): 0 for 0-, 1- and 3-D x, else 1."""
    return dim if dim is not None else (0 if x.dim() in (0, 1, 3) else 1)


@tangent_rule("softmax")
def _softmax(c, x, dim=None, *args, **kwargs):
    tx = c.tangent(x).to(c.out.dtype)
    y = c.out
    return y * (tx - (y * tx).sum(_softmax_dim(x, dim), keepdim=True))


@tangent_rule(F.softmin)
def _softmin(c, x, dim=None, _stacklevel=3, dtype=None):
    """`softmax(-x)`: `y (sum(y dx) - dx)`."""
    tx = c.tangent(x).to(c.out.dtype)
    y = c.out
    return y * ((y * tx).sum(_softmax_dim(x, dim), keepdim=True) - tx)


@tangent_rule("log_softmax")
def _log_softmax(c, x, dim=None, *args, **kwargs):
    tx = c.tangent(x).to(c.out.dtype)
    return tx - (c.out.exp() * tx).sum(_softmax_dim(x, dim), keepdim=True)


@tangent_rule(F.linear)
def _linear(c, x, weight, bias=None):
    tx, tw, tb = c.tangent(x), c.tangent(weight), c.tangent(bias)
    return _sum(None if tx is None else F.linear(tx, weight),
                None if tw is None else F.linear(x, tw), tb)


@tangent_rule(F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)
def _conv(c, x, weight, bias=None, *rest, **kwargs):
    """Convolutions, transposed or not, are linear in x and in the weight separately: the op on each
    tangent (stride, padding, output_padding, groups, dilation passed through), plus the bias's."""
    tx, tw, tb = c.tangent(x), c.tangent(weight), c.tangent(bias)
    if tb is not None:
        tb = tb.reshape(-1, *([1] * (weight.dim() - 2)))
    return _sum(None if tx is None else c.op(tx, weight, None, *rest, **kwargs),
                None if tw is None else c.op(x, tw, None, *rest, **kwargs), tb)


def _norm_tangent(n, r, tx, dims):
    """Tangent of `n = (x - mean) r`, `r = 1 / sqrt(var + eps)` over `dims`:
    `r (dx - mean(dx) - n mean(n dx))` (mean(n) = 0); two activation-sized allocations."""
    n_dot_mean = (n * tx).mean(dims, keepdim=True)
    out = tx - tx.mean(dims, keepdim=True)
    return out.addcmul_(n, n_dot_mean, value=-1).mul_(r)


def _affine_tangent(n, tn, weight, bias, tw, tb, shape):
    """Tangent of `n * w + b` with w, b broadcast as `shape`."""
    terms = [None if tn is None else (tn if weight is None else tn * weight.reshape(shape)),
             None if tw is None else n * tw.reshape(shape),
             None if tb is None else tb.reshape(shape)]
    return _sum(*terms)


@tangent_rule(F.group_norm)
def _group_norm(c, x, num_groups, weight=None, bias=None, eps=1e-5):
    tx, tw, tb = c.tangent(x), c.tangent(weight), c.tangent(bias)
    b, ch = x.shape[:2]
    # the normalized x and 1/std in one pass (the kernel the primal ran; 8x faster on CPU than a
    # separate variance)
    n, _, rstd = torch.native_group_norm(x.contiguous(), None, None, b, ch, x.numel() // (b * ch), num_groups, eps)
    tn = None
    if tx is not None:
        ng = n.reshape(b, num_groups, -1)
        tn = _norm_tangent(ng, rstd.reshape(b, num_groups, 1), tx.to(x.dtype).reshape(ng.shape), -1).reshape(x.shape)
    return _affine_tangent(n, tn, weight, bias, tw, tb, (1, -1) + (1,) * (x.dim() - 2))


@tangent_rule(F.layer_norm)
def _layer_norm(c, x, normalized_shape, weight=None, bias=None, eps=1e-5):
    tx, tw, tb = c.tangent(x), c.tangent(weight), c.tangent(bias)
    n, _, rstd = torch.native_layer_norm(x.contiguous(), normalized_shape, None, None, eps)
    dims = tuple(range(-len(normalized_shape), 0))
    tn = None if tx is None else _norm_tangent(n, rstd, tx.to(x.dtype), dims)
    return _affine_tangent(n, tn, weight, bias, tw, tb, tuple(normalized_shape))


def _reduced(x, dim) -> tuple:
    """The dims a reduction's `dim` names (None or empty: all), as non-negative ints."""
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        return tuple(range(x.dim()))
    return tuple(sorted(d % max(x.dim(), 1) for d in ((dim,) if isinstance(dim, int) else dim)))


def _keep(y, dims, keepdim):
    """A reduction's output with its reduced dims kept (size 1), to broadcast against its input."""
    if keepdim:
        return y
    for d in dims:
        y = y.unsqueeze(d)
    return y


@tangent_rule("rms_norm")
def _rms_norm(c, x, normalized_shape, weight=None, eps=None):
    """`y = x r w`, `r = 1 / sqrt(mean(x^2) + eps)`: `dy = w r (dx - n mean(n dx))`, n = x r
    (docs/math.md#normalizations-and-reductions)."""
    tx, tw = c.tangent(x), c.tangent(weight)
    dims = tuple(range(-len(normalized_shape), 0))
    r = x.square().mean(dims, keepdim=True).add_(torch.finfo(x.dtype).eps if eps is None else eps).rsqrt_()
    n = x * r
    tn = None
    if tx is not None:
        tx = tx.to(x.dtype)
        tn = (tx - n * (n * tx).mean(dims, keepdim=True)).mul_(r)
    return _affine_tangent(n, tn, weight, None, tw, None, tuple(normalized_shape))


def _stats_norm(x, running_mean, running_var, use_batch: bool, dims: tuple, eps: float):
    """`(n, 1/std)` of batch and instance norm: statistics over `dims` of x itself, or the running ones."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    if not use_batch:
        rstd = (running_var + eps).rsqrt().reshape(shape)
        return (x - running_mean.reshape(shape)) * rstd, rstd
    # the batch statistics by the kernel the primal ran (no running stats passed: nothing updated)
    if dims[0] == 0:
        n, _, rstd = torch.native_batch_norm(x, None, None, None, None, True, 0.0, eps)
        return n, rstd.reshape(shape)
    flat = x.reshape(1, -1, *x.shape[2:])  # instance norm: one "channel" per (sample, channel)
    n, _, rstd = torch.native_batch_norm(flat, None, None, None, None, True, 0.0, eps)
    return n.reshape(x.shape), rstd.reshape(x.shape[0], x.shape[1], *([1] * (x.dim() - 2)))


def _stats_norm_tangent(c, x, running_mean, running_var, weight, bias, use_batch, dims, eps):
    if c.tangent(running_mean) is not None or c.tangent(running_var) is not None:
        raise NoRule  # running statistics with tangents of their own: forward-mode AD
    tx, tw, tb = c.tangent(x), c.tangent(weight), c.tangent(bias)
    n, rstd = _stats_norm(x, running_mean, running_var, use_batch, dims, eps)
    tn = None
    if tx is not None:  # batch statistics: the normalization's tangent; running ones: a scaling
        tn = _norm_tangent(n, rstd, tx.to(x.dtype), dims) if use_batch else tx * rstd
    return _affine_tangent(n, tn, weight, bias, tw, tb, (1, -1) + (1,) * (x.dim() - 2))


@tangent_rule(F.batch_norm)
def _batch_norm(c, x, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    """Train mode: normalized by the batch's statistics per channel; eval: an affine map of x."""
    return _stats_norm_tangent(c, x, running_mean, running_var, weight, bias, training,
                               (0,) + tuple(range(2, x.dim())), eps)


@tangent_rule(F.instance_norm)
def _instance_norm(c, x, running_mean=None, running_var=None, weight=None, bias=None, use_input_stats=True,
                   momentum=0.1, eps=1e-5):
    return _stats_norm_tangent(c, x, running_mean, running_var, weight, bias, use_input_stats,
                               tuple(range(2, x.dim())), eps)


# The same ops called as torch.* (another argument order, and a trailing cudnn flag).
tangent_rule(torch.layer_norm)(lambda c, x, normalized_shape, weight=None, bias=None, eps=1e-5, cudnn_enable=True:
                               _layer_norm(c, x, normalized_shape, weight, bias, eps))
tangent_rule(torch.group_norm)(lambda c, x, num_groups, weight=None, bias=None, eps=1e-5, cudnn_enabled=True:
                               _group_norm(c, x, num_groups, weight, bias, eps))
tangent_rule(torch.batch_norm)(
    lambda c, x, weight, bias, running_mean, running_var, training, momentum, eps, cudnn_enabled:
    _stats_norm_tangent(c, x, running_mean, running_var, weight, bias, training, (0,) + tuple(range(2, x.dim())), eps))
tangent_rule(torch.instance_norm)(
    lambda c, x, weight, bias, running_mean, running_var, use_input_stats, momentum, eps, cudnn_enabled:
    _stats_norm_tangent(c, x, running_mean, running_var, weight, bias, use_input_stats, tuple(range(2, x.dim())), eps))


@tangent_rule(torch.native_layer_norm)
def _native_layer_norm(c, x, normalized_shape, weight, bias, eps):
    """`(y, mean, 1/std)`: y's tangent as layer_norm's, `d mean = mean(dx)`, `d r = -r^2 mean(n dx)`."""
    tx, tw, tb = c.tangent(x), c.tangent(weight), c.tangent(bias)
    _, mean, rstd = c.out
    dims = tuple(range(-len(normalized_shape), 0))
    n = (x - mean) * rstd
    if tx is None:
        return _affine_tangent(n, None, weight, bias, tw, tb, tuple(normalized_shape)), None, None
    tx = tx.to(x.dtype)
    tn = _norm_tangent(n, rstd, tx, dims)
    return (_affine_tangent(n, tn, weight, bias, tw, tb, tuple(normalized_shape)), tx.mean(dims, keepdim=True),
            -rstd * rstd * (n * tx).mean(dims, keepdim=True))


def _pnorm_tangent(x, tx, p, dims, norm):
    """`d|x|_p` over `dims` (`norm` with them kept): `sum(|x|^(p-1) sign(x) dx) / |x|_p^(p-1)`, the
    entries where x = 0 skipped and 0 where the norm is 0 (as autograd: no NaN); 0 for p = 0 (a
    count); for p = +-inf the mean of `sign(x) dx` over the entries at the max (min) |x|
    (docs/math.md#normalizations-and-reductions)."""
    if p == 0:
        return torch.zeros_like(norm)
    if math.isinf(p):
        hit = (x.abs() == norm).to(x.dtype)
        return (x.sign() * tx * hit).sum(dims, keepdim=True) / hit.sum(dims, keepdim=True)
    w = x if p == 2 else x.abs().pow(p - 1).mul_(x.sign()).masked_fill_(x == 0, 0.0)
    return ((w * tx).sum(dims, keepdim=True) / (norm if p == 2 else norm.pow(p - 1))).masked_fill_(norm == 0, 0.0)


@tangent_rule(torch.linalg.vector_norm)
def _vector_norm(c, x, ord=2, dim=None, keepdim=False, *, dtype=None, out=None):
    tx = c.tangent(x)
    if tx is None:
        return None
    if x.is_complex():
        raise NoRule
    dims = _reduced(x, dim)
    x = x.to(c.out.dtype)  # dtype=: the norm of x in that dtype
    return _pnorm_tangent(x, tx.to(x.dtype), ord, dims, _keep(c.out, dims, keepdim)).reshape(c.out.shape)


@tangent_rule(torch.norm)
def _norm(c, x, p="fro", dim=None, keepdim=False, out=None, dtype=None):
    """`torch.norm`, `Tensor.norm`: a vector norm over `dim` (all: None), but for the nuclear and the
    other matrix norms (forward-mode AD)."""
    if isinstance(p, str):
        if p != "fro" or not (dim is None or isinstance(dim, int) or len(dim) <= 2):
            raise NoRule
        p = 2
    return _vector_norm(c, x, 2 if p is None else p, dim, keepdim, dtype=dtype)


tangent_rule(torch.Tensor.norm)(lambda c, x, p="fro", dim=None, keepdim=False, dtype=None:
                                _norm(c, x, p, dim, keepdim, dtype=dtype))


@tangent_rule(torch.linalg.norm)
def _linalg_norm(c, x, ord=None, dim=None, keepdim=False, *, out=None, dtype=None):
    """A vector norm where `torch.linalg.norm` computes one: the 2-norm of all the entries for
    ord None (or of two dims, "fro"), any ord over one dim or of a 1-D x; matrix norms: forward-mode AD."""
    one_dim = isinstance(dim, int) or (dim is not None and len(dim) == 1) or (dim is None and x.dim() == 1)
    if ord is None or ord == "fro":
        ord = 2
    elif isinstance(ord, str) or not one_dim:
        raise NoRule
    return _vector_norm(c, x, ord, dim, keepdim, dtype=dtype)


@tangent_rule(F.normalize)
def _normalize(c, x, p=2.0, dim=1, eps=1e-12, out=None):
    """`y = x / max(|x|_p, eps)`: `dy = dx / d - y d|x|_p / d` where the norm is above eps."""
    tx = c.tangent(x)
    if tx is None:
        return None
    if out is not None:
        raise NoRule
    norm = torch.linalg.vector_norm(x, p, dim, keepdim=True)
    d = norm.clamp_min(eps)
    return (tx - c.out * _pnorm_tangent(x, tx, p, _reduced(x, dim), norm) * (norm > eps)) / d


@tangent_rule("addmm", "baddbmm", "addbmm", "addmv", "addr")
def _add_product(c, input, a, b, *, beta=1, alpha=1):
    """`beta input + alpha a b` (b a matrix, a vector, or a's outer product with b): the op itself
    accumulates the product tangents `alpha (da b + a db)`; with beta 0 its input is ignored."""
    ti, ta, tb = c.tangent(input), c.tangent(a), c.tangent(b)
    acc = None if ti is None or beta == 0 else ti * beta
    for x, y in ((ta, b), (a, tb)):
        if x is not None and y is not None:
            acc = c.op(input, x, y, beta=0, alpha=alpha) if acc is None else c.op(acc, x, y, alpha=alpha)
    return acc


@tangent_rule("addcmul")
def _addcmul(c, input, t1, t2, *, value=1):
    ti, ta, tb = c.tangent(input), c.tangent(t1), c.tangent(t2)
    prod = _sum(None if ta is None else ta * t2, None if tb is None else t1 * tb)
    return _sum(ti, None if prod is None else prod * value)


@tangent_rule("addcdiv")
def _addcdiv(c, input, t1, t2, *, value=1):
    ti, ta, tb = c.tangent(input), c.tangent(t1), c.tangent(t2)
    quot = _sum(None if ta is None else ta / t2, None if tb is None else -tb * t1 / (t2 * t2))
    return _sum(ti, None if quot is None else quot * value)


@tangent_rule("lerp")
def _lerp(c, x, end, weight):
    """`x + w (end - x)`, w a number or a tensor (with a tangent of its own)."""
    tx, te, tw = c.tangent(x), c.tangent(end), c.tangent(weight)
    return _sum(None if tx is None else tx * (1 - weight), None if te is None else te * weight,
                None if tw is None else tw * (end - x))


@tangent_rule("masked_fill")
def _masked_fill(c, x, mask, value):
    """Filled entries take the value's tangent (zero for a number), the others keep x's."""
    tx, tv = c.tangent(x), c.tangent(value)
    if tx is None and tv is None:
        return None
    zero = torch.zeros((), dtype=c.out.dtype, device=c.out.device)
    return torch.where(mask, zero if tv is None else tv, zero if tx is None else tx)


@tangent_rule("scatter")
def _scatter(c, x, dim, index, src=None, value=None, reduce=None):
    """Linear in x and src jointly: the same op on their tangents; a scattered number is a constant."""
    if reduce is not None:
        raise NoRule  # the deprecated reduce= form: forward-mode AD
    src = value if src is None else src
    tx, ts = c.tangent(x), c.tangent(src)
    if tx is None and ts is None:
        return None
    tx = torch.zeros_like(x) if tx is None else tx.to(x.dtype).expand(x.shape)
    if not isinstance(src, torch.Tensor):
        return tx.scatter(dim, index, 0.0)
    return c.op(tx, dim, index, torch.zeros_like(src) if ts is None else ts.to(x.dtype))


@tangent_rule("cumprod")
def _cumprod(c, x, dim, *, dtype=None):
    """`d y_k = sum_{j<=k} y_k dx_j / x_j` before the first zero, `dx_z prod_{j<=k, j!=z} x_j` from
    the first zero z to the second, zero after it (no division by zero, no branch on values;
    docs/math.md#normalizations-and-reductions)."""
    tx = c.tangent(x)
    if tx is None:
        return None
    zero = x == 0
    xs = x.masked_fill(zero, 1.0).to(c.out.dtype)  # the product skips the zeros
    ys, zeros_so_far = xs.cumprod(dim), zero.cumsum(dim)
    before = ys * (tx / xs).masked_fill(zero, 0.0).cumsum(dim)
    at_one = ys * tx.masked_fill(~zero, 0.0).cumsum(dim)
    return torch.where(zeros_so_far == 0, before, torch.where(zeros_so_far == 1, at_one, 0.0))


@tangent_rule("prod")
def _prod(c, x, dim=None, keepdim=False, *, dtype=None):
    """`d prod = prod sum(dx / x)` without zeros, `dx_z prod_{j != z} x_j` with one zero z, 0 with two or
    more (no division by zero, no branch on values; docs/math.md#normalizations-and-reductions)."""
    tx = c.tangent(x)
    if tx is None:
        return None
    tx = tx.to(c.out.dtype).expand(x.shape)
    if dim is None:  # prod of all the entries
        x, tx, dim = x.reshape(-1), tx.reshape(-1), 0
    zero = x == 0
    xs = x.masked_fill(zero, 1.0).to(c.out.dtype)  # the product skips the zeros
    zeros = zero.sum(dim, keepdim=True)
    dsum = torch.where(zeros == 0, (tx / xs).sum(dim, keepdim=True),
                       torch.where(zeros == 1, tx.masked_fill(~zero, 0.0).sum(dim, keepdim=True), 0.0))
    return (xs.prod(dim, keepdim=True) * dsum).reshape(c.out.shape)


def _winner(c, a, b, larger: bool):
    """maximum/minimum: the winner's tangent; at a tie their mean (as PyTorch's forward-mode AD,
    and as central differences see it)."""
    ta, tb = c.tangent(a), c.tangent(b)
    if ta is None and tb is None:
        return None
    zero = torch.zeros((), dtype=c.out.dtype, device=c.out.device)
    ta, tb = zero if ta is None else ta, zero if tb is None else tb
    return torch.where(a == b, (ta + tb) * 0.5, torch.where(a > b if larger else a < b, ta, tb))


def _tied_mean(x, tx, out, dim, keepdim):
    """A full or dim reduction to the max/min: the mean tangent of the entries equal to it."""
    dims = _reduced(x, dim)
    hit = (x == _keep(out, dims, keepdim)).to(tx.dtype)
    return (tx * hit).sum(dims, keepdim=keepdim) / hit.sum(dims, keepdim=keepdim)


def _extremum(larger: bool):
    def rule(c, x, *args, **kwargs):
        other = args[0] if args else kwargs.get("other")
        if isinstance(other, torch.Tensor):  # max(a, b): elementwise
            return _winner(c, x, other, larger)
        tx = c.tangent(x)
        if tx is None:
            return None
        if not args and "dim" not in kwargs:  # max(x): one value
            return _tied_mean(x, tx, c.out, None, False)
        dim = args[0] if args else kwargs["dim"]
        keepdim = args[1] if len(args) > 1 else kwargs.get("keepdim", False)
        values, indices = c.out  # max(x, dim): the tangent at the returned index
        t = tx.gather(dim, indices if keepdim else indices.unsqueeze(dim))
        return (t if keepdim else t.squeeze(dim)), None
    return rule


@tangent_rule("topk", "sort")
def _sorted_values(c, x, *args, **kwargs):
    """topk, sort: the values' tangent is x's gathered at the returned indices (constants)."""
    tx = c.tangent(x)
    if tx is None:
        return None
    i = 1 if c.op.__name__ == "topk" else 0
    dim = args[i] if len(args) > i else kwargs.get("dim", -1)
    return tx.expand(x.shape).gather(dim, c.out[1]), None


# max pooling -> (its form that returns the argmax indices, number of pooled dims)
_MAX_POOLS = {F.max_pool1d: (F.max_pool1d_with_indices, 1), F.max_pool2d: (F.max_pool2d_with_indices, 2),
              F.max_pool3d: (F.max_pool3d_with_indices, 3), torch.max_pool1d: (F.max_pool1d_with_indices, 1),
              torch.max_pool2d: (F.max_pool2d_with_indices, 2), torch.max_pool3d: (F.max_pool3d_with_indices, 3),
              F.adaptive_max_pool1d: (F.adaptive_max_pool1d_with_indices, 1),
              F.adaptive_max_pool2d: (F.adaptive_max_pool2d_with_indices, 2),
              F.adaptive_max_pool3d: (F.adaptive_max_pool3d_with_indices, 3)}
_MAX_POOLS.update({f: (f, k) for f, k in list(_MAX_POOLS.values())})


@tangent_rule(*_MAX_POOLS)
def _max_pool(c, x, *args, **kwargs):
    """Max pooling: x's tangent at the argmax of each window (at a tie, the index the kernel picks,
    as forward-mode AD; central differences would see the tied entries' mean). Without
    `return_indices` the op runs again for its indices."""
    tx = c.tangent(x)
    if tx is None:
        return None
    with_indices, k = _MAX_POOLS[c.op]
    indices = c.out[1] if isinstance(c.out, tuple) else with_indices(x, *args, **kwargs)[1]
    t = tx.expand(x.shape).flatten(-k).gather(-1, indices.flatten(-k)).view(indices.shape)
    return (t, None) if isinstance(c.out, tuple) else t


tangent_rule("maximum")(lambda c, a, b: _winner(c, a, b, True))
tangent_rule("minimum")(lambda c, a, b: _winner(c, a, b, False))


@tangent_rule("fmax", "fmin")
def _fmax(c, a, other):
    """maximum/minimum that ignore NaN: the non-NaN side's tangent, ties averaged as `_winner`
    (forward-mode AD takes b's tangent at a tie)."""
    t = _winner(c, a, other, c.op.__name__ == "fmax")  # a NaN `a` loses there already
    ta = c.tangent(a)
    return None if t is None else torch.where(other.isnan(), 0.0 if ta is None else ta, t)


tangent_rule("max")(_extremum(True))
tangent_rule("min")(_extremum(False))


@tangent_rule("amax", "amin")
def _amax(c, x, dim=(), keepdim=False):
    tx = c.tangent(x)
    return None if tx is None else _tied_mean(x, tx, c.out, dim, keepdim)


@tangent_rule("logsumexp")
def _logsumexp(c, x, dim, keepdim=False):
    """`d lse = sum(softmax(x) dx)` over the reduced dims."""
    tx = c.tangent(x)
    if tx is None:
        return None
    dims = _reduced(x, dim)
    return (torch.exp(x - _keep(c.out, dims, keepdim)) * tx).sum(dims, keepdim=keepdim)


def _var_args(x, args, kwargs) -> tuple:
    """`(dims, correction, keepdim)` from var/std's overloads: `(dim, unbiased, keepdim)`,
    `(unbiased)`, `dim=..., correction=..., keepdim=...`."""
    args = list(args)
    unbiased = args.pop(0) if args and isinstance(args[0], bool) else None
    dim = args[0] if args else kwargs.get("dim")
    if len(args) > 1:
        unbiased = args[1]
    keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
    unbiased = kwargs.get("unbiased", True if unbiased is None else unbiased)
    correction = kwargs.get("correction")
    return _reduced(x, dim), (int(unbiased) if correction is None else correction), keepdim


def _var_tangent(x, tx, dims, correction, keepdim):
    """`d var = 2 sum((x - mean) dx) / (N - correction)` (sum(x - mean) = 0 drops mean's tangent)."""
    count = math.prod(x.shape[d] for d in dims)
    centered = x - x.mean(dims, keepdim=True)
    return (centered * tx).sum(dims, keepdim=keepdim).mul_(2.0).div_(max(count - correction, 0))


def _std_tangent(std, tvar):
    """`d std = d var / (2 std)`, zero where std is (as forward-mode AD)."""
    return (tvar / (2 * std)).masked_fill_(std == 0, 0.0)


@tangent_rule("var", "std", "var_mean", "std_mean")
def _var_std(c, x, *args, **kwargs):
    tx = c.tangent(x)
    if tx is None:
        return None
    if x.is_complex():
        raise NoRule
    dims, correction, keepdim = _var_args(x, args, kwargs)
    tvar = _var_tangent(x, tx.to(x.dtype), dims, correction, keepdim)
    name = c.op.__name__
    if name == "var":
        return tvar
    if name == "std":
        return _std_tangent(c.out, tvar)
    tmean = tx.mean(dims, keepdim=keepdim)
    return (tvar if name == "var_mean" else _std_tangent(c.out[0], tvar)), tmean


@tangent_rule(F.embedding)
def _embedding(c, input, weight, padding_idx=None, max_norm=None, *args, **kwargs):
    """The rows of the weight's tangent the indices pick (indices carry none)."""
    if max_norm is not None:
        raise NoRule  # the primal renormalized the weight in place
    tw = c.tangent(weight)
    return None if tw is None else F.embedding(input, tw)


@tangent_rule(torch.embedding)
def _torch_embedding(c, weight, indices, padding_idx=-1, scale_grad_by_freq=False, sparse=False):
    tw = c.tangent(weight)
    return None if tw is None else torch.embedding(tw, indices)


_GRID_MODES = {"bilinear": 0, "nearest": 1, "bicubic": 2}
_GRID_PADDINGS = {"zeros": 0, "border": 1, "reflection": 2}


@tangent_rule(F.grid_sample)
def _grid_sample(c, input, grid, mode="bilinear", padding_mode="zeros", align_corners=None):
    """Linear in the input. In the grid: the sampled value's gradient with respect to its location,
    per channel, from the op's backward kernel run on each channel as its own sample (one pass;
    docs/math.md#normalizations-and-reductions)."""
    x, tx, tg = input, c.tangent(input), c.tangent(grid)
    tgrid = None
    if tg is not None:
        n, ch = x.shape[:2]
        back = torch.ops.aten.grid_sampler_2d_backward if x.dim() == 4 else torch.ops.aten.grid_sampler_3d_backward
        ones = torch.ones((n * ch, 1) + c.out.shape[2:], dtype=x.dtype, device=x.device)
        _, dgrid = back(ones, x.reshape(n * ch, 1, *x.shape[2:]), grid.repeat_interleave(ch, 0), _GRID_MODES[mode],
                        _GRID_PADDINGS[padding_mode], bool(align_corners), (False, True))
        tgrid = (dgrid.reshape(n, ch, *dgrid.shape[1:]) * tg.unsqueeze(1)).sum(-1)
    return _sum(None if tx is None else F.grid_sample(tx, grid, mode, padding_mode, align_corners), tgrid)


@tangent_rule(F.glu)
def _glu(c, x, dim=-1):
    """`a sigmoid(b)` of x's halves: `da s + a s (1 - s) db`."""
    tx = c.tangent(x)
    if tx is None:
        return None
    a, b = x.chunk(2, dim)
    ta, tb = tx.chunk(2, dim)
    s = torch.sigmoid(b)
    return ta * s + a * s * (1 - s) * tb


@tangent_rule(F.pad)
def _pad(c, x, pad, mode="constant", value=None):
    tx = c.tangent(x)
    return None if tx is None else F.pad(tx, pad, mode, 0.0 if mode == "constant" else None)


@tangent_rule(F.scaled_dot_product_attention)
def _sdpa(c, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """docs/math.md#attention-tangent-rule, by `fewstep.jvp.attention`: the math path, or on CUDA the fused Triton kernel
    (one pass over K/V, O(L) memory) whatever backend computed the primal."""
    if dropout_p > 0.0:  # the fused kernel's mask is not observable; a redraw would not match it
        raise NotImplementedError("tangent engine: scaled_dot_product_attention with dropout_p > 0 has no tangent "
                                  "with the primal's mask; use dropout_p=0 (or F.dropout on the attention output)")
    from fewstep.jvp.attention import attention_tangent

    out_dot = attention_tangent(q, k, v, c.tangent(q), c.tangent(k), c.tangent(v), attn_mask, is_causal, scale)
    return None if out_dot is None else out_dot.to(c.out.dtype)


# Rules that run the op themselves (`primal=True`): the tangent needs what the primal draws or overwrites.


def _native_dropout(c, input, tx, p, inplace):
    """Dropout as `torch.native_dropout`, which returns its mask; the tangent uses the same mask."""
    if inplace:
        _warn_once(op_name(c.op), "inplace=True is run out of place by")
    y, mask = torch.native_dropout(input, p, True)
    with torch.no_grad():
        c.set_tangent(y, tx * mask * (1.0 / (1.0 - p)))
    return y


@tangent_rule(F.dropout, primal=True)
def _dropout(c, input, p=0.5, training=True, inplace=False):
    """On CPU `torch.native_dropout` draws the same mask as `F.dropout` from the same RNG state."""
    tx = c.tangent(input)
    if tx is None or not training or p == 0.0 or p >= 1.0:
        return c.op(input, p, training, inplace)
    return _native_dropout(c, input, tx, p, inplace)


@tangent_rule(torch.dropout, primal=True)
def _torch_dropout(c, input, p, train):
    tx = c.tangent(input)
    if tx is None or not train or p == 0.0 or p >= 1.0:
        return c.op(input, p, train)
    return _native_dropout(c, input, tx, p, False)


@tangent_rule(F.dropout1d, F.dropout2d, F.dropout3d, primal=True)
def _channel_dropout(c, input, p=0.5, training=True, inplace=False):
    """Channel dropout: the op run on ones returns its scaled mask, drawn as a call on `input` draws
    it (the draws depend on the shape only); the primal and the tangent are both multiplied by it."""
    tx = c.tangent(input)
    if tx is None or not training or p == 0.0:
        return c.op(input, p, training, inplace)
    if inplace:
        _warn_once(op_name(c.op), "inplace=True is run out of place by")
    mask = c.op(torch.ones_like(input), p, True)
    y = input * mask
    with torch.no_grad():
        c.set_tangent(y, tx * mask)
    return y


@tangent_rule(torch.Tensor.__setitem__, primal=True)
def _setitem(c, x, index, value):
    tx, tv = c.tangent(x), c.tangent(value)
    c.op(x, index, value)
    if tx is None and tv is None:
        return None
    with torch.no_grad():
        new = tx.clone() if tx is not None else torch.zeros_like(x, memory_format=torch.preserve_format)
        new[index] = 0.0 if tv is None else tv
    c.set_tangent(x, new)
    return None


@tangent_rule(torch.Tensor.zero_, torch.Tensor.fill_, primal=True)
def _overwrite(c, x, *args, **kwargs):
    """`x.zero_()`, `x.fill_(value)`: the tangent of x becomes zero, or the value's (a 0-dim tensor)."""
    value = args[0] if args else kwargs.get("value")
    tv = c.tangent(value)
    out = c.op(x, *args, **kwargs)
    c.set_tangent(out, None if tv is None else tv.expand(out.shape))
    return out


# ---------------------------------------------------------------------------------------------
# The mode.


def _forward_ad_tangent(func, args, kwargs, tangents: dict[int, torch.Tensor]):
    """The tangent of one op by forward-mode AD on detached primals (no graph)."""
    try:
        return _forward_ad(func, args, kwargs, tangents, contiguous=False)
    except RuntimeError:  # some forward-AD formulas (group_norm) view non-contiguous inputs
        return _forward_ad(func, args, kwargs, tangents, contiguous=True)


def _forward_ad(func, args, kwargs, tangents, contiguous):
    with fwAD.dual_level(), sdpa_kernel(SDPBackend.MATH):  # fused CPU attention has no forward AD
        def dual(x):
            if not isinstance(x, torch.Tensor):
                return x
            tx = tangents.get(id(x))
            if contiguous:
                x = x.contiguous()
            if tx is None:
                return x
            tx = tx.to(x.dtype)
            return fwAD.make_dual(x, tx.contiguous() if contiguous else tx)
        out = func(*_map(dual, args), **_map(dual, kwargs))
        return _map(lambda y: fwAD.unpack_dual(y).tangent if isinstance(y, torch.Tensor) else None, out)


def _is_library_op(func) -> bool:
    """A `torch.library` custom op: opaque to forward-mode AD (which silently gives no tangent)."""
    return (isinstance(func, (torch._ops.OpOverload, torch._ops.OpOverloadPacket))
            and func.namespace not in ("aten", "prim", "prims"))


def _fallback_tangent(func, name, args, kwargs, tangents):
    """An op without a rule: forward-mode AD of that one op, or a one-line error saying what to do."""
    how = "register one with @fewstep.jvp.tangent_rule(op) (README: 'Add a tangent rule for your own op')"
    if _is_library_op(func):
        raise NoTangentRuleError(f"tangent engine: no tangent rule for the custom op {name}; {how}")
    _warn_once(name, "no tangent rule for")
    try:
        return _forward_ad_tangent(func, args, kwargs, tangents)
    except (RuntimeError, NotImplementedError) as e:
        why = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise NoTangentRuleError(f"tangent engine: no tangent rule for {name}, and forward-mode AD cannot run it "
                                 f"({why}); {how}") from None


def _reference_err(func, tout, args, kwargs, tangents) -> float:
    """Debug: a rule's relative difference from forward-mode AD of its op (nan: no reference, as for
    custom ops, which forward-mode AD cannot run)."""
    if _is_library_op(func):
        return math.nan
    try:
        ref = _forward_ad_tangent(func, args, kwargs, tangents)
    except (RuntimeError, NotImplementedError):
        return math.nan
    if func is torch.native_layer_norm:  # forward-mode AD gives mean and 1/std tangent zero (wrong)
        tout, ref = tout[0], ref[0]
    return _rel_err(tout, ref)


_INPLACE_POSITION: dict = {}


def _inplace_flag(func, args, kwargs) -> bool:
    """Whether a functional op (`F.silu(x, True)`, `F.relu(x, inplace=True)`) runs in place."""
    if "inplace" in kwargs:
        return kwargs["inplace"] is True
    pos = _INPLACE_POSITION.get(func, -2)
    if pos == -2:
        try:
            names = list(inspect.signature(func).parameters)
            pos = names.index("inplace") if "inplace" in names else -1
        except (TypeError, ValueError):
            pos = -1
        _INPLACE_POSITION[func] = pos
    return 0 <= pos < len(args) and args[pos] is True


def _inplace_name(func) -> str | None:
    """The out-of-place twin's name of an in-place op, or None: Tensor methods ('add_' -> 'add')
    and the functional forms (`torch.exp_`, `F.relu_`, `F.leaky_relu_`): by PyTorch's naming, a
    trailing underscore means in place."""
    name = getattr(func, "__name__", "")
    if name.startswith("__i") and name.endswith("__"):
        return "__" + name[3:]
    if name.endswith("_") and not name.endswith("__") and not name.startswith("_"):
        return name[:-1]
    return None


class TangentStore:
    """Tangents keyed by tensor identity: `id(x) -> (weakref to x, tangent)`; an entry is dropped
    when its tensor dies (the weakref callback), so ids are never confused. A leaner
    `torch.utils.weak.WeakIdKeyDictionary` (this lookup runs for every argument of every op)."""

    def __init__(self):
        self._d: dict[int, tuple] = {}

    def get(self, x, default=None):
        e = self._d.get(id(x))
        return e[1] if e is not None and e[0]() is x else default

    def __contains__(self, x) -> bool:
        e = self._d.get(id(x))
        return e is not None and e[0]() is x

    def __setitem__(self, x, tangent) -> None:
        key, d = id(x), self._d
        d[key] = (weakref.ref(x, lambda _, key=key: d.pop(key, None)), tangent)

    def pop(self, x) -> None:
        if x in self:
            del self._d[id(x)]

    def __len__(self) -> int:
        return len(self._d)


class TangentMode(TorchFunctionMode):
    """Carries a tangent beside each tensor (`self.tangents`, keyed by tensor identity).

    `debug=True` also runs every rule against forward-mode AD of its op and records, per op, the
    largest relative difference (`self.record`: list of (op name, rel err or None if no rule)).
    """

    def __init__(self, debug: bool = False):
        super().__init__()
        self.tangents = TangentStore()
        self.debug = debug
        self.record: list[tuple[str, float | None]] = []
        self.record_modules: list[str] = []  # debug: the module each recorded op ran in
        self.module_stack: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        store = self.tangents._d
        if not (_any_tangent(store, args) or (kwargs and _any_tangent(store, kwargs.values()))):
            return func(*args, **kwargs)  # the common case, kept cheap: this runs for every op
        primal_rule, twin, rule_func, rule, name = _dispatch(func)
        if primal_rule is not None:
            return primal_rule(TangentContext(func, None, store=self.tangents), *args, **kwargs)

        # Detached primals, and their tangents keyed by id; an in-place op keeps a copy of `self`.
        tangents: dict[int, torch.Tensor] = {}
        inplace = twin is not None or _inplace_flag(func, args, kwargs)
        out = None
        if not inplace:  # run the op first: most ops with a tangent input that return no
            out = func(*args, **kwargs)  # floating tensor (x.shape, x.dim()) stop here
            if not any(_is_float(y) for y in _leaves(out)):
                return out

        def detach(x):
            if not isinstance(x, torch.Tensor):
                return x
            d = x.detach().clone() if inplace and x is args[0] else x.detach()
            tx = self.tangents.get(x)
            if tx is not None:
                tangents[id(d)] = tx
            return d

        with torch.no_grad():
            dargs, dkwargs = _map(detach, args), _map(detach, kwargs)
        if inplace:
            out = func(*args, **kwargs)
            if not any(_is_float(y) for y in _leaves(out)):
                return out

        if "inplace" in dkwargs:
            dkwargs = dict(dkwargs, inplace=False)
        with torch.no_grad():
            dout = _map(lambda y: y.detach() if isinstance(y, torch.Tensor) else y, out)
            tout = None
            if rule is not None:
                try:
                    tout = rule(TangentContext(rule_func, dout, tangents), *dargs, **dkwargs)
                except NoRule:
                    rule = None
            if rule is None:
                tout = _fallback_tangent(func, name, dargs, dkwargs, tangents)
            if self.debug:
                err = None if rule is None else _reference_err(func, tout, dargs, dkwargs, tangents)
                self.record.append((name, err))
                self.record_modules.append(self.module_stack[-1] if self.module_stack else "")
            if tout is None:
                if inplace:  # the old tangent no longer describes the overwritten tensor
                    for y in _leaves(out):
                        if isinstance(y, torch.Tensor):
                            self.tangents.pop(y)
                return out
            for y, ty in zip(_leaves(out), _leaves(tout)):
                if _is_float(y) and isinstance(ty, torch.Tensor):
                    if ty.shape != y.shape:
                        ty = ty.expand(y.shape)
                    self.tangents[y] = ty.to(y.dtype)
        return out


def _rel_err(a, b) -> float:
    la = [x for x in pytree.tree_leaves(a) if isinstance(x, torch.Tensor)]
    lb = [x for x in pytree.tree_leaves(b) if isinstance(x, torch.Tensor)]
    err, scale = 0.0, 0.0
    for x, y in zip(la, lb):
        err = max(err, (x - y).abs().max().item())
        scale = max(scale, y.abs().max().item())
    if len(la) != len(lb):
        scale = max(scale, 1e-300)
        err = max(err, max((x.abs().max().item() for x in la + lb), default=0.0))
    return err / max(scale, 1e-300)


def _save_alias(tensor: torch.Tensor) -> torch.Tensor:
    """What autograd keeps for the backward: an alias of the tensor (same storage and version
    counter), not the tensor object itself. A tensor object that autograd holds keeps its Python
    object alive (PyTorch preserves it), and with it its tangent in the store; through the alias
    a tangent dies as soon as the forward code drops its tensor, as in a plain forward, so the
    tangents never pile up beside the saved activations."""
    return tensor.detach()


def _load_alias(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _module_tracking(net, mode: TangentMode) -> list:
    """Debug: global forward hooks that keep the qualified name of the running module on
    `mode.module_stack`, so that a bad op can be named with its module."""
    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

    names = {id(m): (n or type(m).__name__) for n, m in net.named_modules()} if isinstance(net, torch.nn.Module) \
        else {}

    def enter(module, args):
        mode.module_stack.append(names.get(id(module), type(module).__name__))

    def leave(module, args, out):
        if mode.module_stack:
            mode.module_stack.pop()

    return [register_module_forward_pre_hook(enter), register_module_forward_hook(leave)]


def tangent_forward(net, args: tuple, tangents: tuple, kwargs: dict | None = None, debug: bool = False):
    """`(net(*args, **kwargs), J net . tangents)` in one call of `net.__call__`.

    `tangents[i]` is the tangent of `args[i]`: a tensor, a number (broadcast like `args[i]`), or
    None (zero). The output carries autograd as in a plain forward; the tangent has no graph
    (zeros if the output does not depend on the tangents). With `debug=True` also returns the
    mode (its `record` of per-op rule errors).
    """
    net = getattr(net, "_orig_mod", net)  # torch.compile'd: the tangent pass runs eagerly (see fit)
    mode = TangentMode(debug=debug)
    for x, tx in zip(args, tangents):
        if tx is None or not _is_float(x):
            continue
        tx = torch.as_tensor(tx, dtype=x.dtype, device=x.device)
        mode.tangents[x] = tx.detach().expand(x.shape)
    hooks = _module_tracking(net, mode) if debug else []
    try:
        with mode, torch.autograd.graph.saved_tensors_hooks(_save_alias, _load_alias):
            out = net(*args, **(kwargs or {}))
    finally:
        for hook in hooks:
            hook.remove()

    def tangent_of(y):
        if not isinstance(y, torch.Tensor):
            return y
        ty = mode.tangents.get(y)
        return torch.zeros_like(y).detach() if ty is None else ty.contiguous()

    tout = pytree.tree_map(tangent_of, out)
    return (out, tout, mode) if debug else (out, tout)


# ---------------------------------------------------------------------------------------------
# Checking.


def check_tangent(net, example_inputs: tuple, tangents: tuple | None = None, kwargs: dict | None = None,
                  eps: float = 1e-6, tol: float = 1e-6) -> dict:
    """Compare the engine with float64 central finite differences of `net` (and `torch.func.jvp`
    where it runs). Random tangents for the floating inputs when `tangents` is None. Every
    evaluation replays the same RNG state, so dropout masks agree. Returns a dict:
    `rel_err_fd`, `rel_err_jvp` (None if func.jvp failed), `jvp_error`, `first_bad_op` (the first
    op whose rule differs from forward-mode AD by more than `tol`, or that had no rule) and
    `first_bad_module` (the qualified name of the module it ran in),
    `ops_without_rule`, `ops` (number of ops with a tangent)."""
    net64 = copy.deepcopy(net).double() if isinstance(net, torch.nn.Module) else net
    to64 = lambda x: x.detach().double() if _is_float(x) else x  # noqa: E731
    xs = tuple(to64(x) for x in example_inputs)
    if tangents is None:
        tangents = tuple(torch.randn_like(x) if _is_float(x) else None for x in xs)
    ts = tuple(None if t is None else to64(torch.as_tensor(t)) for t in tangents)
    kw = pytree.tree_map(to64, kwargs or {})
    seed = int(torch.randint(0, 2 ** 31, ()).item())

    def replay(fn):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return fn()

    def shifted(sign):
        return tuple(x if t is None else x + sign * eps * t for x, t in zip(xs, ts))

    fd = (replay(lambda: net64(*shifted(1), **kw)) - replay(lambda: net64(*shifted(-1), **kw))) / (2 * eps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, tout, mode = replay(lambda: tangent_forward(net64, xs, ts, kw, debug=True))
    report = {"rel_err_fd": _rel_err(tout, fd), "rel_err_jvp": None, "jvp_error": None,
              "ops": len(mode.record), "first_bad_op": None, "first_bad_module": None,
              "ops_without_rule": sorted({n for n, e in mode.record if e is None})}
    for (name, err), module in zip(mode.record, mode.record_modules):
        if err is None or err > tol:
            report["first_bad_op"] = (name, err)
            report["first_bad_module"] = module
            break
    idx = [i for i, t in enumerate(ts) if t is not None]

    def f(*prim):
        full = list(xs)
        for i, p in zip(idx, prim):
            full[i] = p
        return net64(*full, **kw)

    try:  # the MATH attention backend: fused CPU attention has no forward-mode AD
        with sdpa_kernel(SDPBackend.MATH):
            _, jt = replay(lambda: torch.func.jvp(f, tuple(xs[i] for i in idx), tuple(ts[i].expand(xs[i].shape)
                                                                                for i in idx)))
            report["rel_err_jvp"] = _rel_err(tout, jt)
    except Exception as e:  # noqa: BLE001 - reported, not raised: func.jvp is only a second opinion
        report["jvp_error"] = f"{type(e).__name__}: {e}"[:200]
    return report
