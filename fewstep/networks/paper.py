"""What the paper networks (`ddpmpp`, `ncsnpp`, `adm`, `edm2`) share: fewstep's contract
`F(x_t / sigma_d, t, labels)` around a network that keeps its paper's own inputs and weights.

A paper network `raw(x_in, c_noise, class_labels)` was trained under a preconditioning that turns
it into a denoiser `D(x_sigma, sigma) = c_skip x_sigma + c_out raw(c_in x_sigma, c_noise(sigma))`.
`precond` names it, and the forward converts TrigFlow's `(x_t / sigma_d, t)` to the raw network's
inputs and its output back to TrigFlow's F, exactly (docs/math.md#paper-preconditioning):

    "edm"      F = -raw(x, ln(sigma) / 4)                      (EDM, EDM2; sigma = sigma_d tan t)
    "vp"       F = (raw(c_in x_sigma, 999 t_vp(sigma)) - sin(t) x) / cos(t)
    "ve"       F = -(raw(x_sigma, ln(sigma / 2)) + sin(t) x) / cos(t)
    "trigflow" F = raw(x, t)          (sCM's networks, c_noise(t) = t; also the raw network itself,
                                       which the EDM-family methods precondition on their own)

Labels follow fewstep's convention (indices, K = no label) and reach the raw network as EDM's
one-hot rows (all zeros = no label).
"""

from __future__ import annotations

import torch
from torch import nn

from fewstep.core.edm import T_CAP
from fewstep.networks.layers import AdaptiveWeight, ConditionedNetwork, PositionalEmbedding

PRECONDS = ("edm", "vp", "ve", "trigflow")
# ln(sigma) needs sigma > 0; at t = 0 the consistency function ignores F, which only has to be finite.
SIGMA_FLOOR = 1e-8
# EDM's VPPrecond schedule (DDPM's linear betas in continuous time): beta_d, beta_min, M.
VP_BETA_D, VP_BETA_MIN, VP_M = 19.9, 0.1, 1000


def vp_time(sigma: torch.Tensor) -> torch.Tensor:
    """EDM's `VPPrecond.sigma_inv`: the VP time in [0, 1] of noise level sigma."""
    return ((VP_BETA_MIN ** 2 + 2 * VP_BETA_D * torch.log1p(sigma.square())).sqrt() - VP_BETA_MIN) / VP_BETA_D


def resolve_label_dim(label_dim: int, num_classes: int) -> int:
    """`label_dim` is the papers' name, `num_classes` fewstep's (what `build_network` fills in)."""
    if label_dim < 0 or num_classes < 0:
        raise ValueError(f"label_dim and num_classes must be >= 0, got {label_dim} and {num_classes}")
    if label_dim and num_classes and label_dim != num_classes:
        raise ValueError(f"label_dim={label_dim} and num_classes={num_classes} disagree; give one of them")
    return label_dim or num_classes


class PaperNetwork(ConditionedNetwork):
    """Base of the paper networks. A subclass builds its raw network and implements
    `raw_forward(x_in, c_noise, class_labels, extra)` (`extra`: the guidance embedding or None)."""

    data_kind = "image"

    def init_paper(self, *, img_channels: int, img_resolution: int, num_classes: int, precond: str,
                   sigma_data: float, adaptive_weight: bool, guidance_input: bool, guidance_dim: int) -> None:
        if precond not in PRECONDS:
            raise ValueError(f"precond must be one of {PRECONDS}, got {precond!r}")
        if img_channels < 1 or img_resolution < 1:
            raise ValueError(f"img_channels and img_resolution must be >= 1, got {img_channels}, {img_resolution}")
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
        self.img_channels, self.img_resolution = img_channels, img_resolution
        self.num_classes, self.precond, self.sigma_data = num_classes, precond, float(sigma_data)
        self.second_time = False
        self.guidance_input = guidance_input
        if guidance_input and not num_classes:
            raise ValueError("guidance_input needs a class-conditional network (label_dim > 0)")
        # sCD's student takes the CFG scale it imitates: sinusoids of w and a zero-initialized
        # linear map, added where the labels enter, so a student copied from its teacher is the teacher.
        self.guidance_emb = None
        if guidance_input:
            self.guidance_emb = nn.Sequential(PositionalEmbedding(guidance_dim), nn.Linear(guidance_dim, guidance_dim))
            nn.init.zeros_(self.guidance_emb[1].weight)
            nn.init.zeros_(self.guidance_emb[1].bias)
        if not isinstance(getattr(type(self), "weight_head", None), property):  # edm2 has its own head
            self.weight_head = AdaptiveWeight(128) if adaptive_weight else None

    def raw_forward(self, x_in, c_noise, class_labels, extra):
        raise NotImplementedError

    # ---------------------------------------------------------------------------------------------

    def check_inputs(self, x, t, labels, guidance) -> torch.Tensor:
        name, shape = type(self).__name__, (self.img_channels, self.img_resolution, self.img_resolution)
        if not torch.is_tensor(x) or x.ndim != 4 or tuple(x.shape[1:]) != shape:
            raise ValueError(f"{name} takes x of shape (B, {', '.join(map(str, shape))}), "
                             f"got {tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}")
        b = x.shape[0]
        if not (torch.is_tensor(t) and t.is_floating_point() and t.numel() in (1, b)):
            raise ValueError(f"{name}: t must be a float tensor with one time per sample ({b}) or one for all, "
                             f"got {tuple(t.shape) if torch.is_tensor(t) else type(t).__name__}")
        if guidance is not None and self.guidance_emb is None:
            raise ValueError(f"{name} takes no guidance input: build it with guidance_input=True")
        if torch.is_tensor(guidance) and guidance.numel() not in (1, b):
            raise ValueError(f"{name}: guidance must be one scale per sample ({b}) or one for all, "
                             f"got shape {tuple(guidance.shape)}")
        if labels is not None:
            self.check_labels(labels, b)
        return t.reshape(-1).expand(b)

    def class_rows(self, labels, b: int, device, dtype) -> torch.Tensor | None:
        """EDM's `class_labels`: one-hot rows, zeros for "no label" (index K or labels=None)."""
        if not self.num_classes:
            return None
        if labels is None:
            return torch.zeros(b, self.num_classes, device=device, dtype=dtype)
        return (labels[:, None] == torch.arange(self.num_classes, device=device)).to(dtype)

    def preconditioning(self, x: torch.Tensor, t: torch.Tensor):
        """`(x_in, c_noise, out)`: the raw network's inputs at TrigFlow `(x = x_t / sigma_d, t)`, and
        `out(raw)`, TrigFlow's F from its output (docs/math.md#paper-preconditioning)."""
        if self.precond == "trigflow":
            return x, t, lambda raw: raw
        sd = self.sigma_data
        tc = t.clamp(0, T_CAP)  # t = pi/2 is sigma = inf: evaluated just below (sigma ~ 5000 sigma_d)
        sigma = sd * torch.tan(tc)
        cos, sin = (v.reshape(-1, 1, 1, 1) for v in (torch.cos(tc), torch.sin(tc)))
        if self.precond == "edm":  # c_in x_sigma = x, c_skip x_sigma = cos t x_t, c_out = sigma_d sin t
            return x, sigma.clamp_min(SIGMA_FLOOR).log() / 4, lambda raw: -raw
        if self.precond == "vp":  # c_skip = 1, c_out = -sigma, c_in = 1 / sqrt(sigma^2 + 1)
            x_in = x * (sd * (cos.square() + (sd * sin).square()).rsqrt())
            return x_in, (VP_M - 1) * vp_time(sigma), lambda raw: (raw - sin * x) / cos
        # "ve": c_skip = 1, c_out = sigma, c_in = 1, c_noise = ln(sigma / 2)
        return x * (sd / cos), (0.5 * sigma).clamp_min(SIGMA_FLOOR).log(), lambda raw: -(raw + sin * x) / cos

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None,
                guidance=None) -> torch.Tensor:
        t = self.check_inputs(x, t, labels, guidance)
        b = x.shape[0]
        # the coefficients and the time input in float32 at least (bf16 rounds t near pi/2 by 0.008)
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            x_in, c_noise, out = self.preconditioning(x.to(dtype), t.to(dtype))
            extra = None
            if self.guidance_emb is not None:
                w = torch.as_tensor(1.0 if guidance is None else guidance, device=x.device, dtype=dtype)
                extra = self.guidance_emb(w.reshape(-1).expand(b))
        raw = self.raw_forward(x_in, c_noise, self.class_rows(labels, b, x.device, dtype), extra)
        return out(raw.to(dtype)).to(x.dtype)


def paper_time_input(net: PaperNetwork, t: torch.Tensor) -> torch.Tensor:
    """The raw network's time input `c_noise` at TrigFlow time t (what its own heads see)."""
    x = torch.zeros(t.reshape(-1).shape[0], 1, 1, 1, dtype=torch.promote_types(t.dtype, torch.float32),
                    device=t.device)
    return net.preconditioning(x, t.reshape(-1).to(x.dtype))[1]


def check_levels(img_resolution: int, channel_mult) -> None:
    levels = len(channel_mult)
    if not levels or min(channel_mult) < 1:
        raise ValueError(f"channel_mult must be a non-empty list of positive ints, got {channel_mult}")
    if img_resolution % (2 ** (levels - 1)):
        raise ValueError(f"img_resolution {img_resolution} is not divisible by 2^(levels-1) = {2 ** (levels - 1)} "
                         f"for channel_mult {tuple(channel_mult)}")


def block_dropout(dropout: float, dropout_res: int | None, res: int) -> float:
    """sCM's dropout placement: `dropout` only in blocks at resolutions <= `dropout_res` (None: all)."""
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    return dropout if dropout_res is None or res <= dropout_res else 0.0


__all__ = ["PRECONDS", "PaperNetwork", "block_dropout", "check_levels", "paper_time_input",
           "resolve_label_dim", "vp_time"]
