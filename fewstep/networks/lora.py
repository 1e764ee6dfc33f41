"""LoRA students (LCM-LoRA's recipe): the teacher's frozen weights plus a trainable peft LoRA adapter.

    net = lora_network(student, rank=8)          # `student`: a registered network, already initialized
    network_spec(net)   # {"name": "lora", "kwargs": {"base": <student's spec>, "rank": 8, "alpha": 8,
                        #                             "targets": [...]}}

A checkpoint rebuilds it like any network: the base from its spec, then peft's injection, which is
deterministic given the base and the targets; the weights (base and adapter) come from the
checkpoint. Only the adapter trains, and an adaptive loss-weighting head if the base has one (a part
of the loss, not of the model). LoRA layers are linears and convolutions, so the tangent engine
carries their JVP exactly.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from fewstep.networks.registry import build_registered, network_spec, register_network, unwrap

# Module-name suffixes that LoRA adapts by default, per model class: attention projections,
# feed-forward and residual convolutions (LCM-LoRA's list for SD UNets; attention + FF for transformers).
_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
_FEED_FORWARD = ["ff.net.0.proj", "ff.net.2"]
_RESNET = ["conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv"]
DEFAULT_TARGETS = {
    "UNet2DModel": _ATTENTION + _RESNET,
    "UNet2DConditionModel": _ATTENTION + _FEED_FORWARD + ["proj_in", "proj_out"] + _RESNET,
    "DiTTransformer2DModel": _ATTENTION + _FEED_FORWARD,
    "Transformer2DModel": _ATTENTION + _FEED_FORWARD,
    "PixArtTransformer2DModel": _ATTENTION + _FEED_FORWARD,
    "SD3Transformer2DModel": _ATTENTION + _FEED_FORWARD,
    "FluxTransformer2DModel": _ATTENTION + _FEED_FORWARD,
    "SanaTransformer2DModel": _ATTENTION + _FEED_FORWARD,
    "UNet": ["conv1", "conv2", "qkv", "proj"],  # fewstep's: residual convs, attention
    "DiT": ["qkv", "proj", "mlp.0", "mlp.3"],
    "MLP": ["linear"],
}
# Never adapted: the adaptive loss weight is part of the loss and trains whole.
_NEVER = ("weight_head",)


def import_peft():
    try:
        import peft
    except ImportError:
        raise ImportError("LoRA students need peft: pip install 'fewstep[lora]'") from None
    return peft


def lora_host(net: nn.Module) -> nn.Module:
    """The module LoRA adapts: a diffusers model inside fewstep's adapter (so that the adapter's names
    are diffusers' own, for export), else the network itself."""
    name = getattr(net, "lora_module", None)
    return getattr(net, name) if name else net


def default_targets(net: nn.Module) -> list[str]:
    host = lora_host(net)
    name = type(host).__name__
    if name not in DEFAULT_TARGETS:
        raise ValueError(f"no default LoRA targets for {name}; give network.lora_targets (module-name suffixes, "
                         f"e.g. [\"to_q\", \"to_v\"])")
    return list(DEFAULT_TARGETS[name])


def matching_modules(host: nn.Module, targets: list[str]) -> list[str]:
    """Full names of the Linear / Conv layers whose names end in one of `targets` (peft's rule for a
    list), outside the weight head."""
    out = []
    for name, module in host.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            continue
        if name.split(".")[0] in _NEVER:
            continue
        if any(name == t or name.endswith("." + t) for t in targets):
            out.append(name)
    return out


@register_network("lora")
class LoRANetwork(nn.Module):
    """`base` (a network spec) with a LoRA adapter of `rank` and `alpha` (default: rank, scale 1) on the
    modules named by `targets` (suffixes; default: `DEFAULT_TARGETS` for the base's model class)."""

    def __init__(self, base: dict, rank: int, alpha: float | None = None, targets: list[str] | None = None):
        super().__init__()
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"network.lora_rank must be an integer >= 1, got {rank!r}")
        if alpha is not None and not (isinstance(alpha, (int, float)) and alpha > 0):
            raise ValueError(f"network.lora_alpha must be a number > 0, got {alpha!r}")
        peft = import_peft()
        self.base = build_registered(base)
        host = lora_host(self.base)
        targets = default_targets(self.base) if targets is None else list(targets)
        names = matching_modules(host, targets)
        if not names:
            raise ValueError(f"network.lora_targets {targets} match no Linear/Conv layer of {type(host).__name__}")
        # An anchored pattern of the exact names: peft injects where we matched, nowhere else.
        pattern = "^(" + "|".join(re.escape(n) for n in names) + ")$"
        config = peft.LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha, target_modules=pattern,
                                 lora_dropout=0.0, init_lora_weights=True)
        peft.inject_adapter_in_model(config, host, adapter_name="default")
        for name, p in self.base.named_parameters():
            p.requires_grad_("lora_" in name or name.split(".")[0] in _NEVER)
        self.rank, self.alpha, self.targets = rank, float(rank if alpha is None else alpha), targets

    def forward(self, *args, **kwargs):
        return self.base(*args, **kwargs)

    # The network contract's optional features are the base's (`fewstep.networks.contract`).
    @property
    def num_classes(self) -> int:
        return int(getattr(self.base, "num_classes", 0) or 0)

    @property
    def guidance_input(self) -> bool:
        return bool(getattr(self.base, "guidance_input", False))

    @property
    def second_time(self) -> bool:
        return bool(getattr(self.base, "second_time", False))

    @property
    def text_input(self) -> bool:
        return bool(getattr(self.base, "text_input", False))

    @property
    def weight_head(self):
        has = callable(getattr(self.base, "adaptive_weight", None))
        return getattr(self.base, "weight_head", None) if has else None

    def adaptive_weight(self, t: torch.Tensor):
        return self.base.adaptive_weight(t) if self.weight_head is not None else None

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """peft's adapter weights, keyed by module names of the host (the diffusers model, for export)."""
        return import_peft().get_peft_model_state_dict(lora_host(self.base), adapter_name="default")


def lora_network(net: nn.Module, rank: int, alpha: float | None = None,
                 targets: list[str] | None = None) -> LoRANetwork:
    """`net` (registered, with its weights) frozen under a fresh LoRA adapter; the adapter's B is zero,
    so the result computes exactly what `net` does."""
    net = unwrap(net)
    if targets is None:
        targets = default_targets(net)  # recorded in the spec: a checkpoint never depends on today's defaults
    lora = LoRANetwork(network_spec(net), rank, alpha, targets)
    load_base_weights(lora, net.state_dict())
    return lora


def load_base_weights(lora: LoRANetwork, state: dict[str, torch.Tensor]) -> None:
    """A plain network's weights into the LoRA network's base (peft moved each adapted layer's weights
    to `<layer>.base_layer.`)."""
    own = lora.base.state_dict()
    plain = {}
    for key in own:
        if "lora_" in key:
            continue
        source = key.replace(".base_layer.", ".")
        if source not in state:
            raise ValueError(f"the network's weights lack {source!r}, which its LoRA network has")
        plain[key] = state[source]
    missing, unexpected = lora.base.load_state_dict(plain, strict=False)
    missing = [k for k in missing if "lora_" not in k]
    if missing:
        raise ValueError(f"the LoRA network's base misses {missing[:5]}")
