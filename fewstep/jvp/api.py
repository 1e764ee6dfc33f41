"""One JVP for every method: `out, out_tangent = jvp(net, args, tangents, kwargs, mode=...)`.

`out` is `net(*args, **kwargs)` with autograd (the graded forward), `out_tangent` the forward-mode
derivative `J net . tangents` without a graph. `tangents[i]` belongs to `args[i]`: a tensor, a
number (broadcast like `args[i]`) or None (zero); `kwargs` have tangent zero. Modes, one function
each in `_MODES`:

- "traced" (default): the tangent engine traced once per input signature into one aten graph of
  primal and tangent (`fewstep.jvp.traced`), replayed at every call, optionally compiled; the
  same arithmetic without the per-op Python. A forward that cannot be traced (branches on tensor
  values) runs "tangent" instead, with one warning per network.
- "tangent": the tangent engine (`fewstep.jvp.engine`), one call of the network's own
  forward carrying tangents op by op; any network, about the memory of a plain training step.
- "separate": `torch.func.jvp` in a no-grad pass, then a graded forward with the same random
  draws (dropout masks); under `torch.no_grad()` the second pass is skipped.
- "single": one forward-mode AD pass (dual tensors) with autograd on: one pass, but autograd
  keeps the tangent's activations too.

The last two run attention on the math backend (fused kernels have no forward-mode AD, pytorch#128971).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.autograd import forward_ad
from torch.nn.attention import SDPBackend, sdpa_kernel

from fewstep.jvp.engine import tangent_forward
from fewstep.jvp.traced import traced_jvp


def forward_ad_attention():
    """`torch.func.jvp` and dual tensors need the math SDPA backend: the fused kernels have no
    forward-mode AD (pytorch#128971). The tangent engine needs no such switch."""
    return sdpa_kernel(SDPBackend.MATH)


def _same_random_draws(args: tuple):
    """Restores the RNG state on exit, so that the pass after the block draws what the pass inside
    drew (one dropout mask for the JVP and the graded forward)."""
    like = next((x for x in args if isinstance(x, torch.Tensor)), None)
    cuda = like is not None and like.device.type == "cuda"
    return torch.random.fork_rng(devices=[like.device] if cuda else [], device_type="cuda" if cuda else "cpu")


def _full_tangents(args: tuple, tangents: tuple) -> list[tuple[int, torch.Tensor]]:
    """`(i, tangent of args[i])` for the args with a nonzero tangent, each a tensor of args[i]'s shape."""
    out = []
    for i, (x, tx) in enumerate(zip(args, tangents)):
        if tx is None:
            continue
        tx = torch.as_tensor(tx, dtype=x.dtype, device=x.device)
        out.append((i, tx.expand(x.shape)))
    return out


def _jvp_tangent(net, args, tangents, kwargs):
    out, tout = tangent_forward(net, args, tangents, kwargs)
    return out, _detach(tout)


def _jvp_traced(net, args, tangents, kwargs, compile=False):
    full = dict(_full_tangents(args, tangents))
    tangents = tuple(full.get(i) for i in range(len(args)))
    result = traced_jvp(net, args, tangents, kwargs, compile)
    return _jvp_tangent(net, args, tangents, kwargs) if result is None else result


def _jvp_separate(net, args, tangents, kwargs):
    moving = _full_tangents(args, tangents)

    def f(*primals):
        full = list(args)
        for (i, _), p in zip(moving, primals):
            full[i] = p
        return net(*full, **kwargs)

    graded = torch.is_grad_enabled()
    with forward_ad_attention():  # both passes: the same attention arithmetic
        with _same_random_draws(args), torch.no_grad():
            primal, tout = torch.func.jvp(f, tuple(args[i] for i, _ in moving), tuple(t for _, t in moving))
        return (net(*args, **kwargs) if graded else primal), tout


def _jvp_single(net, args, tangents, kwargs):
    moving = dict(_full_tangents(args, tangents))
    with forward_ad.dual_level(), forward_ad_attention():
        duals = [forward_ad.make_dual(x, moving[i]) if i in moving else x for i, x in enumerate(args)]
        out = forward_ad.unpack_dual(net(*duals, **kwargs))
        return out.primal, (torch.zeros_like(out.primal) if out.tangent is None else out.tangent.detach())


_MODES: dict[str, Callable] = {"traced": _jvp_traced, "tangent": _jvp_tangent, "separate": _jvp_separate,
                               "single": _jvp_single}
JVP_MODES = tuple(_MODES)


def _detach(tree):
    if isinstance(tree, torch.Tensor):
        return tree.detach()
    if isinstance(tree, (list, tuple)):
        return type(tree)(_detach(t) for t in tree)
    if isinstance(tree, dict):
        return {k: _detach(v) for k, v in tree.items()}
    return tree


def jvp(net, args: tuple, tangents: tuple, kwargs: dict | None = None, mode: str = "traced",
        compile: bool = False):
    """`(net(*args, **kwargs), J net . tangents)`: the output with autograd and its JVP without a graph.

    `tangents[i]` is the tangent of `args[i]` (a tensor, a number, or None: zero); `kwargs` carry
    none. `mode`: one of `JVP_MODES` (module docstring); they agree to rounding. `compile=True`
    (mode "traced" only) runs the joint graph through `torch.compile`, as does a `net` that is
    itself `torch.compile`'d."""
    fn = _MODES.get(mode)
    if fn is None:
        raise ValueError(f"jvp mode must be one of {list(JVP_MODES)}, got {mode!r}")
    if compile and mode != "traced":
        raise ValueError(f"jvp: compile=True needs mode='traced', got mode={mode!r}")
    args, tangents = tuple(args), tuple(tangents)
    if len(tangents) != len(args):
        raise ValueError(f"jvp: {len(tangents)} tangents for {len(args)} args (None for an arg without one)")
    for i, (x, tx) in enumerate(zip(args, tangents)):
        if tx is not None and not (isinstance(x, torch.Tensor) and x.is_floating_point()):
            raise ValueError(f"jvp: args[{i}] is not a floating tensor, so its tangent must be None")
    kwargs = dict(kwargs or {})
    # A keyword tensor that is also a positional arg (r = t in MeanFlow) is a distinct input with
    # tangent zero: a view gives it its own identity (the engine keys tangents by identity).
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor) and any(v is x for x in args):
            kwargs[k] = v.view_as(v)
    return fn(net, args, tangents, kwargs, compile=True) if compile else fn(net, args, tangents, kwargs)


__all__ = ["JVP_MODES", "forward_ad_attention", "jvp"]
