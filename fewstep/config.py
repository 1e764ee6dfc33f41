"""Run configuration: plain dataclasses that validate themselves, importing nothing of fewstep.

A config is built from a preset, an optional JSON/TOML file and `key=value` overrides, in
that order. An unknown key or a bad value raises `ConfigError` naming the dotted key. The
`method` and `network` sections name registered classes: their fields are checked against the
registries by `fewstep.training.registries.validate_against_registries` (which `build` and
`fewstep train` call before training).
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The sCM paper's 2-step schedule, as `fewstep.core.samplers.TWO_STEP_TIMES` (not imported: the config is
# plain data; a test checks that the two agree).
TWO_STEP_TIMES = (math.pi / 2, 1.1)
DEFAULT_METHOD = "sct"


class ConfigError(ValueError):
    """A bad configuration: the message names the key."""


@dataclass
class DataConfig:
    name: str = "digits"  # a registered dataset, or a path (image folder, .npy/.npz, IDX folder)
    resolution: int | None = None  # resize images to this size
    channels: int | None = None  # convert images to 1 or 3 channels
    xflip: bool = False  # EDM's --xflip: every image also appears mirrored (the dataset doubles)
    workers: int | None = None  # DataLoader worker processes (None: 0 for in-memory data, else up to 4)
    options: dict = field(default_factory=dict)  # more load_dataset options: split, key, value_range, ...
    vae: str | None = None  # train in the latent space of this diffusers AutoencoderKL (folder or Hub id)
    # EDM2's latent normalization, per channel in the VAE's raw latent units: (z - mean) / std * 0.5
    # instead of the VAE's scaling factor (data.vae or a latents file only).
    latent_mean: list[float] | None = None
    latent_std: list[float] | None = None
    # a prompt dataset's text encoder: a pipeline folder or Hub id (default: a text-to-image teacher's own)
    text_encoder: str | None = None

    def validate(self):
        if self.workers is not None and self.workers < 0:
            raise ConfigError(f"data.workers must be >= 0 or null, got {self.workers}")
        if self.resolution is not None and self.resolution < 1:
            raise ConfigError(f"data.resolution must be a positive integer, got {self.resolution}")
        if self.channels not in (None, 1, 3):
            raise ConfigError(f"data.channels must be 1 or 3, got {self.channels}")
        if (self.latent_mean is None) != (self.latent_std is None):
            raise ConfigError("data.latent_mean and data.latent_std go together (one value per latent channel)")
        if self.latent_std is not None and not all(v > 0 for v in self.latent_std):
            raise ConfigError(f"data.latent_std must be > 0 per channel, got {self.latent_std}")
        if self.vae is not None and self.xflip:
            raise ConfigError("data.xflip mirrors pixels, not latents: encode a mirrored dataset instead of "
                              "combining it with data.vae")


@dataclass
class OptimConfig:
    name: str = "adam"  # 'adam' or 'radam'
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear learning-rate warmup
    schedule: str = "constant"  # after warmup: 'constant', 'cosine' or 'linear' (to 0 at train.steps), 'inv_sqrt'
    decay_start: int = 0  # 'inv_sqrt' (EDM2): lr / sqrt(step / decay_start) once step > decay_start
    grad_clip: float = 1.0  # max global grad norm; 0 disables

    def validate(self):
        _choice("optim.name", self.name, ("adam", "radam"))
        _choice("optim.schedule", self.schedule, ("constant", "cosine", "linear", "inv_sqrt"))
        if self.schedule == "inv_sqrt" and self.decay_start < 1:
            raise ConfigError("optim.schedule 'inv_sqrt' needs optim.decay_start >= 1")
        if not self.lr > 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        for key in ("eps", "weight_decay", "warmup_steps", "decay_start", "grad_clip"):
            if getattr(self, key) < 0:
                raise ConfigError(f"optim.{key} must be >= 0, got {getattr(self, key)}")


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 128
    seed: int = 0
    device: str = "auto"  # 'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...
    precision: str = "fp32"  # 'fp32', 'bf16' (autocast) or 'fp16' (autocast + loss scaling)
    ema_decay: float = 0.999
    ema_sigma_rel: float | None = None  # EDM2 power-function EMA of this relative width (e.g. 0.05), instead
    log_every: int = 50
    sample_every: int = 500  # 0 = only at the end
    ckpt_every: int = 500  # 0 = only at the end
    keep_ckpts: int = 2
    resume: bool = True  # continue from the latest checkpoint in the output folder
    max_nonfinite: int = 10  # stop after this many non-finite losses/gradients in a row
    sample_times: list[float] = field(default_factory=lambda: list(TWO_STEP_TIMES))
    num_samples: int = 64
    tensorboard: bool = False  # also log to <out>/tensorboard (pip install 'fewstep[tensorboard]')
    wandb: bool = False  # also log to Weights & Biases (pip install 'fewstep[wandb]'; WANDB_MODE=offline works)
    wandb_project: str | None = None  # its project (default 'fewstep')
    progress: bool = True
    teacher: str | None = None  # sCD/CD: the diffusion teacher: a fewstep run (flow or edm), a diffusers folder or Hub id
    teacher_scheduler: str | None = None  # a diffusers model folder's scheduler config (default: found beside it)
    parallel: str = "auto"  # under torchrun: 'ddp', 'fsdp' (sharded), or 'auto' (ddp with several processes)
    grad_accum: int = 1  # micro-batches per optimizer step (batch_size each)
    compile: bool = False  # torch.compile the network (falls back to eager with a message)
    sharded_checkpoints: bool = False  # fsdp: each process writes its own shards (models beyond one process)
    init_from_teacher: bool = True  # sCD: start from the teacher's weights (docs/math.md#stabilizers; networks/convert.py)
    init_from: str | None = None  # fine-tune: start from this run's network and (EMA) weights
    # The conversion stage: first regress the student's TrigFlow velocity onto the teacher's this many steps
    # (a student reading a diffusers teacher in another parameterization, network.prediction; docs/results.md)
    convert_steps: int = 0
    convert_lr: float | None = None  # its learning rate (default optim.lr)
    pretrain_steps: int = 0  # first train flow matching this long into <out>/pretrain: the teacher or the start
    pretrain_lr: float | None = None  # its learning rate (default optim.lr)

    def validate(self):
        _choice("train.parallel", self.parallel, ("auto", "none", "ddp", "fsdp"))
        for key in ("steps", "batch_size", "log_every", "keep_ckpts", "max_nonfinite", "num_samples", "grad_accum"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("sample_every", "ckpt_every"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key} must be >= 0, got {getattr(self, key)}")
        _choice("train.precision", self.precision, ("fp32", "bf16", "fp16"))
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.ema_sigma_rel is not None and not 0 < self.ema_sigma_rel < 0.28:
            raise ConfigError(f"train.ema_sigma_rel must be in (0, 0.28) or null, got {self.ema_sigma_rel}")
        validate_times("train.sample_times", self.sample_times)
        if self.teacher is not None and not self.teacher:
            raise ConfigError("train.teacher must be a checkpoint path or null")
        if self.init_from is not None and not self.init_from:
            raise ConfigError("train.init_from must be a checkpoint path or null")
        if self.pretrain_steps < 0:
            raise ConfigError(f"train.pretrain_steps must be >= 0, got {self.pretrain_steps}")
        if self.pretrain_steps and (self.teacher or self.init_from):
            raise ConfigError("train.pretrain_steps trains the teacher / starting point itself: do not also give "
                              "train.teacher or train.init_from")
        if self.convert_steps < 0:
            raise ConfigError(f"train.convert_steps must be >= 0, got {self.convert_steps}")
        if self.convert_steps and not (self.teacher and self.init_from_teacher):
            raise ConfigError("train.convert_steps regresses a student onto its teacher: give train.teacher "
                              "(with train.init_from_teacher)")
        if self.convert_lr is not None and not self.convert_lr > 0:
            raise ConfigError(f"train.convert_lr must be > 0, got {self.convert_lr}")
        if self.pretrain_lr is not None and not self.pretrain_lr > 0:
            raise ConfigError(f"train.pretrain_lr must be > 0, got {self.pretrain_lr}")
        if self.init_from and self.teacher and self.init_from_teacher:
            raise ConfigError("train.init_from and train.teacher both initialize the network: set "
                              "train.init_from_teacher=false to start from train.init_from")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    network: dict = field(default_factory=lambda: {"arch": "auto"})  # arch + the architecture's own arguments
    method: dict = field(default_factory=lambda: {"name": DEFAULT_METHOD})  # name + the method's own fields
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> "Config":
        """Check what plain data can tell; the method's and network's own fields are checked against
        their registries by `fewstep.training.registries.validate_against_registries`."""
        for section in (self.data, self.optim, self.train):
            section.validate()
        for key in ("network", "method"):
            if not isinstance(getattr(self, key), dict):
                raise ConfigError(f"{key} must be a table/object, got {getattr(self, key)!r}")
        if not isinstance(self.method.get("name"), str):
            raise ConfigError(f"method.name must be a method's name, got {self.method.get('name')!r}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def validate_times(key: str, times) -> None:
    """Sampling times: a non-empty, strictly decreasing list in (0, pi/2]."""
    if not times:
        raise ConfigError(f"{key} must be a non-empty list of times in (0, pi/2]")
    for a in times:
        if not 0 < a <= math.pi / 2 + 1e-6:
            raise ConfigError(f"{key}: every time must be in (0, pi/2], got {a}")
    if any(b >= a for a, b in zip(times, times[1:])):
        raise ConfigError(f"{key} must be strictly decreasing, got {list(times)}")


# ----------------------------------------------------------------------------- parsing

def _choice(key, value, choices):
    if value not in choices:
        raise ConfigError(f"{key} must be one of {list(choices)}, got {value!r}")


def coerce(key: str, value: Any, hint) -> Any:
    """Check `value` against a type hint, converting where it is lossless (int -> float)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [coerce(f"{key}[{i}]", v, args[0] if args else Any) for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return int(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    if hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a table/object, got {value!r}")
        return dict(value)
    return value


def _section_from_dict(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix} must be a table/object, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"unknown key {prefix}.{key}; known: {sorted(names)}")
        kwargs[key] = coerce(f"{prefix}.{key}", value, hints[key])
    return cls(**kwargs)


def config_from_dict(data: dict) -> Config:
    """Build and validate a Config from a nested dict (unknown keys are errors)."""
    if not isinstance(data, dict):
        raise ConfigError("a config must be a table/object of sections")
    sections = {f.name: f for f in dataclasses.fields(Config)}
    kwargs = {}
    for key, value in data.items():
        if key not in sections:
            raise ConfigError(f"unknown config section {key!r}; known: {sorted(sections)}")
        if key in ("method", "network"):
            if not isinstance(value, dict):
                raise ConfigError(f"{key} must be a table/object, got {value!r}")
            kwargs[key] = dict(value)
        else:
            kwargs[key] = _section_from_dict(typing.get_type_hints(Config)[key], value, key)
    if "method" in kwargs:
        kwargs["method"] = {"name": DEFAULT_METHOD, **kwargs["method"]}
    return Config(**kwargs).validate()


def load_config_file(path: str | Path) -> dict:
    """Read a JSON or TOML config file into a nested dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            return tomllib.loads(text)
        return json.loads(text)
    except Exception as e:  # noqa: BLE001 - any parse error becomes one clear line
        raise ConfigError(f"cannot parse config file {path}: {e}") from None


def parse_override(item: str) -> tuple[list[str], Any]:
    """`section.key=value` -> (['section', 'key'], value); the value is read as JSON if it
    parses (numbers, true/false, null, lists), else kept as a string."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override key {key!r} must look like section.key (e.g. train.steps)")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return parts, value


def merge(base: dict, update: dict) -> dict:
    """Recursive dict merge; `update` wins."""
    out = dict(base)
    for key, value in update.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        (section, key), value = parse_override(item)
        data = merge(data, {section: {key: value}})
    return data
