"""The method protocol: what a training objective is, and the optional parts the training loop
(`fewstep.training.fit.fit`) may ask of it. No caller switches on method types: each method declares
its parts here, and hands out the sampler its networks sample with (`sampler(net)`).

A method is a callable `loss, stats = method(net, x0, labels=None, step=0)` with `loss` per
sample (B,) and `stats` a dict of detached scalars. Subclass `Method` (or follow it by duck
typing) for the rest:

| part | default | who overrides it |
| --- | --- | --- |
| `name` | "" | every registered method: its config name |
| `sigma_d` | 0.5 | the data std its network assumes |
| `takes_teacher`, `set_teacher(net, formulation)` | no teacher | sCD, CD (functions of the teacher), PD (its network) |
| `parameterization` | "trigflow" | how the network is read: "edm" for EDM, CD, CT, iCT (docs/math.md#edm-parameterization) |
| `setup(net, total_steps)` | nothing | methods with curricula laid out over the run |
| `after_step(net, step) -> bool` | False | EMA targets (CD, CT); True restarts the sampling EMA (PD) |
| `state_tensors()` / `load_state_tensors(net, tensors)` | none | EMA targets, PD's current teacher |
| `sampler(net, step=None)` | TrigFlow PF-ODE, Heun | every few-step method; EDM, PD (`fewstep.core.samplers`) |
| `extra_networks(net)` | none | the networks behind those tensors (sharded like `net` under fsdp) |
| `auxiliaries(net)` | none | networks trained beside `net` with optimizers of their own (DMD2's fake score) |

Register a method with `@register_method("name")` so that configs and checkpoints can name it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, ClassVar

import torch

from fewstep.networks.contract import network_info
from fewstep.core.trigflow import SIGMA_D

METHODS: dict[str, type] = {}


@dataclasses.dataclass
class Auxiliary:
    """A network a method trains beside the main one (DMD2's fake score), with its own optimizer
    (the run's kind, at `lr` on the run's schedule), its own loss and its own pace. `fit` trains it
    through `fewstep.training.auxiliary` without knowing the method; checkpoints keep its weights,
    optimizer, EMA and update count.

    `loss(model, net, x0, labels, step) -> (per-sample loss, stats)`: `model` is the auxiliary
    network as it trains (wrapped under ddp), `net` the main network (read it without gradients).
    `updates_per_step`: the update rule of the two time scales, e.g. 5 (DMD2: five fake-score
    updates per generator update) or 0.5 (one every other step); by the end of step s the
    network has had `floor(updates_per_step * (s + 1))` updates.
    """

    net: torch.nn.Module
    loss: Callable
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    updates_per_step: float = 1.0
    ema_decay: float | None = None  # an EMA of the auxiliary's weights (None: none)
    grad_clip: float | None = 1.0

    def __post_init__(self):
        if not self.updates_per_step > 0:
            raise ValueError(f"updates_per_step must be > 0, got {self.updates_per_step}")
        if not self.lr > 0:
            raise ValueError(f"an auxiliary network's lr must be > 0, got {self.lr}")
        if self.ema_decay is not None and not 0 <= self.ema_decay < 1:
            raise ValueError(f"an auxiliary network's ema_decay must be in [0, 1), got {self.ema_decay}")

    def updates_by(self, step: int) -> int:
        """The updates this network has had once step `step` (0-based) is done."""
        return math.floor(self.updates_per_step * (step + 1) + 1e-9)


def register_method(name: str):
    """Class decorator: the method's config name (`method.name`), for configs and checkpoints."""

    def decorate(cls):
        known = METHODS.get(name)
        if known is not None and known.__qualname__ != cls.__qualname__:
            raise ValueError(f"method name {name!r} is already registered for {known.__qualname__}")
        cls.name = name
        METHODS[name] = cls
        return cls

    return decorate


class Method:
    """Base class of the training objectives; every part but `__call__` is optional."""

    name: ClassVar[str] = ""
    takes_teacher: ClassVar[bool] = False
    parameterization: ClassVar[str] = "trigflow"  # how the network is read: "trigflow" (docs/math.md#trigflow) or "edm" (docs/math.md#edm-parameterization)
    sigma_d: float = SIGMA_D

    def __call__(self, net, x0: torch.Tensor, labels: torch.Tensor | None = None, step: int = 0):
        raise NotImplementedError

    # -- training ---------------------------------------------------------------------------

    def set_teacher(self, net: torch.nn.Module, formulation: str = "trigflow") -> None:
        """Take a frozen diffusion teacher network (`formulation` 'trigflow' or 'edm')."""
        raise ValueError(f"method {self.name or type(self).__name__!r} takes no teacher")

    def setup(self, net: torch.nn.Module, total_steps: int) -> None:
        """Called once before training, with the run's length in optimizer steps."""

    def after_step(self, net: torch.nn.Module, step: int) -> bool:
        """Called after each optimizer step; True asks the loop to restart its sampling EMA."""
        return False

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors a checkpoint must keep besides the network (e.g. an EMA target)."""
        return {}

    def load_state_tensors(self, net: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        if tensors:
            raise ValueError(f"method {self.name!r} keeps no state, but the checkpoint has {sorted(tensors)[:3]}")

    def extra_networks(self, net: torch.nn.Module) -> dict[str, torch.nn.Module]:
        """The networks the method keeps beside `net` without an optimizer (an EMA target, PD's teacher;
        created now if they are made from it); a sharding strategy shards them like `net`. Their
        weights are in `state_tensors`. Networks trained by gradient: `auxiliaries`."""
        return {}

    def auxiliaries(self, net: torch.nn.Module) -> dict[str, Auxiliary]:
        """Networks trained beside `net`, each with its optimizer, loss and schedule (`Auxiliary`);
        called once, before training. The loop trains them; the method reads them in its loss."""
        return {}

    # -- sampling ---------------------------------------------------------------------------

    def sampler(self, net: torch.nn.Module, step: int | None = None):
        """How `net` samples (`fewstep.core.samplers`): a diffusion model by default, the TrigFlow
        PF-ODE with Heun. `step`: the optimizer steps it was trained for, for methods whose sampler
        changes over a run (PD; None: the run's end)."""
        from fewstep.core.ode import ODESampler

        return ODESampler(net, self.sigma_d, num_classes=network_info(net).num_classes)


class CallableMethod(Method):
    """A plain callable `loss, stats = fn(net, x0, labels, step)` as a method: every optional part
    takes the protocol's default."""

    def __init__(self, fn: Callable, sigma_d: float = SIGMA_D):
        self.fn, self.sigma_d = fn, sigma_d

    def __call__(self, net, x0, labels=None, step=0):
        return self.fn(net, x0, labels, step)


def as_method(obj) -> Method:
    """`obj` itself when it follows the protocol (a `Method`), else a `CallableMethod` around it."""
    if isinstance(obj, Method):
        return obj
    if not callable(obj):
        raise TypeError(f"a method is a callable loss(net, x0, labels, step); got {type(obj).__name__}")
    return CallableMethod(obj, getattr(obj, "sigma_d", SIGMA_D))


def method_config(method) -> dict:
    """`{"name", **fields}`: what a checkpoint stores to rebuild `method` (no teacher, no state)."""
    name = getattr(method, "name", "")
    if not name or METHODS.get(name) is not type(method):
        raise ValueError(f"{type(method).__qualname__} is not a registered method; decorate it with "
                         f"@fewstep.methods.register_method('some-name') so that checkpoints can name it")
    fields = {}
    if dataclasses.is_dataclass(method):
        for f in dataclasses.fields(method):
            if f.init and f.name != "teacher":
                fields[f.name] = getattr(method, f.name)
    return {"name": name, **fields}
