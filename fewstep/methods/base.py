"""The method protocol: what a training objective is, and the optional parts the training loop
(`fewstep.training.fit.fit`) and sampling (`fewstep.apps.generate`) may ask of it. No caller switches on
method types: each method declares its parts here.

A method is a callable `loss, stats = method(net, x0, labels=None, step=0)` with `loss` per
sample (B,) and `stats` a dict of detached scalars. Subclass `Method` (or follow it by duck
typing) for the rest:

| part | default | who overrides it |
| --- | --- | --- |
| `name` | "" | every registered method: its config name |
| `sigma_d` | 0.5 | the data std its network assumes |
| `sampling` | "ode" | "consistency" for one/few-step models |
| `takes_teacher`, `set_teacher(net, formulation)` | no teacher | sCD, CD (functions of the teacher), PD (its network) |
| `parameterization` | "trigflow" | how the network is read: "edm" for EDM, CD, CT, iCT (SPEC 1.2) |
| `setup(net, total_steps)` | nothing | methods with curricula laid out over the run |
| `after_step(net, step) -> bool` | False | EMA targets (CD, CT); True restarts the sampling EMA (PD) |
| `state_tensors()` / `load_state_tensors(net, tensors)` | none | EMA targets, PD's current teacher |
| `extra_networks(net)` | none | the networks behind those tensors (sharded like `net` under fsdp) |
| `consistency_fn(net, labels, guidance)` | TrigFlow `f` | discrete-time (VE) models (for editing) |
| `sample(net, noise, times, generator, labels, guidance)` | multistep consistency sampling | VE models: CM Algorithm 1 |
| `ode(net, labels, guidance)`, `ode_times(steps)`, `default_ode_sampler`, `default_sample_steps()` | TrigFlow velocity, Heun | EDM, PD |

Register a method with `@register_method("name")` so that configs and checkpoints can name it.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, ClassVar

import torch

METHODS: dict[str, type] = {}


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
    sampling: ClassVar[str] = "ode"  # "consistency": multistep consistency sampling; "ode": PF-ODE solvers
    takes_teacher: ClassVar[bool] = False
    parameterization: ClassVar[str] = "trigflow"  # how the network is read: "trigflow" (SPEC 1.1) or "edm" (1.2)
    default_ode_sampler: ClassVar[str] = "heun"
    sigma_d: float = 0.5

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
        """The networks the method trains beside `net` (created now if they are made from it); a
        sharding strategy shards them like `net`. Their weights are in `state_tensors`."""
        return {}

    # -- sampling ---------------------------------------------------------------------------

    def consistency_fn(self, net, labels: torch.Tensor | None = None, guidance=None) -> Callable:
        """Consistency models: the TrigFlow consistency function `fn(x_t, t) -> x0` of `net`."""
        from fewstep.core.samplers import trigflow_sampler_fn

        w = guidance if getattr(net, "guidance_input", False) else None
        return trigflow_sampler_fn(net, self.sigma_d, labels, w)

    def sample(self, net, noise: torch.Tensor, times, generator: torch.Generator | None = None,
               labels: torch.Tensor | None = None, guidance=None) -> torch.Tensor:
        """Consistency models: multistep consistency sampling from unit Gaussian `noise` at the
        decreasing TrigFlow `times` (NFE = len(times))."""
        from fewstep.core.samplers import multistep_sample

        return multistep_sample(self.consistency_fn(net, labels, guidance), noise, times, self.sigma_d, generator)

    def ode(self, net, labels: torch.Tensor | None = None, guidance: float = 1.0):
        """Diffusion models: the probability-flow ODE of `net` (classifier-free guided)."""
        from fewstep.core.ode import TrigFlowODE, guided, trigflow_net_velocity

        null = getattr(net, "num_classes", 0) or None
        return TrigFlowODE(guided(trigflow_net_velocity(net, self.sigma_d), labels, guidance, null), self.sigma_d)

    def ode_times(self, steps: int) -> torch.Tensor | None:
        """The time grid of an ODE sampler with `steps` steps (None: the solver's own default)."""
        return None

    def default_sample_steps(self, step: int | None = None) -> int | None:
        """Steps a checkpoint saved after `step` optimizer steps samples with by default (None: the
        sampler's default)."""
        return None


class CallableMethod(Method):
    """A plain callable `loss, stats = fn(net, x0, labels, step)` as a method: every optional part
    takes the protocol's default."""

    def __init__(self, fn: Callable, sigma_d: float = 0.5):
        self.fn, self.sigma_d = fn, sigma_d

    def __call__(self, net, x0, labels=None, step=0):
        return self.fn(net, x0, labels, step)


def as_method(obj) -> Method:
    """`obj` itself when it follows the protocol (a `Method`), else a `CallableMethod` around it."""
    if isinstance(obj, Method):
        return obj
    if not callable(obj):
        raise TypeError(f"a method is a callable loss(net, x0, labels, step); got {type(obj).__name__}")
    return CallableMethod(obj, getattr(obj, "sigma_d", 0.5))


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
