"""EDM's DDPM++ and NCSN++ (`SongUNet`, Karras et al. 2022 after Song et al. 2021), registered as
`ddpmpp` and `ncsnpp` in fewstep's contract (`fewstep.networks.paper`).

    network_class("ddpmpp")(img_channels=3, img_resolution=32)   # EDM's CIFAR-10 DDPM++ (EDM preconditioning)

The raw network is `net.model` with EDM's parameter names (`model.enc.32x32_conv.weight`, ...),
so an EDM snapshot's `ema` loads into it as it is. sCM's changes are options, off by default:
`precond="trigflow"` (c_noise(t) = t), `embedding_type` / `embedding_scale` (the time embedding
and its frequency scale), `double_norm` (adaptive double normalization), `dropout_res` (dropout
only at resolutions <= it), `adaptive_weight` (the learned loss weighting head).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fewstep.networks.blocks import BlockDict
from fewstep.networks.edm_layers import Conv2d, FourierEmbedding, GroupNorm, Linear, PositionalEmbedding, UNetBlock
from fewstep.networks.paper import PaperNetwork, block_dropout, check_levels, resolve_label_dim
from fewstep.networks.registry import register_network

EMBEDDINGS = ("positional", "fourier")


class SongUNet(nn.Module):
    """EDM's `SongUNet`, same module tree. `forward(x, noise_labels, class_labels, extra=None)`;
    `extra` (or None) is added to the noise embedding beside the labels."""

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 augment_dim: int = 0, model_channels: int = 128, channel_mult=(1, 2, 2, 2), channel_mult_emb: int = 4,
                 num_blocks: int = 4, attn_resolutions=(16,), dropout: float = 0.10, embedding_type: str = "positional",
                 channel_mult_noise: int = 1, encoder_type: str = "standard", resample_filter=(1, 1),
                 embedding_scale: float | None = None, double_norm: bool = False, dropout_res: int | None = None):
        super().__init__()
        if embedding_type not in EMBEDDINGS:
            raise ValueError(f"embedding_type must be one of {EMBEDDINGS}, got {embedding_type!r}")
        if encoder_type not in ("standard", "residual"):
            raise ValueError(f"encoder_type must be 'standard' or 'residual', got {encoder_type!r}")
        check_levels(img_resolution, channel_mult)
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        self.noise_channels = noise_channels
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_attn = dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2))

        def block(cin, cout, res, **kw):
            return UNetBlock(cin, cout, emb_channels, num_heads=1, dropout=block_dropout(dropout, dropout_res, res),
                             skip_scale=math.sqrt(0.5), eps=1e-6, resample_filter=resample_filter, resample_proj=True,
                             adaptive_scale=False, double_norm=double_norm, init=init, init_zero=init_zero,
                             init_attn=init_attn, **kw)

        # Mapping. The time input is scaled by `embedding_scale` for positional sinusoids; it is the
        # frequencies' scale for Fourier features (EDM's default 16; sCM's small scales keep d emb/dt small).
        if embedding_type == "positional":
            self.map_noise = PositionalEmbedding(noise_channels, endpoint=True)
            self.time_scale = 1.0 if embedding_scale is None else float(embedding_scale)
        else:
            self.map_noise = FourierEmbedding(noise_channels, scale=16 if embedding_scale is None else embedding_scale)
            self.time_scale = 1.0
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        self.enc = BlockDict()
        cout = caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, 3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = block(cout, cout, res, down=True)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(caux, cout, 3, down=True,
                                                                   resample_filter=resample_filter,
                                                                   fused_resample=True, **init)
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = block(cin, cout, res, attention=res in attn_resolutions)
        skips = [b.out_channels for name, b in self.enc.items() if "aux" not in name]

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
                attn = idx == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = block(cin, cout, res, attention=attn)
            if level == 0:  # EDM's "standard" decoder: one output head at full resolution
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, 3, **init_zero)

    def forward(self, x, noise_labels, class_labels=None, extra=None, augment_labels=None):
        emb = self.map_noise(noise_labels * self.time_scale)
        half = emb.shape[1] // 2
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=1)  # EDM swaps sin and cos
        if self.map_label is not None:
            emb = emb + self.map_label(class_labels.to(emb.dtype) * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        if extra is not None:
            emb = emb + extra.to(emb.dtype)
        emb = F.silu(self.map_layer0(emb))
        emb = F.silu(self.map_layer1(emb))

        skips, aux = [], x
        for name, block in self.enc.items():
            if "aux_residual" in name:
                x = aux = (x + block(aux)) / math.sqrt(2)
                skips[-1] = x
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)

        aux = tmp = None
        for name, block in self.dec.items():
            if "aux_norm" in name:
                tmp = block(x)
            elif "aux_conv" in name:
                tmp = block(F.silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return aux


class _SongNetwork(PaperNetwork):
    def build(self, img_channels, img_resolution, label_dim, num_classes, precond, sigma_data, adaptive_weight,
              guidance_input, **model_kwargs):
        k = resolve_label_dim(label_dim, num_classes)
        self.model = SongUNet(img_resolution, img_channels, img_channels, label_dim=k, **model_kwargs)
        self.init_paper(img_channels=img_channels, img_resolution=img_resolution, num_classes=k, precond=precond,
                        sigma_data=sigma_data, adaptive_weight=adaptive_weight, guidance_input=guidance_input,
                        guidance_dim=self.model.noise_channels)

    def raw_forward(self, x_in, c_noise, class_labels, extra):
        return self.model(x_in, c_noise, class_labels, extra)


class _SongVariant(_SongNetwork):
    """The shared constructor of EDM's two SongUNet configurations; `VARIANT` holds what differs."""

    VARIANT: dict = {}

    def __init__(self, img_channels: int, img_resolution: int, label_dim: int = 0, augment_dim: int = 0,
                 model_channels: int = 128, channel_mult: tuple[int, ...] = (2, 2, 2), channel_mult_emb: int = 4,
                 num_blocks: int = 4, attn_resolutions: tuple[int, ...] = (16,), dropout: float = 0.10,
                 precond: str = "edm", sigma_data: float = 0.5, embedding_type: str | None = None,
                 embedding_scale: float | None = None, double_norm: bool = False, dropout_res: int | None = None,
                 adaptive_weight: bool = False, guidance_input: bool = False, num_classes: int = 0):
        super().__init__()
        variant = dict(self.VARIANT)
        variant["embedding_type"] = embedding_type or variant["embedding_type"]
        self.build(img_channels, img_resolution, label_dim, num_classes, precond, sigma_data, adaptive_weight,
                   guidance_input, augment_dim=augment_dim, model_channels=model_channels,
                   channel_mult=tuple(channel_mult), channel_mult_emb=channel_mult_emb, num_blocks=num_blocks,
                   attn_resolutions=tuple(attn_resolutions), dropout=dropout, embedding_scale=embedding_scale,
                   double_norm=double_norm, dropout_res=dropout_res, **variant)


@register_network("ddpmpp")
class DDPMpp(_SongVariant):
    """EDM's DDPM++ (`SongUNet` with positional embedding, standard encoder, [1, 1] resampling)."""

    VARIANT = {"embedding_type": "positional", "channel_mult_noise": 1, "encoder_type": "standard",
               "resample_filter": (1, 1)}


@register_network("ncsnpp")
class NCSNpp(_SongVariant):
    """EDM's NCSN++ (`SongUNet` with a Fourier embedding twice as wide, a residual encoder, [1, 3, 3, 1]
    resampling)."""

    VARIANT = {"embedding_type": "fourier", "channel_mult_noise": 2, "encoder_type": "residual",
               "resample_filter": (1, 3, 3, 1)}
