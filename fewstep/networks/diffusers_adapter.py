"""diffusers models under fewstep's network contract, unmodified.

    net = DiffusersNetwork("UNet2DModel", {"sample_size": 32, "in_channels": 3, "out_channels": 3, ...})
    net(x_t / sigma_d, t, labels)      # -> model(x, t * time_scale, class_labels=labels).sample

The diffusers model is built from its config (`Model.from_config`) and called through its own
`__call__`, so hooks, attention processors and everything else stay diffusers'. The model class
is looked up by name among diffusers' image models in `MODELS` only: a checkpoint
(`{"name": "diffusers", "kwargs": {"model": ..., "config": ...}}`) can never name other code.
`time_scale` maps TrigFlow's t in [0, pi/2] to the model's timestep input (1: t itself);
`num_classes` K for class-conditional models whose class embedding has K + 1 rows (the last one
is fewstep's "no label", for classifier-free guidance).
"""

from __future__ import annotations

import torch
from torch import nn

from fewstep.networks.registry import register_network

MODELS = ("UNet2DModel", "DiTTransformer2DModel", "Transformer2DModel", "UVit2DModel")


def import_diffusers():
    try:
        import diffusers
    except ImportError:
        raise ImportError("diffusers models need the diffusers package: pip install 'fewstep[diffusers]'") from None
    return diffusers


@register_network("diffusers")
class DiffusersNetwork(nn.Module):
    def __init__(self, model: str, config: dict, time_scale: float = 1.0, num_classes: int = 0):
        super().__init__()
        if model not in MODELS:
            raise ValueError(f"network.model must be one of {', '.join(MODELS)}, got {model!r}")
        self.model = getattr(import_diffusers(), model).from_config(dict(config))
        self.time_scale = time_scale
        self.num_classes = num_classes  # K: labels 0..K-1, and K for "no label" (the model embeds K + 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        kwargs = {} if labels is None else {"class_labels": labels}
        return self.model(x, t * self.time_scale, **kwargs, return_dict=False)[0]
