"""Networks `F(x / sigma_d, t, labels)`: a UNet for images and an MLP for vectors."""

from __future__ import annotations

from fewstep.networks.mlp import MLP
from fewstep.networks.unet import UNet


def build_network(cfg, kind: str, shape: tuple[int, ...], num_classes: int = 0):
    """The network a `NetworkConfig` describes, for data of `kind` ('image'/'vector') and `shape`."""
    arch = cfg.arch if cfg.arch != "auto" else ("unet" if kind == "image" else "mlp")
    classes = num_classes if cfg.class_conditional else 0
    if cfg.guidance_input and not classes:
        raise ValueError("network.guidance_input needs class labels (network.class_conditional=true, on labelled "
                         "data): classifier-free guidance mixes a class-conditional and an unconditional model")
    common = dict(dropout=cfg.dropout, num_classes=classes, emb_min_freq=cfg.emb_min_freq,
                  emb_max_freq=cfg.emb_max_freq, adaptive_weight=cfg.adaptive_weight,
                  guidance_input=cfg.guidance_input)
    if arch == "unet":
        if len(shape) != 3:
            raise ValueError(f"network.arch 'unet' needs image data (C, H, W), got shape {tuple(shape)}")
        if shape[1] != shape[2]:
            raise ValueError(f"network.arch 'unet' needs square images, got {shape[1]}x{shape[2]}")
        return UNet(shape[0], shape[1], cfg.model_channels, tuple(cfg.channel_mult), cfg.num_blocks,
                    tuple(cfg.attn_resolutions), cfg.attn_heads, **common)
    if arch == "mlp":
        if len(shape) != 1:
            raise ValueError(f"network.arch 'mlp' needs vector data (D,), got shape {tuple(shape)}")
        return MLP(shape[0], cfg.width, cfg.depth, **common)
    raise ValueError(f"network.arch must be 'auto', 'unet' or 'mlp', got {arch!r}")


__all__ = ["MLP", "UNet", "build_network"]
