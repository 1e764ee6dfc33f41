"""The repeated blocks of a network, found without knowing its class, and activation
checkpointing over them.

A block is an element of an `nn.ModuleList` or a `BlockDict` (outermost ones only): fewstep's UNet stages, DiT
and MLP blocks, diffusers' `down_blocks` / `up_blocks`, most transformers' layers. FSDP shards
per block (`fewstep.training.fsdp`) and activation checkpointing recomputes per block.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class BlockDict(nn.ModuleDict):
    """A `ModuleDict` of blocks: the paper networks keep EDM's named `enc` / `dec` dicts (their keys
    name a snapshot's tensors), and `blocks` treats them as it treats lists."""


def blocks(net: nn.Module) -> list[nn.Module]:
    """The elements of every `nn.ModuleList` of `net`, outermost lists only (a list inside a chosen
    block belongs to that block), in module order. fewstep's UNet: enc/mid/dec stages; DiT and
    MLP: `blocks`; diffusers' UNet2DModel: down_blocks/up_blocks, and the resnets and attentions
    of its mid_block (a module holding lists, not a list)."""
    found: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, nn.ModuleList):
                found.extend(child)
            elif isinstance(child, BlockDict):
                found.extend(child.values())
            else:
                visit(child)

    visit(net)
    return found


def checkpoint_activations(net: nn.Module) -> nn.Module:
    """Recompute each block's activations in the backward instead of keeping them (less memory,
    one more forward). The block's own `forward` is wrapped in place: state-dict keys, hooks and
    the tangent engine are unchanged -- the engine carries tangents through the first forward,
    and the recomputation in the backward needs none. Returns `net`."""
    for block in blocks(net):
        if getattr(block.forward, "_fewstep_checkpointed", False):
            continue
        plain = block.forward

        @functools.wraps(plain)
        def forward(*args, _plain=plain, **kwargs):
            if not torch.is_grad_enabled():
                return _plain(*args, **kwargs)
            return checkpoint(_plain, *args, use_reentrant=False, **kwargs)

        forward._fewstep_checkpointed = True
        block.forward = forward
    return net
