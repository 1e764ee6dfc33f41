"""EDM's ADM (`DhariwalUNet`, Karras et al. 2022 after Dhariwal & Nichol 2021), registered as `adm` in
fewstep's contract (`fewstep.networks.paper`).

    network_class("adm")(img_channels=3, img_resolution=64, label_dim=1000)   # EDM's ImageNet-64 network

The raw network is `net.model` with EDM's parameter names. Options as for `ddpmpp`
(`fewstep.networks.song_unet`): `precond`, `embedding_scale`, `double_norm`, `dropout_res`,
`adaptive_weight`, `guidance_input`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fewstep.networks.blocks import BlockDict
from fewstep.networks.edm_layers import Conv2d, GroupNorm, Linear, PositionalEmbedding, UNetBlock
from fewstep.networks.paper import PaperNetwork, block_dropout, check_levels, resolve_label_dim
from fewstep.networks.registry import register_network


class DhariwalUNet(nn.Module):
    """EDM's `DhariwalUNet`, same module tree. `forward(x, noise_labels, class_labels, extra=None)`;
    `extra` (or None) is added to the embedding beside the labels."""

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 augment_dim: int = 0, model_channels: int = 192, channel_mult=(1, 2, 3, 4), channel_mult_emb: int = 4,
                 num_blocks: int = 3, attn_resolutions=(32, 16, 8), dropout: float = 0.10,
                 channels_per_head: int = 64, embedding_scale: float | None = None, double_norm: bool = False,
                 dropout_res: int | None = None):
        super().__init__()
        check_levels(img_resolution, channel_mult)
        emb_channels = self.emb_channels = model_channels * channel_mult_emb
        self.time_scale = 1.0 if embedding_scale is None else float(embedding_scale)
        init = dict(init_mode="kaiming_uniform", init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))
        init_zero = dict(init_mode="kaiming_uniform", init_weight=0, init_bias=0)

        def block(cin, cout, res, **kw):
            return UNetBlock(cin, cout, emb_channels, channels_per_head=channels_per_head,
                             dropout=block_dropout(dropout, dropout_res, res), double_norm=double_norm, init=init,
                             init_zero=init_zero, **kw)

        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = (Linear(label_dim, emb_channels, bias=False, init_mode="kaiming_normal",
                                 init_weight=math.sqrt(label_dim)) if label_dim else None)

        self.enc = BlockDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, 3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = block(cout, cout, res, down=True)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = block(cin, cout, res, attention=res in attn_resolutions)
        skips = [b.out_channels for b in self.enc.values()]

        self.dec = BlockDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = block(cout, cout, res, attention=True)
                self.dec[f"{res}x{res}_in1"] = block(cout, cout, res)
            else:
                self.dec[f"{res}x{res}_up"] = block(cout, cout, res, up=True)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f"{res}x{res}_block{idx}"] = block(cin, cout, res, attention=res in attn_resolutions)
        self.out_norm = GroupNorm(cout)
        self.out_conv = Conv2d(cout, out_channels, 3, **init_zero)

    def forward(self, x, noise_labels, class_labels=None, extra=None, augment_labels=None):
        emb = self.map_noise(noise_labels * self.time_scale)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None:
            emb = emb + self.map_label(class_labels.to(emb.dtype))
        if extra is not None:
            emb = emb + extra.to(emb.dtype)
        emb = F.silu(emb)
        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        for block in self.dec.values():
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))


@register_network("adm")
class ADM(PaperNetwork):
    """EDM's ADM; defaults are its ImageNet-64 configuration."""

    def __init__(self, img_channels: int, img_resolution: int, label_dim: int = 0, augment_dim: int = 0,
                 model_channels: int = 192, channel_mult: tuple[int, ...] = (1, 2, 3, 4), channel_mult_emb: int = 4,
                 num_blocks: int = 3, attn_resolutions: tuple[int, ...] = (32, 16, 8), dropout: float = 0.10,
                 channels_per_head: int = 64, precond: str = "edm", sigma_data: float = 0.5,
                 embedding_scale: float | None = None, double_norm: bool = False, dropout_res: int | None = None,
                 adaptive_weight: bool = False, guidance_input: bool = False, num_classes: int = 0):
        super().__init__()
        k = resolve_label_dim(label_dim, num_classes)
        self.model = DhariwalUNet(img_resolution, img_channels, img_channels, label_dim=k, augment_dim=augment_dim,
                                  model_channels=model_channels, channel_mult=tuple(channel_mult),
                                  channel_mult_emb=channel_mult_emb, num_blocks=num_blocks,
                                  attn_resolutions=tuple(attn_resolutions), dropout=dropout,
                                  channels_per_head=channels_per_head, embedding_scale=embedding_scale,
                                  double_norm=double_norm, dropout_res=dropout_res)
        self.init_paper(img_channels=img_channels, img_resolution=img_resolution, num_classes=k, precond=precond,
                        sigma_data=sigma_data, adaptive_weight=adaptive_weight, guidance_input=guidance_input,
                        guidance_dim=self.model.emb_channels)

    def raw_forward(self, x_in, c_noise, class_labels, extra):
        return self.model(x_in, c_noise, class_labels, extra)
