"""The checks of a config that need the registries: `validate_against_registries(cfg)`.

`fewstep.config` is plain data and imports nothing of fewstep, so what only the method and network
registries know (the method's name and fields, the architecture's constructor arguments, whether a
method takes a teacher) is checked here, by `build` and by `fewstep train` before anything trains.
"""

from __future__ import annotations

import dataclasses
import typing

from fewstep.config import Config, ConfigError, coerce


def validate_against_registries(cfg: Config) -> Config:
    """`cfg` with its `network` section completed and checked against the registered network, after
    checking its `method` section against the registered method; a new Config, `cfg` is not changed."""
    network = validate_network(cfg.network)
    method = build_method(cfg.method)  # the method's dataclass validates its own fields
    name = cfg.method.get("name")
    if method.takes_teacher and not (cfg.train.teacher or cfg.train.pretrain_steps):
        hint = " (or method.from_teacher=false to train from scratch)" if name == "ect" else ""
        raise ConfigError(f"method {name!r} starts from a diffusion teacher: give its checkpoint with "
                          f"--teacher CKPT (train.teacher){hint}")
    if cfg.train.teacher and not method.takes_teacher:
        from fewstep.methods import METHODS

        distillers = sorted(k for k, cls in METHODS.items() if cls.takes_teacher)
        raise ConfigError(f"train.teacher is used by the distillation methods ({', '.join(distillers)}) "
                          f"only, not {name!r}")
    return dataclasses.replace(cfg, network=network)


def validate_network(cfg: dict) -> dict:
    """The `network` section: `arch` ('auto': 'unet' for images, 'mlp' for vectors, or any registered
    network), `class_conditional` (use the dataset's labels), and the architecture's own constructor
    arguments (checked against its signature; data-shaped ones are filled in by `build`). Returns a
    new dict with the defaults filled in."""
    from fewstep.networks import (BUILD_KEYS, DATA_ARGUMENTS, NETWORKS, check_network_values, constructor_arguments,
                                  constructor_hints)

    if not isinstance(cfg, dict):
        raise ConfigError(f"network must be a table/object, got {cfg!r}")
    cfg = {"arch": "auto", "class_conditional": False, **cfg}
    arch = cfg["arch"]
    if arch != "auto" and arch not in NETWORKS:
        raise ConfigError(f"network.arch must be 'auto' or a registered network ({', '.join(sorted(NETWORKS))}), "
                          f"got {arch!r}; register your own with @fewstep.networks.register_network")
    cfg["class_conditional"] = coerce("network.class_conditional", cfg["class_conditional"], bool)
    _check_lora(cfg)
    if "checkpoint_activations" in cfg:
        cfg["checkpoint_activations"] = coerce("network.checkpoint_activations", cfg["checkpoint_activations"], bool)
    candidates = ["unet", "mlp"] if arch == "auto" else [arch]
    params, hints = {}, {}
    for name in candidates:
        params.update(constructor_arguments(NETWORKS[name]))
        hints.update(constructor_hints(NETWORKS[name]))
    for key, value in cfg.items():
        if key in BUILD_KEYS:
            continue
        if key not in params or key in DATA_ARGUMENTS:
            known = sorted(k for k in params if k not in DATA_ARGUMENTS)
            raise ConfigError(f"unknown key network.{key} for network {arch!r}; known: {known + list(BUILD_KEYS)}")
        if key in hints:
            cfg[key] = coerce(f"network.{key}", value, hints[key])
    try:  # fewstep's own networks check their values now, before any weight is allocated
        check_network_values(arch, {k: v for k, v in cfg.items() if k not in BUILD_KEYS})
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return cfg


def _check_lora(cfg: dict) -> None:
    """`network.lora_rank` / `lora_alpha` / `lora_targets`: a LoRA student's settings (`fewstep.networks.lora`)."""
    rank = cfg.get("lora_rank")
    if rank is None:
        extra = [k for k in ("lora_alpha", "lora_targets") if cfg.get(k) is not None]
        if extra:
            raise ConfigError(f"network.{extra[0]} is a LoRA setting: give network.lora_rank too")
        return
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"network.lora_rank must be an integer >= 1, got {rank!r}")
    alpha = cfg.get("lora_alpha")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0):
        raise ConfigError(f"network.lora_alpha must be a number > 0, got {alpha!r}")
    targets = cfg.get("lora_targets")
    if targets is not None and (not isinstance(targets, list) or not targets
                                or not all(isinstance(t, str) and t for t in targets)):
        raise ConfigError(f"network.lora_targets must be a non-empty list of module names, got {targets!r}")


def build_method(method_cfg: dict):
    """Instantiate the training objective named by `method_cfg['name']` with its fields."""
    from fewstep.methods import METHODS

    cfg = dict(method_cfg)
    name = cfg.pop("name", None)
    if name not in METHODS:
        raise ConfigError(f"method.name must be one of {sorted(METHODS)}, got {name!r}")
    cls = METHODS[name]
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key, value in cfg.items():
        if key not in known:
            raise ConfigError(f"unknown key method.{key} for method {name!r}; known: {sorted(known)}")
        cfg[key] = coerce(f"method.{key}", value, typing.get_type_hints(cls)[key])
    try:
        return cls(**cfg)
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None
