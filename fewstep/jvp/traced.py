"""The traced JVP: the tangent engine run once per input signature under `make_fx`, replayed as
one aten graph that carries the primal and its tangent side by side (docs/math.md#traced-jvp).

    out, out_dot = traced_jvp(net, (x, t), (x_dot, t_dot))          # mode="traced" of fewstep.jvp.jvp

Why trace the engine rather than write a second rule set: the engine's rules run under the tracer
exactly as they run eagerly, so the joint graph holds the same arithmetic, op for op, and a rule
registered with `@tangent_rule` (yours too) is in it. The rules read detached primals, and the
tracer records those `detach` nodes: replayed, autograd records the primal's ops only, so the
backward and the saved activations are those of a plain forward. Dropout's `native_dropout` is one
node whose mask feeds both the primal and the tangent; every replay draws a fresh mask, and draws
what an eager call would. The trace runs the ops on real tensors and restores the RNG after, so
when a signature is traced leaves no mark on the random stream (a resumed run, which traces at
another step, repeats the uninterrupted run's dropout masks bit for bit).

The tracer refuses any op that reads a tensor's value into Python, so a forward that branches on
a tensor's VALUE (`if x.max() > 0`, `.item()`) cannot be captured: it falls back to the eager
engine (`mode="tangent"`), with one warning per network naming the reason. Branches on shapes,
dtypes and flags are fine: they are part of the signature (shapes, strides, dtypes, devices of
every tensor, the values of the other arguments, which inputs carry tangents, the modules'
train/eval flags, grad and autocast state).

`compile=True` runs the joint graph through `torch.compile` (inductor): one compile per signature,
none per step, as the graph's inputs are tensors whose values may change freely; a network that
is itself `torch.compile`'d has its joint graph compiled with the same backend. A signature is
traced at its second call (`TRACE_AT_CALL`); the first runs the eager engine. Inside
`repeated_calls()` (fewstep's training loop) and compiled, it is traced at the first, so that
every step of a run, resumed or not, runs the same graph: inductor draws its random numbers its
own way, and the eager engine's gradients may differ from the graph's in the last bit.
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
import weakref

import torch
from torch.fx.experimental import proxy_tensor
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils import _pytree as pytree

from fewstep.jvp.engine import tangent_forward

__all__ = ["TracedJVP", "repeated_calls", "traced_jvp"]

_FALLBACK = object()  # a cache entry: this signature could not be traced
# A signature is traced at its second call; its first runs the eager engine. Training repeats a
# signature thousands of times, while a one-off call (a check, a test) would pay a trace of
# seconds for a single use. Inside `repeated_calls()` (the training loop) it is traced at once.
TRACE_AT_CALL = 2
_REPEATED: contextvars.ContextVar[bool] = contextvars.ContextVar("fewstep_traced_repeated", default=False)


@contextlib.contextmanager
def repeated_calls():
    """The calls in this block repeat their signatures (a training loop): each is traced at its
    first call, so every call of a signature runs its graph. The eager engine and the graph agree
    in value, but not always in the last bit of a gradient (the diffusers UNet's attention
    projections differ by ~1e-10), so a run that switched from one to the other at a step that
    depends on when the process started would not resume bit for bit."""
    token = _REPEATED.set(True)
    try:
        yield
    finally:
        _REPEATED.reset(token)


class TracedJVP:
    """The joint graphs of one network, one per input signature (`traced_jvp` keeps one per network)."""

    def __init__(self, net: torch.nn.Module):
        self.net = weakref.ref(net)
        self.graphs: dict = {}  # signature -> (graph module, output spec, compiled or None) or _FALLBACK
        self.seen: dict = {}  # signature -> calls so far, until it is traced
        self.warned = False
        self.traces = 0  # how many signatures were traced (tests count them)

    def __call__(self, args: tuple, tangents: tuple, kwargs: dict, compile=False):
        run = self.prepare(args, tangents, kwargs, compile)
        return None if run is None else run()

    def prepare(self, args: tuple, tangents: tuple, kwargs: dict, compile=False):
        """A function that runs the joint graph of this call's signature (traced now if new), or
        None when the network cannot be traced. `compile`: False, True (inductor), or a function
        that compiles a module (the `torch.compile` context of a compiled network)."""
        net = self.net()
        if any(type(p).__name__ == "DTensor" for p in net.parameters()):  # FSDP2 gathers them in hooks
            self._notice(net, "its parameters are sharded (FSDP2), gathered by hooks outside the graph")
            return None
        state = _state(net)
        leaves, spec = pytree.tree_flatten((args, tangents, kwargs))
        key = _signature(net, state, leaves, spec)
        entry = self.graphs.get(key)
        if entry is None:
            seen = self.seen[key] = self.seen.get(key, 0) + 1
            if seen < TRACE_AT_CALL and not compile and not _REPEATED.get():
                return None  # the eager engine, the same numbers and the same random draws
            del self.seen[key]
            entry = self.graphs[key] = self._trace(net, state, leaves, spec)
        if entry is _FALLBACK:
            return None
        gm, out_spec, compiled = entry
        if compile and compiled is None:
            compiled = compile(gm) if callable(compile) else torch.compile(gm, dynamic=False)
            self.graphs[key] = (gm, out_spec, compiled)
        graph = compiled if compile else gm
        inputs = [*state.values(), *(x for x in leaves if isinstance(x, torch.Tensor))]
        return lambda: pytree.tree_unflatten(list(graph(*inputs)), out_spec)

    def _trace(self, net, state: dict, leaves: list, spec):
        names, n_state = list(state), len(state)
        where = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
        out_spec = []

        def joint(*flat):
            full = list(leaves)
            for i, x in zip(where, flat[n_state:]):
                full[i] = x
            args, tangents, kwargs = pytree.tree_unflatten(full, spec)
            params = dict(zip(names, flat[:n_state]))

            def call(*a, **k):
                return torch.func.functional_call(net, params, a, k)

            out, tout = tangent_forward(call, args, tangents, kwargs)
            flat_out, out_spec_ = pytree.tree_flatten((out, tout))
            out_spec.append(out_spec_)
            return flat_out

        # The trace sees the grad requirements the replay will see: composite ops decide by them what
        # to save for backward (CUDA attention computes its logsumexp only for inputs that need grad).
        inputs = [x.detach().requires_grad_(x.requires_grad) for x in [*state.values(), *(leaves[i] for i in where)]]
        try:
            with _untouched_rng(inputs), _untouched_buffers(net), _no_node_metadata(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the engine's once-per-op notices repeat at every replay otherwise
                gm = make_fx(joint, tracing_mode="real", _disable_torch_fn_metadata_mode=True)(*inputs)
        except Exception as e:  # noqa: BLE001 - any failure to trace: the eager engine is exact anyway
            self._notice(net, e)
            return _FALLBACK
        gm.graph.eliminate_dead_code()  # the engine detaches every argument; most are never read
        gm.recompile()
        self.traces += 1
        return gm, out_spec[0], None

    def _notice(self, net, e: Exception | str) -> None:
        if not self.warned:
            self.warned = True
            why = e if isinstance(e, str) else \
                f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
            warnings.warn(f"jvp(mode='traced'): cannot trace {type(net).__name__} ({why}); "
                          f"using mode='tangent' (the eager engine) for it", stacklevel=4)


@contextlib.contextmanager
def _no_node_metadata():
    """make_fx gives every node a fake tensor of its output (`meta["val"]`), more than half of the
    tracing time; nothing here reads it (a replay runs the aten ops, torch.compile retraces the
    graph's code), so the trace skips it."""
    set_meta = getattr(proxy_tensor, "set_meta", None)
    if set_meta is None:  # another torch: trace as it does
        yield
        return
    proxy_tensor.set_meta = lambda proxy, val: proxy
    try:
        yield
    finally:
        proxy_tensor.set_meta = set_meta


def _untouched_rng(tensors: list):
    """The trace runs on real tensors, so its dropout draws would advance the RNG: restored after,
    the trace call draws exactly what an untraced call draws, so a resumed run (which traces at
    another step) repeats the uninterrupted run's masks bit for bit."""
    cuda = sorted({x.device.index or 0 for x in tensors if x.device.type == "cuda"})
    return torch.random.fork_rng(devices=cuda, device_type="cuda") if cuda else torch.random.fork_rng(devices=[])


@contextlib.contextmanager
def _untouched_buffers(net):
    """The trace runs on the real buffers: BatchNorm's running statistics (and its batch count) are
    restored after it, so the traced call updates them once, by its replay, as a plain forward."""
    saved = [(b, b.clone()) for b in net.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)


def _state(net) -> dict:
    state = dict(net.named_parameters())
    state.update(net.named_buffers())
    return state


def _leaf_key(x):
    if isinstance(x, torch.Tensor):
        return (x.dtype, x.device, tuple(x.shape), x.stride(), x.requires_grad)
    try:
        hash(x)
        return (type(x), x)
    except TypeError:
        return (type(x), id(x))


def _signature(net, state: dict, leaves: list, spec) -> tuple:
    """What the joint graph depends on besides tensor values (module docstring)."""
    autocast = tuple((d, torch.get_autocast_dtype(d)) for d in ("cpu", "cuda") if torch.is_autocast_enabled(d))
    return (spec, tuple(_leaf_key(x) for x in leaves), tuple(m.training for m in net.modules()),
            tuple((p.dtype, p.device, p.requires_grad) for p in state.values()), torch.is_grad_enabled(), autocast)


_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, TracedJVP]" = weakref.WeakKeyDictionary()


def _unwrap(net):
    return getattr(net, "_orig_mod", net)  # a torch.compile'd module: its original


def traced_jvp(net, args: tuple, tangents: tuple, kwargs: dict, compile: bool = False):
    """`(out, out_dot)` from the joint graph of `net` for this signature (traced on first use), or
    None when `net` cannot be traced, or is a plain function rather than an `nn.Module` (the
    caller falls back to the eager engine). Under DDP the graph runs inside DDP's forward, in
    place of the wrapped module's forward, so that DDP prepares its gradient all-reduce as usual."""
    if hasattr(net, "_orig_mod") and not compile:
        # a torch.compile'd network (train.compile): its joint graph is compiled the same way
        # (`dynamo_ctx` holds the backend and options it was compiled with)
        compile = getattr(net, "dynamo_ctx", True)
    net = _unwrap(net)
    if not isinstance(net, torch.nn.Module):
        return None  # a plain function: its closed-over tensors would become constants of the graph
    ddp = net if isinstance(net, torch.nn.parallel.DistributedDataParallel) else None
    inner = _unwrap(ddp.module) if ddp is not None else net
    runner = _CACHE.get(inner)
    if runner is None:
        runner = _CACHE[inner] = TracedJVP(inner)
    run = runner.prepare(args, tangents, kwargs, compile)
    if run is None or ddp is None:
        return None if run is None else run()
    inner.forward = lambda *a, **k: run()  # an instance attribute: nn.Module.__call__ takes it
    try:
        out, tout = ddp(*args, **kwargs)
    finally:
        del inner.forward
    return out, tout.detach()  # DDP's output hook would give the tangent a (useless) graph


def runner_of(net) -> TracedJVP | None:
    """The `TracedJVP` holding `net`'s graphs (None before its first traced call)."""
    return _CACHE.get(_unwrap(net))
