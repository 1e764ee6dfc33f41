"""diffusers' noise schedules in TrigFlow time: a diffusers model as a TrigFlow network, exactly.

TrigFlow (docs/math.md#trigflow) writes `x_t = cos(t) x0 + sin(t) z` with `z = sigma_d eps`; a VP (DDPM/DDIM)
model sees `x = sqrt(ab) x0 + sqrt(1 - ab) eps` at discrete timestep k with `ab = alphas_cumprod[k]`;
a rectified-flow model sees `x = (1 - s) x0 + s eps` at timestep `s N`. Equal signal-to-noise
ratios are the same noisy point up to a scale, so for TrigFlow time t:

    log-SNR  lam(t) = 2 ln(cos t / (sigma_d sin t))
    VP:      ab = sigmoid(lam),  x = x_t / sqrt(cos^2 t + sigma_d^2 sin^2 t),
             timestep k: lam interpolated linearly between the schedule's discrete log-SNRs
    flow:    s = sigma_d sin t / (cos t + sigma_d sin t),  x = x_t / (cos t + sigma_d sin t),
             timestep s N (flow models are trained at continuous s)

The model's prediction (epsilon, v_prediction, sample, or the flow velocity eps - x0) gives
estimates of x0 and eps, and the TrigFlow velocity is `dx_t/dt = -sin(t) x0 + cos(t) sigma_d eps`.
Inside the schedule's range every step is exact; outside it (t beyond the last timestep's noise
level, or below the first) the model is asked at the nearest level it was trained on, as DDPM's
own sampler starts at its last timestep, and the estimates are read at that level too, which
keeps the velocity finite at t = pi/2.

Schedulers are named, never imported on a file's say-so: `VP_SCHEDULERS` and `FLOW_SCHEDULERS`.
"""

from __future__ import annotations

import torch
from torch import nn

VP_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler",
                 "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
                 "HeunDiscreteScheduler", "LMSDiscreteScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler",
                 "KDPM2DiscreteScheduler", "LCMScheduler", "TCDScheduler")
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler", "FlowMatchLCMScheduler")
VP_PREDICTIONS = ("epsilon", "v_prediction", "sample")
FLOW_PREDICTIONS = ("flow_prediction",)  # the velocity eps - x0 of rectified flow (diffusers' FlowMatch models)


def import_diffusers():
    try:
        import diffusers
    except ImportError:
        raise ImportError("diffusers models need the diffusers package: pip install 'fewstep[diffusers]'") from None
    return diffusers


def make_scheduler(name: str, config: dict):
    """A diffusers scheduler from its class name (allow-listed) and config."""
    if name not in VP_SCHEDULERS + FLOW_SCHEDULERS:
        raise ValueError(f"scheduler {name!r} is not supported; supported: {', '.join(VP_SCHEDULERS + FLOW_SCHEDULERS)}")
    cls = getattr(import_diffusers(), name)
    return cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})


def vp_log_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The discrete log-SNRs `ln(ab / (1 - ab))`, decreasing in the timestep index."""
    ab = alphas_cumprod.double()
    return torch.log(ab) - torch.log1p(-ab)


class TrigFlowSchedule(nn.Module):
    """The map between TrigFlow time and a diffusers model's noise level (module docstring).

        sched = TrigFlowSchedule.from_scheduler("DDPMScheduler", cfg, sigma_d=0.5)
        F = sched.velocity(model_fn, x_t / sigma_d, t)   # model_fn(x, timestep) -> prediction

    `prediction`: the model's output (`epsilon`, `v_prediction`, `sample`, or `flow_prediction`)."""

    def __init__(self, kind: str, prediction: str, sigma_d: float, log_snr: torch.Tensor | None = None,
                 num_train_timesteps: int = 1000):
        super().__init__()
        if kind not in ("vp", "flow"):
            raise ValueError(f"schedule kind must be 'vp' or 'flow', got {kind!r}")
        allowed = VP_PREDICTIONS if kind == "vp" else FLOW_PREDICTIONS
        if prediction not in allowed:
            raise ValueError(f"a {kind} schedule's prediction_type must be one of {', '.join(allowed)}, "
                             f"got {prediction!r}")
        if kind == "vp":
            if log_snr is None or log_snr.ndim != 1 or len(log_snr) < 2:
                raise ValueError("a VP schedule needs its discrete log-SNRs (at least 2 timesteps)")
            if not bool((log_snr[1:] < log_snr[:-1]).all()):
                raise ValueError("the schedule's alphas_cumprod must decrease strictly with the timestep")
            # Non-persistent: the table is the scheduler config's, not a weight of the network.
            self.register_buffer("log_snr", log_snr.double(), persistent=False)
        self.kind, self.prediction, self.sigma_d = kind, prediction, float(sigma_d)
        self.num_train_timesteps = int(num_train_timesteps)

    @classmethod
    def from_scheduler(cls, name: str, config: dict, sigma_d: float, prediction: str | None = None):
        """From a diffusers scheduler's class name and config (`scheduler_config.json`)."""
        scheduler = make_scheduler(name, config)
        if name in FLOW_SCHEDULERS:
            return cls("flow", prediction or "flow_prediction", sigma_d,
                       num_train_timesteps=scheduler.config.num_train_timesteps)
        prediction = prediction or scheduler.config.get("prediction_type", "epsilon")
        return cls("vp", prediction, sigma_d, vp_log_snr(scheduler.alphas_cumprod),
                   num_train_timesteps=scheduler.config.num_train_timesteps)

    def _log_snr_at(self, t: torch.Tensor) -> torch.Tensor:
        # Clamped away from 0 so that float32's cos(pi/2) < 0 reads as the end of the schedule.
        tiny = torch.finfo(t.dtype).tiny
        return 2 * (torch.log(torch.cos(t).clamp_min(tiny)) - torch.log((self.sigma_d * torch.sin(t)).clamp_min(tiny)))

    def vp_timestep(self, lam: torch.Tensor) -> torch.Tensor:
        """The fractional timestep of log-SNR `lam` (inside the table's range), linear in log-SNR."""
        table = self.log_snr.to(lam.dtype)
        # searchsorted wants increasing values: -table increases with the index.
        hi = torch.searchsorted(-table, (-lam).contiguous()).clamp(1, len(table) - 1)
        lo = hi - 1
        frac = (table[lo] - lam) / (table[lo] - table[hi])
        return lo.to(lam.dtype) + frac

    def model_inputs(self, x: torch.Tensor, t: torch.Tensor):
        """`x = x_t / sigma_d`, TrigFlow time t (B,) -> (the model's input, its timestep (B,), and the
        (a, b) that read its prediction: x_model ~ a x0 + b eps)."""
        c, s = torch.cos(t).clamp_min(0), torch.sin(t)
        sd = self.sigma_d
        shape = (-1,) + (1,) * (x.ndim - 1)
        if self.kind == "vp":
            table = self.log_snr.to(t.dtype)
            lam = self._log_snr_at(t).clamp(table[-1], table[0])
            x_model = x * (sd / torch.sqrt(c * c + sd * sd * s * s)).view(shape)
            a, b = torch.sqrt(torch.sigmoid(lam)), torch.sqrt(torch.sigmoid(-lam))
            return x_model, self.vp_timestep(lam), a.view(shape), b.view(shape)
        sigma = sd * s / (c + sd * s)  # the flow's noise level s in [0, 1]
        x_model = x * (sd / (c + sd * s)).view(shape)
        return x_model, sigma * self.num_train_timesteps, (1 - sigma).view(shape), sigma.view(shape)

    def estimates(self, pred: torch.Tensor, x_model: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
        """(x0, eps) estimates from the model's prediction at the level `x_model ~ a x0 + b eps`."""
        if self.prediction == "epsilon":
            return (x_model - b * pred) / a, pred
        if self.prediction == "v_prediction":  # v = a eps - b x0
            return a * x_model - b * pred, b * x_model + a * pred
        if self.prediction == "sample":
            return pred, (x_model - a * pred) / b
        return x_model - b * pred, x_model + a * pred  # flow: v = eps - x0, with a = 1 - s and b = s

    def velocity(self, model_fn, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The network output F (velocity / sigma_d) of `model_fn(x_model, timestep)` at x = x_t/sigma_d."""
        x_model, timestep, a, b = self.model_inputs(x, t)
        x0, eps = self.estimates(model_fn(x_model, timestep), x_model, a, b)
        shape = (-1,) + (1,) * (x.ndim - 1)
        c, s = torch.cos(t).clamp_min(0).view(shape), torch.sin(t).view(shape)
        return c * eps - s * x0 / self.sigma_d

    def output_gain(self, t: torch.Tensor) -> torch.Tensor:
        """|dF / d(prediction)| at TrigFlow time t (B,): F is affine in the model's output, so one difference
        is exact. An epsilon reading gains sqrt(1 - ab) / (sigma_d sqrt(ab)) at pi/2 (~315 for DDPM's linear
        betas), which is what a student of an epsilon teacher must learn through (docs/results.md)."""
        x = torch.zeros(t.shape[0], 1, dtype=t.dtype, device=t.device)
        f = lambda value: self.velocity(lambda xm, k: torch.full_like(xm, value), x, t)  # noqa: E731
        return (f(1.0) - f(0.0)).abs().flatten()

    def trigflow_time(self, timestep: torch.Tensor) -> torch.Tensor:
        """The TrigFlow time of a model timestep (the inverse map; fractional VP timesteps interpolate
        log-SNR as `model_inputs` does)."""
        timestep = torch.as_tensor(timestep, dtype=torch.float64)
        if self.kind == "flow":
            s = timestep / self.num_train_timesteps
            return torch.atan2(s, self.sigma_d * (1 - s))
        table = self.log_snr
        k = timestep.clamp(0, len(table) - 1)
        lo = k.floor().long().clamp(max=len(table) - 2)
        lam = table[lo] + (k - lo) * (table[lo + 1] - table[lo])
        return torch.atan(torch.exp(-lam / 2) / self.sigma_d)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, prediction={self.prediction!r}, sigma_d={self.sigma_d}"

