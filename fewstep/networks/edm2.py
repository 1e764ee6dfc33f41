"""EDM2's magnitude-preserving U-Net (Karras et al. 2024, NVlabs/edm2 `training/networks_edm2.py`,
config G), registered as `edm2` in fewstep's contract (`fewstep.networks.paper`).

    network_class("edm2")(img_channels=4, img_resolution=64, label_dim=1000, size="s")   # EDM2-S at 512^2

`net.unet` is EDM2's `UNet` and `net.logvar_fourier` / `net.logvar_linear` its uncertainty head,
with EDM2's names, so an EDM2 snapshot's `ema` loads as it is. The head is the network's
adaptive weighting: `adaptive_weight(t) = -logvar(c_noise(t))` (EDM2's loss
`L / exp(logvar) + logvar` is fewstep's `exp(w) L - w` with `w = -logvar`).

MP layers normalize their weights in every forward; in training mode they also write the
normalized weights back (EDM2's forced weight normalization, Eq. 66 of the paper), except under
FSDP2. EDM2's scalar gains are 1-element vectors (FSDP2 shards no scalars).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fewstep.networks.blocks import BlockDict
from fewstep.networks.paper import PaperNetwork, block_dropout, check_levels, paper_time_input, resolve_label_dim
from fewstep.networks.registry import register_network

SIZES = {"xs": 128, "s": 192, "m": 256, "l": 320, "xl": 384, "xxl": 448}  # EDM2's model_channels per size


def normalize(x: torch.Tensor, dim=None, eps: float = 1e-4) -> torch.Tensor:
    """`x / (eps + rms(x))` over `dim` (default: all but the first), the RMS in float32 at least."""
    dim = tuple(range(1, x.ndim)) if dim is None else dim
    rms = x.to(torch.promote_types(x.dtype, torch.float32)).square().mean(dim=dim, keepdim=True).sqrt()
    return x / (eps + rms).to(x.dtype)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x) / 0.596  # Eq. 81: unit magnitude for unit-variance input


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    return (a * (1 - t) + b * t) / math.sqrt((1 - t) ** 2 + t ** 2)  # Eq. 88


def mp_cat(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    na, nb = a.shape[1], b.shape[1]
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t ** 2))  # Eq. 103
    return torch.cat([a * (c / math.sqrt(na) * (1 - t)), b * (c / math.sqrt(nb) * t)], dim=1)


class MPFourier(nn.Module):
    """Magnitude-preserving Fourier features `sqrt(2) cos(f x + phase)` (Eq. 75), random buffers."""

    def __init__(self, num_channels: int, bandwidth: float = 1.0):
        super().__init__()
        freqs, phases = torch.empty(num_channels), torch.empty(num_channels)
        if not freqs.is_meta:  # nothing to draw on the meta device
            freqs.normal_(0, 2 * math.pi * bandwidth)
            phases.uniform_(0, 2 * math.pi)
        self.register_buffer("freqs", freqs)
        self.register_buffer("phases", phases)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        y = x.to(dtype)[:, None] * self.freqs.to(dtype)[None] + self.phases.to(dtype)[None]
        return (torch.cos(y) * math.sqrt(2)).to(x.dtype)


class MPConv(nn.Module):
    """Magnitude-preserving convolution (kernel (k, k)) or linear layer (kernel ()), weights
    normalized in the forward (Eq. 47, 66)."""

    def __init__(self, in_channels: int, out_channels: int, kernel):
        super().__init__()
        self.out_channels = out_channels
        self.forced = True  # forced weight normalization in training mode (off under FSDP2, see EDM2.raw_forward)
        w = torch.empty(out_channels, in_channels, *kernel)
        self.weight = nn.Parameter(w if w.is_meta else w.normal_())

    def forward(self, x: torch.Tensor, gain=1) -> torch.Tensor:
        w = self.weight.to(torch.promote_types(self.weight.dtype, torch.float32))
        if self.training and self.forced:  # forced weight normalization, through `.data`: traced graphs too
            with torch.no_grad():
                self.weight.data.copy_(normalize(w.detach()))
        w = normalize(w) * (gain / math.sqrt(w[0].numel()))
        w = w.to(x.dtype)
        if w.ndim == 2:
            return F.linear(x, w)
        return F.conv2d(x, w, padding=w.shape[-1] // 2)


def resample(x: torch.Tensor, mode: str) -> torch.Tensor:
    """EDM2's resampling with its default [1, 1] filter: 2x2 averages down, nearest up."""
    if mode == "down":
        return F.avg_pool2d(x, 2)
    if mode == "up":
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    return x


class Block(nn.Module):
    """EDM2's encoder/decoder block (Fig. 21) with optional self-attention."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, flavor: str = "enc",
                 resample_mode: str = "keep", attention: bool = False, channels_per_head: int = 64,
                 dropout: float = 0.0, res_balance: float = 0.3, attn_balance: float = 0.3, clip_act: float = 256):
        super().__init__()
        self.out_channels, self.flavor, self.resample_mode = out_channels, flavor, resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout, self.res_balance, self.attn_balance, self.clip_act = dropout, res_balance, attn_balance, clip_act
        self.emb_gain = nn.Parameter(torch.zeros([1]))  # EDM2's scalar gains as 1-vectors: FSDP2 shards no scalars
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, kernel=[3, 3])
        self.emb_linear = MPConv(emb_channels, out_channels, kernel=[])
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=[3, 3])
        self.conv_skip = MPConv(in_channels, out_channels, kernel=[1, 1]) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, kernel=[1, 1]) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, kernel=[1, 1]) if self.num_heads else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = resample(x, self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm
        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * c[:, :, None, None].to(y.dtype))
        if self.dropout:
            y = F.dropout(y, p=self.dropout, training=self.training)
        y = self.conv_res1(y)
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)
        if self.num_heads:
            b, ch, h, w = x.shape
            y = self.attn_qkv(x).reshape(b, self.num_heads, -1, 3, h * w)
            y = normalize(y, dim=2)  # pixel norm of q, k and v per head
            q, k, v = (y[:, :, :, i].transpose(-1, -2) for i in range(3))
            y = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(b, ch, h, w)
            x = mp_sum(x, self.attn_proj(y), t=self.attn_balance)
        if self.clip_act is not None:
            x = torch.clamp(x, -self.clip_act, self.clip_act)
        return x


class UNet(nn.Module):
    """EDM2's `UNet`, same module tree. `forward(x, noise_labels, class_labels, extra=None)`; `extra`
    (or None) is added to the embedding after the labels."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int, model_channels: int = 192,
                 channel_mult=(1, 2, 3, 4), channel_mult_noise: int | None = None, channel_mult_emb: int | None = None,
                 num_blocks: int = 3, attn_resolutions=(16, 8), label_balance: float = 0.5, concat_balance: float = 0.5,
                 dropout: float = 0.0, dropout_res: int | None = None, embedding_scale: float | None = None,
                 **block_kwargs):
        super().__init__()
        check_levels(img_resolution, channel_mult)
        cblock = [model_channels * m for m in channel_mult]
        cnoise = model_channels * channel_mult_noise if channel_mult_noise is not None else cblock[0]
        cemb = self.emb_channels = model_channels * channel_mult_emb if channel_mult_emb is not None else max(cblock)
        self.label_balance, self.concat_balance = label_balance, concat_balance
        self.out_gain = nn.Parameter(torch.zeros([1]))
        self.emb_fourier = MPFourier(cnoise, bandwidth=1.0 if embedding_scale is None else embedding_scale)
        self.emb_noise = MPConv(cnoise, cemb, kernel=[])
        self.emb_label = MPConv(label_dim, cemb, kernel=[]) if label_dim else None

        def block(cin, cout, res, **kw):
            return Block(cin, cout, cemb, dropout=block_dropout(dropout, dropout_res, res), **block_kwargs, **kw)

        self.enc = BlockDict()
        cout = img_channels + 1
        for level, channels in enumerate(cblock):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_conv"] = MPConv(cin, cout, kernel=[3, 3])
            else:
                self.enc[f"{res}x{res}_down"] = block(cout, cout, res, flavor="enc", resample_mode="down")
            for idx in range(num_blocks):
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_block{idx}"] = block(cin, cout, res, flavor="enc",
                                                            attention=res in attn_resolutions)
        self.dec = BlockDict()
        skips = [b.out_channels for b in self.enc.values()]
        for level, channels in reversed(list(enumerate(cblock))):
            res = img_resolution >> level
            if level == len(cblock) - 1:
                self.dec[f"{res}x{res}_in0"] = block(cout, cout, res, flavor="dec", attention=True)
                self.dec[f"{res}x{res}_in1"] = block(cout, cout, res, flavor="dec")
            else:
                self.dec[f"{res}x{res}_up"] = block(cout, cout, res, flavor="dec", resample_mode="up")
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), channels
                self.dec[f"{res}x{res}_block{idx}"] = block(cin, cout, res, flavor="dec",
                                                            attention=res in attn_resolutions)
        self.out_conv = MPConv(cout, img_channels, kernel=[3, 3])

    def forward(self, x, noise_labels, class_labels=None, extra=None):
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_label is not None:
            emb = mp_sum(emb, self.emb_label(class_labels.to(emb.dtype) * math.sqrt(class_labels.shape[1])),
                         t=self.label_balance)
        if extra is not None:
            emb = emb + extra.to(emb.dtype)
        emb = mp_silu(emb)
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, block in self.enc.items():
            x = block(x) if "conv" in name else block(x, emb)
            skips.append(x)
        for name, block in self.dec.items():
            if "block" in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = block(x, emb)
        return self.out_conv(x, gain=self.out_gain)


@register_network("edm2")
class EDM2(PaperNetwork):
    """EDM2's `Precond` + `UNet`; `size` ("xs" .. "xxl") picks EDM2's model_channels."""

    def __init__(self, img_channels: int, img_resolution: int, label_dim: int = 0, model_channels: int | None = None,
                 size: str | None = None, channel_mult: tuple[int, ...] = (1, 2, 3, 4), num_blocks: int = 3,
                 attn_resolutions: tuple[int, ...] = (16, 8), dropout: float = 0.0, channels_per_head: int = 64,
                 logvar_channels: int = 128,
                 precond: str = "edm", sigma_data: float = 0.5, embedding_scale: float | None = None,
                 dropout_res: int | None = None, adaptive_weight: bool = True, guidance_input: bool = False,
                 num_classes: int = 0):
        super().__init__()
        if size is not None:
            if size not in SIZES:
                raise ValueError(f"edm2 size must be one of {list(SIZES)}, got {size!r}")
            if model_channels is not None and model_channels != SIZES[size]:
                raise ValueError(f"edm2 size {size!r} has model_channels {SIZES[size]}, got {model_channels}")
        channels = SIZES[size] if size is not None else (192 if model_channels is None else model_channels)
        k = resolve_label_dim(label_dim, num_classes)
        self.unet = UNet(img_resolution, img_channels, k, model_channels=channels, channel_mult=tuple(channel_mult),
                         num_blocks=num_blocks, attn_resolutions=tuple(attn_resolutions), dropout=dropout,
                         dropout_res=dropout_res, embedding_scale=embedding_scale, channels_per_head=channels_per_head)
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1, kernel=[])
        self.use_logvar, self._forced = adaptive_weight, True
        self.init_paper(img_channels=img_channels, img_resolution=img_resolution, num_classes=k, precond=precond,
                        sigma_data=sigma_data, adaptive_weight=False, guidance_input=guidance_input,
                        guidance_dim=self.unet.emb_channels)

    @property
    def weight_head(self):
        """The logvar head's learned layer (FSDP makes it a unit of its own), or None without the head."""
        return self.logvar_linear if self.use_logvar else None

    def adaptive_weight(self, t: torch.Tensor) -> torch.Tensor | None:
        if not self.use_logvar:
            return None
        c_noise = paper_time_input(self, t)
        return -self.logvar_linear(self.logvar_fourier(c_noise)).reshape(-1)

    def raw_forward(self, x_in, c_noise, class_labels, extra):
        # FSDP2 gathers each weight into a buffer that its backward gathers again from the shards, so a
        # write-back would be lost and would corrupt the saved activations: no forced normalization there
        # (the forward's own normalization keeps the output independent of the weights' scale).
        forced = not _is_sharded(self)
        if forced != self._forced:
            for m in self.modules():
                if isinstance(m, MPConv):
                    m.forced = forced
            self._forced = forced
        return self.unet(x_in, c_noise, class_labels, extra)


def _is_sharded(module: nn.Module) -> bool:
    return hasattr(module, "_get_fsdp_state")  # FSDP2's fully_shard makes the module an FSDPModule
