"""Networks `F(x_t / sigma_d, t, labels=None, **cond)`: fewstep's UNet, DiT and MLP, the papers'
networks (`ddpmpp`, `ncsnpp`, `adm`, `edm2`: `song_unet`, `adm`, `edm2`, around `paper`), a registry
for any other network (`register_network`), and `build_network` from a run's `network` config.

The network contract, which every method, sampler and command relies on:

    F(x, t, labels=None, **cond) -> tensor shaped like x

- `x` is the noisy sample divided by sigma_d (`x_t / sigma_d`), `t` the TrigFlow time in
  [0, pi/2], one per sample (shape (B,)); `F` predicts the scaled velocity: the model's
  velocity is `sigma_d * F(x_t / sigma_d, t)` (`fewstep.core.trigflow.net_velocity`), its
  consistency function `cos(t) x_t - sin(t) sigma_d F` (docs/math.md#consistency-function). EDM-family methods (edm, cd,
  ct, ict) feed the same signature `c_noise` and `c_in x` instead (docs/math.md#edm-parameterization).
- `labels`: class indices (B,), or None for unconditional models; a class-conditional network
  sets `num_classes` (K) and reads label K as "no label" (classifier-free guidance).
- `**cond`: optional extra inputs, e.g. `guidance` (the CFG scale of a distilled student, with
  `guidance_input = True`), or `r`, below.
- `r` (keyword, optional; flow-map models such as MeanFlow): a second TrigFlow time, one per sample,
  `0 <= r <= t`. The network then predicts the scaled average velocity over [r, t], so that
  `x_r = x_t - (t - r) sigma_d F(x_t / sigma_d, t, r=r)`; `r=None` means `r = t` (the
  instantaneous velocity: the network is then a plain velocity network too). A network that takes
  `r` sets `second_time = True` (MeanFlow checks it); fewstep's UNet, MLP and DiT take it when
  built with `second_time=True` (`network.second_time=true`): an embedding of `t - r`, added to
  the time embedding and zero-initialized, so that without it nothing changes. MeanFlow's JVP
  gives `r` a zero tangent: compute with `r` as given (e.g. `t - r` inside the network), not
  with a copy of `t`.
- `text`, `text_mask` (keywords, optional; text-to-image models): prompt embeddings (B, L, D) from a
  text encoder and their attention mask (B, L). A network that takes them sets `text_input = True`;
  classifier-free guidance mixes against the empty prompt's embeddings (docs/math.md#text-guidance).
- optional `adaptive_weight(t) -> (B,)`: the learned loss weighting head (docs/math.md#adaptive-weighting); absent or
  returning None means no adaptive weighting.
- a network registered with `@register_network(name)` can be rebuilt from checkpoints.

`network_info(net)` reads these optional features (`num_classes`, `guidance_input`, `second_time`,
`adaptive_weight`) as a `NetworkInfo`, through DDP / torch.compile wrappers; nothing else probes
them. fewstep's UNet, DiT and MLP share their conditioning (`layers.Conditioning`: time, label,
guidance and r embeddings, time embedded in float32 at least) and check their arguments (shapes,
label range, labels only for class-conditional networks) with one-line errors.

Call networks through `net(...)` (`__call__`), never `net.forward`, so that module hooks fire.
sCT and sCD take the network's JVP from the tangent engine (`tangent_forward`), which needs no
change to the network; `check_tangent(net, example_inputs)` checks it on yours against float64
finite differences and names the first op that disagrees or has no rule.
"""

from __future__ import annotations

import inspect
import typing

from fewstep.jvp.engine import check_tangent, tangent_forward
from fewstep.networks.contract import NetworkInfo, network_info
from fewstep.networks.dit import DiT
from fewstep.networks.lora import LoRANetwork, lora_network
from fewstep.networks.mlp import MLP
from fewstep.networks.registry import (NETWORKS, UnknownNetworkError, build_registered, network_class,
                                       network_spec, register_network, unwrap)
from fewstep.networks.unet import UNet

# Constructor arguments `build_network` fills in from the data when a network takes them.
DATA_ARGUMENTS = ("img_channels", "img_resolution", "dim", "num_classes")
# Keys of the `network` config section that are not constructor arguments.
BUILD_KEYS = ("arch", "class_conditional", "checkpoint_activations", "lora_rank", "lora_alpha", "lora_targets")
# The LoRA student's settings (`fewstep.networks.lora`): `build` wraps the initialized student with them.
LORA_KEYS = ("lora_rank", "lora_alpha", "lora_targets")
# `network.arch = "auto"`: the network for each kind of data.
AUTO_ARCH = {"image": "unet", "vector": "mlp"}
DATA_SHAPES = {"image": "(C, H, W)", "vector": "(D,)"}


def constructor_arguments(cls) -> dict[str, inspect.Parameter]:
    """The keyword arguments a network class takes (its registered `__init__`'s signature)."""
    params = inspect.signature(inspect.unwrap(cls.__init__)).parameters
    return {k: p for k, p in list(params.items())[1:]
            if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)}


def constructor_hints(cls) -> dict:
    try:
        return typing.get_type_hints(inspect.unwrap(cls.__init__))
    except Exception:  # noqa: BLE001 - a user class with unresolvable annotations: no type checks
        return {}


def check_network_values(arch: str, kwargs: dict) -> None:
    """Value checks of a network's arguments (ranges) without building it: the network class's own
    `check_values(**kwargs)`, where it has one ('auto': every default architecture)."""
    for name in (AUTO_ARCH.values() if arch == "auto" else (arch,)):
        cls = network_class(name)
        if hasattr(cls, "check_values"):
            params = constructor_arguments(cls)
            cls.check_values(**{k: kwargs.get(k, p.default) for k, p in params.items()
                                if k not in DATA_ARGUMENTS and p.default is not inspect.Parameter.empty})


def resolve_arch(arch: str, kind: str) -> str:
    """'auto' -> the default network for the data's kind (`AUTO_ARCH`: 'unet' for images, 'mlp' for vectors)."""
    return arch if arch != "auto" else AUTO_ARCH[kind]


def build_network(cfg: dict, kind: str, shape: tuple[int, ...], num_classes: int = 0):
    """The network a run's `network` section describes (`{"arch", "class_conditional", **kwargs}`),
    for data of `kind` ('image'/'vector') and `shape`; data-shaped arguments are filled in. A
    network class that sets `data_kind` takes only that kind of data."""
    cfg = dict(cfg)
    arch = resolve_arch(cfg.pop("arch", "auto"), kind)
    checkpointed = cfg.pop("checkpoint_activations", False)
    lora = {k: cfg.pop(k) for k in LORA_KEYS if k in cfg}
    classes = num_classes if cfg.pop("class_conditional", False) else 0
    if cfg.get("guidance_input") and not classes:
        raise ValueError("network.guidance_input needs class labels (network.class_conditional=true, on labelled "
                         "data): classifier-free guidance mixes a class-conditional and an unconditional model")
    cls = network_class(arch)
    params = constructor_arguments(cls)
    for key in cfg:
        if key not in params or key in DATA_ARGUMENTS:
            raise ValueError(f"unknown key network.{key} for network {arch!r}; it takes: "
                             f"{', '.join(k for k in params if k not in DATA_ARGUMENTS)}")
    wants = getattr(cls, "data_kind", None)
    if wants is not None and wants != kind:
        raise ValueError(f"network.arch {arch!r} needs {wants} data {DATA_SHAPES[wants]}, got shape {tuple(shape)}")
    data = {"num_classes": classes}
    if kind == "image":
        if len(shape) != 3:
            raise ValueError(f"network {arch!r} was given image data of shape {tuple(shape)}, expected (C, H, W)")
        if "img_resolution" in params and shape[1] != shape[2]:
            raise ValueError(f"network {arch!r} needs square images, got {shape[1]}x{shape[2]}")
        data.update(img_channels=shape[0], img_resolution=shape[1])
    else:
        data["dim"] = shape[0]
    if classes and "num_classes" not in params:
        raise ValueError(f"network {arch!r} takes no num_classes, so it cannot be class-conditional")
    kwargs = {k: v for k, v in data.items() if k in params}
    kwargs.update(cfg)
    net = cls(**kwargs)
    if lora.get("lora_rank") is not None:  # before checkpointing: the LoRA network rebuilds its base
        net = lora_network(net, lora["lora_rank"], lora.get("lora_alpha"), lora.get("lora_targets"))
    if checkpointed:
        from fewstep.networks.blocks import checkpoint_activations

        checkpoint_activations(net)
    return net


__all__ = ["AUTO_ARCH", "BUILD_KEYS", "LORA_KEYS", "DATA_ARGUMENTS", "DiT", "NetworkInfo", "network_info",
           "check_network_values", "check_tangent", "tangent_forward", "LoRANetwork", "lora_network", "MLP", "NETWORKS",
           "UNet", "UnknownNetworkError", "build_network", "build_registered", "constructor_arguments", "network_spec",
           "register_network", "unwrap"]


# Registers the paper networks' names: ddpmpp, ncsnpp, adm, edm2.
import fewstep.networks.song_unet  # noqa: E402,F401
import fewstep.networks.adm  # noqa: E402,F401
import fewstep.networks.edm2  # noqa: E402,F401

# Registers the diffusers adapter's name (imported last: the adapter imports this package's registry).
import fewstep.interop.diffusers.network  # noqa: E402,F401
