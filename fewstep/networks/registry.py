"""Networks by name: a registry that lets a checkpoint rebuild any network, fewstep's or a user's,
without pickling code and without importing anything by itself.

    @register_network("my-dit")
    class MyDiT(torch.nn.Module):
        def __init__(self, img_channels=4, img_resolution=32, depth=12): ...

    net = MyDiT(depth=6)
    network_spec(net)            # {"name": "my-dit", "kwargs": {"img_channels": 4, "img_resolution": 32, "depth": 6}}
    build_registered(network_spec(net))   # a fresh MyDiT(img_channels=4, img_resolution=32, depth=6)

The decorator records the constructor's arguments (bound to their names, defaults filled in) on
each instance. Checkpoints store that `{name, kwargs}`; `fewstep.apps.generate.load_model` rebuilds the
class from this registry. A name that is not registered is a one-line error telling how to
register it (`--import MODULE` on the command line): no import path is ever taken from a file.
"""

from __future__ import annotations

import functools
import inspect
import json

import torch

NETWORKS: dict[str, type[torch.nn.Module]] = {}
_SPEC_ATTR = "_fewstep_network_spec"


class UnknownNetworkError(ValueError):
    """A network name that no imported module registered."""


def register_network(name: str):
    """Class decorator: register an `nn.Module` under `name` and record, on each instance, the
    keyword arguments it was built with (they must be JSON values: numbers, strings, bools, None,
    lists and dicts of them)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_network needs a non-empty name, got {name!r}")

    def decorate(cls):
        if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
            raise TypeError(f"register_network({name!r}) decorates nn.Module classes, got {cls!r}")
        known = NETWORKS.get(name)
        if known is not None and known.__qualname__ != cls.__qualname__:
            raise ValueError(f"network name {name!r} is already registered for {known.__module__}.{known.__qualname__}")
        init = cls.__init__
        signature = inspect.signature(init)

        @functools.wraps(init)
        def __init__(self, *args, **kwargs):
            init(self, *args, **kwargs)
            if type(self) is cls:  # a subclass records its own arguments (or none, if unregistered)
                bound = signature.bind(self, *args, **kwargs)
                bound.apply_defaults()
                recorded = {}
                for key, value in list(bound.arguments.items())[1:]:  # [0] is self
                    kind = signature.parameters[key].kind
                    if kind is inspect.Parameter.VAR_KEYWORD:
                        recorded.update(value)
                    elif kind is inspect.Parameter.VAR_POSITIONAL:
                        if value:
                            raise TypeError(f"network {name!r}: *{key} arguments cannot be recorded; "
                                            f"take keyword arguments")
                    else:
                        recorded[key] = value
                object.__setattr__(self, _SPEC_ATTR, {"name": name, "kwargs": recorded})

        cls.__init__ = __init__
        cls.network_name = name
        NETWORKS[name] = cls
        return cls

    return decorate


def _jsonable(value):
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def network_spec(net: torch.nn.Module) -> dict:
    """`{"name", "kwargs"}` of a registered network, as JSON values (tuples become lists)."""
    net = unwrap(net)
    spec = getattr(net, _SPEC_ATTR, None)
    if spec is None:
        raise UnknownNetworkError(
            f"{type(net).__qualname__} is not a registered network, so a checkpoint could not rebuild it; "
            f"decorate the class with @fewstep.networks.register_network('some-name')")
    out = {"name": spec["name"], "kwargs": _jsonable(spec["kwargs"])}
    try:
        json.dumps(out)
    except (TypeError, ValueError) as e:
        raise UnknownNetworkError(f"network {spec['name']!r}: its constructor arguments must be JSON values "
                                  f"(numbers, strings, lists, dicts) to be stored in a checkpoint: {e}") from None
    return out


def unwrap(net: torch.nn.Module) -> torch.nn.Module:
    """The user's module inside DDP / torch.compile wrappers."""
    while True:
        inner = getattr(net, "module", None) or getattr(net, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return net
        net = inner


def network_class(name: str) -> type[torch.nn.Module]:
    if name not in NETWORKS:
        raise UnknownNetworkError(
            f"network {name!r} is not registered; import the module that defines it first "
            f"(on the command line: --import MODULE or --import path/to/file.py), where its class is decorated "
            f"@fewstep.networks.register_network({name!r}). Registered: {', '.join(sorted(NETWORKS)) or 'none'}")
    return NETWORKS[name]


def build_registered(spec: dict) -> torch.nn.Module:
    """A fresh network from `{"name", "kwargs"}` (see `network_spec`)."""
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise UnknownNetworkError(f"a network spec is {{'name': str, 'kwargs': dict}}, got {spec!r}")
    cls = network_class(spec["name"])
    kwargs = spec.get("kwargs") or {}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise UnknownNetworkError(f"network {spec['name']!r} cannot be built from {kwargs}: {e}") from None
