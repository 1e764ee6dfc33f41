"""Distribution matching distillation (DMD2, Yin et al. 2024), docs/math.md#distribution-matching-dmd2.

A generator of 1-4 steps (the student, read as a TrigFlow consistency function) is trained so
that its samples, noised to any t, match the data's noised marginal. Per step:

    fake-score updates (an `Auxiliary`, `fake_updates` per generator update, own Adam):
        x = G(z) (no grad); the fake score learns x by plain denoising (flow or EDM loss)
    generator update:
        x = G(z); x_t = cos t x + sin t n
        g = (D_fake(x_t) - D_real(x_t)) / mean|x - D_real(x_t)|      # DMD's normalization
        L = 0.5 ||x - sg(x - g)||^2 / D                              # its gradient in x is g / D

`D_real` is the frozen teacher's x0-prediction (classifier-free guided with `guidance`), `D_fake`
the fake score's, both read in the teacher's formulation. A multi-step generator trains with
backward simulation: its input at step i comes from its own earlier steps (no grad). With
`gan_weight > 0` a classifier head on the fake score's middle features tells noised data from
noised generator samples and the generator gets the non-saturating GAN loss from it.

    method = DMD2(generator_steps=1, guidance=2.0)
    method.set_teacher(teacher_net, "trigflow")     # the fake score starts as a copy of it
    fit(student, method, data, "runs/dmd2", steps=...)
"""

from __future__ import annotations

import copy
from dataclasses import InitVar, dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as Fn

from fewstep.core.edm import edm_to_trigflow
from fewstep.core.ode import edm_net_denoiser, guided, trigflow_net_velocity
from fewstep.core.samplers import cm_times
from fewstep.core.trigflow import (SIGMA_D, consistency_from_velocity, expand_to, lognormal_times, time_dtype,
                                   trigflow_consistency, trigflow_noise)
from fewstep.methods.base import Auxiliary, Method, register_method
from fewstep.methods.common import check_choice, check_range, per_sample_mse
from fewstep.methods.edm import EDMDiffusion
from fewstep.methods.flow import FlowMatching
from fewstep.methods.scd import FORMULATIONS, SCD, make_teacher_velocity
from fewstep.networks.blocks import blocks
from fewstep.networks.contract import network_info

WEIGHTINGS = ("dmd", "kl")


def score_velocity(net, formulation: str, sigma_d: float) -> Callable:
    """A diffusion network as a TrigFlow velocity `v(x_t, t, labels)`, with gradients (the fake score)."""
    check_choice("formulation", formulation, FORMULATIONS)
    if formulation == "trigflow":
        return trigflow_net_velocity(net, sigma_d)
    return edm_to_trigflow(edm_net_denoiser(net, sigma_d), sigma_d)


def dmd_direction(x, t, d_real, d_fake, sigma_d: float, weighting: str = "dmd") -> torch.Tensor:
    """The generator's gradient in x (docs/math.md#distribution-matching-dmd2): 'dmd' divides
    `D_fake - D_real` by `mean |x - D_real|` per sample (DMD's normalization); 'kl' weighs it by
    `cos^2 t / (sigma_d sin t)^2`, which makes it the gradient of the reverse KL at time t."""
    g = d_fake - d_real
    if weighting == "kl":
        tt = expand_to(t, g)
        return g * torch.cos(tt).square() / (sigma_d * torch.sin(tt)).square()
    scale = (x - d_real).abs().flatten(1).mean(dim=1).clamp_min(1e-12)
    return torch.nan_to_num(g / expand_to(scale, g))


class ScoreWithHead(nn.Module):
    """A fake score network with DMD2's GAN classifier on the features of its middle block:
    `forward(x, t, labels)` is the network's, `forward(..., logits=True)` the classifier's (B,)."""

    def __init__(self, score: nn.Module):
        super().__init__()
        found = blocks(score)
        if not found:
            raise ValueError("method.gan_weight needs a fake score network with blocks (an nn.ModuleList) to "
                             "read features from")
        widths = [m.out_features if isinstance(m, nn.Linear) else m.out_channels
                  for m in found[len(found) // 2].modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        if not widths:
            raise ValueError("method.gan_weight: the fake score's middle block has no Linear/Conv2d layer")
        self.score = score
        like = next(score.parameters())
        self.head = nn.Sequential(nn.SiLU(), nn.Linear(widths[-1], 1)).to(device=like.device, dtype=like.dtype)
        self._features = None
        found[len(found) // 2].register_forward_hook(self._keep)
        info = network_info(score)  # the contract's features, for callers that read them
        self.num_classes, self.guidance_input = info.num_classes, info.guidance_input

    def _keep(self, module, args, output):
        self._features = output[0] if isinstance(output, tuple) else output

    def forward(self, x, t, labels=None, logits: bool = False, **cond):
        out = self.score(x, t, labels, **cond)
        if not logits:
            return out
        f, self._features = self._features, None
        pooled = f.mean(dim=(2, 3)) if f.ndim == 4 else f.mean(dim=1) if f.ndim == 3 else f
        if pooled.shape[-1] != self.head[1].in_features:
            raise ValueError(f"method.gan_weight: the fake score's middle features have {pooled.shape[-1]} channels, "
                             f"the head expects {self.head[1].in_features}")
        return self.head(pooled).squeeze(-1)


class _DistributionMatching:
    """The DMD part, shared by DMD2 and rCM: the teacher, the fake score (an auxiliary network),
    the generator's DMD loss."""

    def _dm_init(self):
        self.teacher_net, self.formulation, self.fake = None, "trigflow", None
        check_range("method.fake_lr", self.fake_lr, 0, low_open=True)
        check_range("method.fake_updates", self.fake_updates, 0, low_open=True)
        check_range("method.dmd_p_std", self.dmd_p_std, 0, low_open=True)
        check_range("method.gan_weight", self.gan_weight, 0)
        check_range("method.gan_head_weight", self.gan_head_weight, 0)
        check_choice("method.weighting", self.weighting, WEIGHTINGS)
        if self.fake_ema is not None:
            check_range("method.fake_ema", self.fake_ema, 0, 1)

    def _keep_teacher(self, net, formulation: str) -> None:
        self.teacher_net, self.formulation = net, formulation

    def _denoising(self):
        """The fake score's loss: the teacher's own diffusion loss (flow or EDM), plain."""
        if self.formulation == "edm":
            return EDMDiffusion(sigma_data=self.sigma_d, adaptive_weight=False)
        return FlowMatching(sigma_d=self.sigma_d, p_mean=self.dmd_p_mean, p_std=self.dmd_p_std, adaptive_weight=False)

    def _fake_module(self) -> nn.Module:
        if self.fake is None:
            if self.teacher_net is None:
                raise ValueError(f"method {self.name!r} needs a teacher (set_teacher) to start its fake score from")
            fake = copy.deepcopy(self.teacher_net).requires_grad_(True).train()
            self.fake = ScoreWithHead(fake) if self.gan_weight > 0 else fake
        return self.fake

    def auxiliaries(self, net):
        return {"fake_score": Auxiliary(self._fake_module(), self.fake_loss, lr=self.fake_lr,
                                        updates_per_step=self.fake_updates, ema_decay=self.fake_ema,
                                        betas=(0.0, 0.99) if self.gan_weight > 0 else (0.9, 0.99))}

    # -- the generator ----------------------------------------------------------------------

    def generator_times(self) -> list[float]:
        return cm_times(1)

    @torch.no_grad()
    def generate(self, net, like: torch.Tensor, labels=None) -> torch.Tensor:
        """Generator samples (no gradients), as the fake score learns them."""
        return self.generator_output(net, like, labels, grad=False)

    def generator_output(self, net, like: torch.Tensor, labels=None, grad: bool = True) -> torch.Tensor:
        """`G(z)`: with backward simulation, a step drawn at random, its input made by the earlier
        steps without gradients (docs/math.md#distribution-matching-dmd2)."""
        times = self.generator_times()
        last = int(torch.randint(len(times), ())) if len(times) > 1 else 0
        dtype = time_dtype(like)
        x_t = self.sigma_d * torch.randn_like(like)
        for i, t in enumerate(times[:last + 1]):
            tt = torch.full((like.shape[0],), t, device=like.device, dtype=dtype)
            with torch.set_grad_enabled(grad and i == last):
                x = trigflow_consistency(net, x_t, tt, self.sigma_d, labels)
            if i < last:
                t_next = torch.full_like(tt, times[i + 1])
                x_t = trigflow_noise(x, self.sigma_d * torch.randn_like(x), expand_to(t_next, x))
        return x

    def denoisers(self, x_t, t, labels=None) -> tuple[torch.Tensor, torch.Tensor]:
        """`(D_real, D_fake)` at `(x_t, t)`, without gradients: the teacher's (guided) and the fake
        score's x0-predictions."""
        if self.teacher is None:
            raise ValueError(f"method {self.name!r} needs a teacher: method.set_teacher(net, formulation)")
        fake = self._fake_module()
        with torch.no_grad():
            tt = expand_to(t, x_t)
            v_real = guided(self.teacher, labels, self.guidance)(x_t, t)
            v_fake = score_velocity(fake, self.formulation, self.sigma_d)(x_t, t, labels)
            return (consistency_from_velocity(x_t, tt, v_real.to(x_t.dtype)),
                    consistency_from_velocity(x_t, tt, v_fake.to(x_t.dtype)))

    def dmd_loss(self, x: torch.Tensor, labels=None, t=None, n=None):
        """Per-sample DMD loss of generator samples `x` (with their graph); `t`, `n` drawn if not given."""
        if t is None:
            t = lognormal_times(x.shape[0], self.dmd_p_mean, self.dmd_p_std, self.sigma_d, device=x.device,
                                dtype=time_dtype(x))
        if n is None:
            n = self.sigma_d * torch.randn_like(x)
        x_t = trigflow_noise(x.detach(), n, expand_to(t, x))
        d_real, d_fake = self.denoisers(x_t, t, labels)
        wide = torch.promote_types(x.dtype, torch.float32)
        g = dmd_direction(x.detach().to(wide), t.to(wide), d_real.to(wide), d_fake.to(wide), self.sigma_d,
                          self.weighting)
        xw = x.to(wide)
        loss = 0.5 * per_sample_mse(xw - (xw - g).detach())
        stats = {"dmd_loss": loss.detach().mean(), "dmd_grad_rms": g.square().mean().sqrt()}
        if self.gan_weight > 0:
            gan = self._generator_gan_loss(x, labels)
            loss = loss + self.gan_weight * gan
            stats["gan_g"] = gan.detach().mean()
        return loss, stats

    def _noised(self, x, like):
        t = lognormal_times(x.shape[0], self.dmd_p_mean, self.dmd_p_std, self.sigma_d, device=x.device,
                            dtype=time_dtype(x))
        return trigflow_noise(x, self.sigma_d * torch.randn_like(x), expand_to(t, x)), t

    def _generator_gan_loss(self, x, labels):
        fake = self._fake_module()
        x_t, t = self._noised(x, x)
        fake.requires_grad_(False)  # the gradient goes to the generator only (its graph keeps no weight)
        try:
            logits = fake(x_t / self.sigma_d, t, labels, logits=True)
        finally:
            fake.requires_grad_(True)
        return Fn.softplus(-logits.float())

    # -- the fake score's update --------------------------------------------------------------

    def fake_loss(self, model, net, x0, labels=None, step: int = 0):
        """The fake score's per-sample loss: denoising on generator samples (plus, with the GAN,
        its classifier's loss on noised data vs noised samples)."""
        x = self.generate(net, x0, labels).to(x0.dtype)
        loss, stats = self._denoising()(model, x, labels, step)
        if self.gan_weight > 0:
            x_fake, t_fake = self._noised(x, x0)
            x_real, t_real = self._noised(x0, x0)
            both = torch.cat([x_fake, x_real]) / self.sigma_d
            logits = model(both, torch.cat([t_fake, t_real]),
                           None if labels is None else torch.cat([labels, labels]), logits=True).float()
            lf, lr = logits.chunk(2)
            head = Fn.softplus(lf) + Fn.softplus(-lr)
            loss = loss + self.gan_head_weight * head
            stats = {**stats, "gan_d": head.detach().mean()}
        return loss, stats


@register_method("dmd2")
@dataclass
class DMD2(_DistributionMatching, Method):
    """DMD2 distillation of a diffusion teacher into a generator of `generator_steps` steps."""

    teacher: InitVar[Callable | None] = None
    sigma_d: float = SIGMA_D
    generator_steps: int = 1  # 1 to 4; trained with backward simulation when > 1
    times: list[float] | None = None  # the generator's times (default: the multistep sampler's, cm_times)
    guidance: float = 1.0  # the teacher's CFG scale
    weighting: str = "dmd"  # 'dmd' (DMD's normalization) or 'kl' (the exact reverse-KL weight)
    dmd_p_mean: float = -0.8  # the log-normal proposal of t for the DMD term and the fake score's loss
    dmd_p_std: float = 1.6
    fake_lr: float = 1e-4
    fake_updates: float = 5.0  # fake-score updates per generator update (DMD2's TTUR)
    fake_ema: float | None = None
    gan_weight: float = 0.0  # the generator's GAN loss weight; 0: no GAN head
    gan_head_weight: float = 1e-2  # the classifier's loss weight in the fake-score update
    teacher_net: nn.Module | None = field(default=None, init=False, repr=False)

    takes_teacher = True

    def __post_init__(self, teacher):
        self.teacher = teacher
        self._dm_init()
        check_range("method.sigma_d", self.sigma_d, 0, low_open=True)
        check_range("method.guidance", self.guidance, 0)
        if not 1 <= self.generator_steps <= 4:
            raise ValueError(f"method.generator_steps must be 1 to 4, got {self.generator_steps}")
        if self.times is not None:
            ts = [float(t) for t in self.times]
            if len(ts) != self.generator_steps or any(b >= a for a, b in zip(ts, ts[1:])) or not 0 < ts[-1] \
                    or ts[0] > 1.5707963267948966 + 1e-9:
                raise ValueError(f"method.times must be {self.generator_steps} strictly decreasing times in (0, pi/2], "
                                 f"got {self.times}")

    def set_teacher(self, net, formulation: str = "trigflow") -> None:
        """The frozen teacher (the real score) and the fake score's starting weights."""
        self._keep_teacher(net, formulation)
        self.teacher = make_teacher_velocity(net.requires_grad_(False), formulation, self.sigma_d)

    def generator_times(self) -> list[float]:
        return [float(t) for t in self.times] if self.times is not None else cm_times(self.generator_steps)

    def sampler(self, net, step=None):
        """The generator samples as a multistep consistency model, by default at its own times."""
        from fewstep.core.samplers import TrigFlowConsistencySampler

        return TrigFlowConsistencySampler(net, self.sigma_d, default_times=tuple(self.generator_times()))

    def __call__(self, net, x0: torch.Tensor, labels: torch.Tensor | None = None, step: int = 0):
        x = self.generator_output(net, x0, labels)
        return self.dmd_loss(x, labels)


@register_method("rcm")
@dataclass
class RCM(_DistributionMatching, SCD):
    """Score-regularized sCM (rCM, NVlabs/rcm): the sCD loss plus `dmd_weight` times the DMD loss
    of the student's one-step output, through sCD's JVP path (docs/math.md#rcm). The weight
    ramps linearly from 0 over `dmd_warmup_steps`; with `dmd_weight = 0` this is sCD exactly
    (no fake score is trained)."""

    dmd_weight: float = 1.0  # lambda
    dmd_warmup_steps: int = 0
    weighting: str = "dmd"
    dmd_p_mean: float = -0.8
    dmd_p_std: float = 1.6
    fake_lr: float = 1e-4
    fake_updates: float = 5.0
    fake_ema: float | None = None
    gan_weight: float = 0.0
    gan_head_weight: float = 1e-2

    def __post_init__(self, teacher):
        SCD.__post_init__(self, teacher)
        self._dm_init()
        check_range("method.dmd_weight", self.dmd_weight, 0)
        check_range("method.dmd_warmup_steps", self.dmd_warmup_steps, 0)
        if self.dmd_weight > 0 and self.guidance_range is not None:
            raise ValueError("method.guidance_range (a student that takes the CFG scale) is not supported by rcm's "
                             "DMD term; use one method.guidance, or method.dmd_weight = 0")

    def set_teacher(self, net, formulation: str = "trigflow") -> None:
        SCD.set_teacher(self, net, formulation)
        self._keep_teacher(net, formulation)

    def auxiliaries(self, net):
        return _DistributionMatching.auxiliaries(self, net) if self.dmd_weight > 0 else {}

    def dmd_weight_at(self, step: int) -> float:
        if self.dmd_warmup_steps <= 0:
            return self.dmd_weight
        return self.dmd_weight * min(1.0, step / self.dmd_warmup_steps)

    def __call__(self, net, x0: torch.Tensor, labels: torch.Tensor | None = None, step: int = 0):
        loss, stats = SCD.__call__(self, net, x0, labels, step)
        if self.dmd_weight == 0:
            return loss, stats
        dmd, dmd_stats = self.dmd_loss(self.generator_output(net, x0, labels), labels)
        return loss + self.dmd_weight_at(step) * dmd, {**stats, **dmd_stats}
