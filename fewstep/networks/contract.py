"""What a network offers beyond `F(x, t, labels)`: `network_info(net)`, the one place that reads
the network contract's optional features (the module docstring of `fewstep.networks`).

    info = network_info(net)        # through DDP, torch.compile and FSDP wrappers
    if info.num_classes: ...        # instead of getattr(net, "num_classes", 0)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fewstep.networks.registry import unwrap


@dataclass(frozen=True)
class NetworkInfo:
    """The optional features of a network.

    - `num_classes`: K > 0 for a class-conditional network (labels 0..K-1, K = no label), else 0;
    - `guidance_input`: it takes the CFG scale it imitates (`guidance=`, a distilled student);
    - `second_time`: it takes a second time `r <= t` (`r=`, flow maps such as MeanFlow);
    - `adaptive_weight`: it has a learned loss-weighting head, `net.adaptive_weight(t) -> (B,)`;
    - `text_input`: it takes prompt embeddings `text=` (B, L, D) and their mask `text_mask=` (B, L)
      (a text-to-image model; the prompts of a run come from `fewstep.data.prompts`).
    """

    num_classes: int = 0
    guidance_input: bool = False
    second_time: bool = False
    adaptive_weight: bool = False
    text_input: bool = False


def network_info(net: torch.nn.Module) -> NetworkInfo:
    """The features of `net` (or of the module inside its DDP / compile wrappers; FSDP shards in
    place). A network declares them as attributes (`num_classes`, `guidance_input`, `second_time`,
    `text_input`)
    and a method `adaptive_weight(t)`; fewstep's networks built without a head have
    `weight_head = None`. Missing attributes mean the feature is absent."""
    inner = unwrap(net)
    num_classes = int(getattr(inner, "num_classes", 0) or 0)
    head = callable(getattr(inner, "adaptive_weight", None)) and getattr(inner, "weight_head", True) is not None
    return NetworkInfo(num_classes=num_classes, guidance_input=bool(getattr(inner, "guidance_input", False)),
                       second_time=bool(getattr(inner, "second_time", False)), adaptive_weight=head,
                       text_input=bool(getattr(inner, "text_input", False)))


__all__ = ["NetworkInfo", "network_info"]
