"""diffusers models under fewstep's network contract, unmodified.

    net = DiffusersNetwork("UNet2DModel", {"sample_size": 32, "in_channels": 3, "out_channels": 3, ...})
    net(x_t / sigma_d, t, labels)      # -> model(x, timestep=t * time_scale, class_labels=labels).sample

The diffusers model is built from its config (`Model.from_config`) and called through its own
`__call__`, so hooks, attention processors and everything else stay diffusers'. The model class
is looked up by name among diffusers' image models in `MODELS` only: a checkpoint
(`{"name": "diffusers", "kwargs": {"model": ..., "config": ...}}`) can never name other code.
`time_scale` maps TrigFlow's t in [0, pi/2] to the model's timestep input (1: t itself);
`text` / `text_mask` (the contract's text cond: prompt embeddings and their mask) for
text-to-image models (`TEXT_MODELS`: SD's `UNet2DConditionModel`, `PixArtTransformer2DModel`, and
so a Hub PixArt folder's `Transformer2DModel`, which diffusers builds as PixArt: `takes_text`);
`num_classes` K for class-conditional models whose class embedding has K + 1 rows (the last one
is fewstep's "no label", for classifier-free guidance).

A model trained by diffusers (DDPM/DDIM VP schedules, rectified flow) keeps its own time input and
output: `schedule={"scheduler": "DDPMScheduler", "config": {...}}` converts exactly between TrigFlow
and the model's noise levels (`fewstep.interop.diffusers.schedules`), so the network is a TrigFlow
velocity model without a change to its weights. `formulation="edm"` presents the same network in
EDM's inputs (`c_in x_sigma = x_t / sigma_d`, `c_noise = ln(sigma) / 4`, output negated:
`fewstep.networks.convert`), for the discrete-time consistency methods. `prediction` re-reads the
model's output in another parameterization than its scheduler's (a student's choice: an epsilon
model's x0 estimate divides by sqrt(alphas_cumprod), ~0.006 at DDPM's last timestep, so a one-step
student of an epsilon teacher is better read as `v_prediction`; docs/results.md). `time_input="smooth"`
replaces the model's time input (its timestep through a positional embedding, whose derivative along
t is what sCM's JVP carries) by `cos(2 f t)`, f = 0..`time_frequencies` - 1, of TrigFlow time and a
linear map fitted to the teacher's time embedding (`load_teacher`; docs/math.md#smooth-time-input).
`adaptive_weight=True` adds sCM's learned loss weight `w(t)` (a head beside the model, not exported).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from fewstep.interop.diffusers.schedules import TrigFlowSchedule, import_diffusers
from fewstep.networks.layers import AdaptiveWeight
from fewstep.networks.registry import register_network
from fewstep.core.trigflow import SIGMA_D

MODELS = ("UNet2DModel", "DiTTransformer2DModel", "Transformer2DModel", "UNet2DConditionModel",
          "PixArtTransformer2DModel")
# Text-conditioned models: they take the contract's `text` (B, L, D) and `text_mask` (B, L) cond.
TEXT_MODELS = ("UNet2DConditionModel", "PixArtTransformer2DModel")
TIME_INPUTS = ("schedule", "smooth")


class SmoothTimeFeatures(nn.Module):
    """`cos(2 f t)`, f = 0..n-1, of TrigFlow time t (B,) -> (B, n): a cosine series on [0, pi/2],
    whose derivative along t is at most 2 (n - 1), against ~1,000 for a timestep's positional embedding."""

    def __init__(self, n: int):
        super().__init__()
        self.register_buffer("freqs", 2.0 * torch.arange(n, dtype=torch.float64), persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return torch.cos(t[:, None] * self.freqs.to(t.dtype))


class SmoothTimeEmbedding(nn.Module):
    """The model's time embedding read linearly from `SmoothTimeFeatures` (it takes the place of
    diffusers' `TimestepEmbedding`, called as `time_embedding(t_emb, condition)`)."""

    def __init__(self, n: int, dim: int):
        super().__init__()
        self.linear = nn.Linear(n, dim)

    def forward(self, sample: torch.Tensor, condition=None) -> torch.Tensor:
        if condition is not None:
            raise ValueError("a smooth time input takes no timestep_cond")
        return self.linear(sample)


class InterpolatedTimestepTable(nn.Module):
    """A `UNet2DModel`'s learned time embedding (`time_embedding_type="learned"`: a row per integer
    timestep), read at fractional timesteps by linear interpolation between rows, so that it is a
    continuous function of TrigFlow time with the tangent of a piecewise-linear map. Its one parameter
    keeps `nn.Embedding`'s name, so the model's state dict is diffusers' own."""

    def __init__(self, table: nn.Embedding):
        super().__init__()
        self.weight = table.weight

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        if not timesteps.is_floating_point():
            return self.weight[timesteps]
        k = timesteps.clamp(0, self.weight.shape[0] - 1)
        lo = k.detach().floor().long().clamp(max=self.weight.shape[0] - 2)
        frac = (k - lo.to(k.dtype))[:, None].to(self.weight.dtype)
        return self.weight[lo] + frac * (self.weight[lo + 1] - self.weight[lo])


def takes_text(model: nn.Module) -> bool:
    """Whether a built diffusers model reads prompt embeddings: decided by the class diffusers
    actually built (Hub PixArt folders say `Transformer2DModel`, built as `PixArtTransformer2DModel`)
    and by its cross-attention (a PixArt-style model without `cross_attention_dim` has none)."""
    return type(model).__name__ in TEXT_MODELS and model.config.get("cross_attention_dim") is not None


def class_count(model_name: str, config: dict) -> int:
    """K, the classes of a class-conditional diffusers model whose "no label" is class K: DiT's
    `num_embeds_ada_norm` (its label table has a CFG row); a UNet2DModel's `num_class_embeds` - 1."""
    if model_name == "DiTTransformer2DModel" or (model_name == "Transformer2DModel"
                                                 and config.get("norm_type") == "ada_norm_zero"):
        return int(config.get("num_embeds_ada_norm") or 0)
    if model_name == "UNet2DModel" and config.get("num_class_embeds"):
        return int(config["num_class_embeds"]) - 1
    return 0


@register_network("diffusers")
class DiffusersNetwork(nn.Module):
    lora_module = "model"  # LoRA adapts the diffusers model itself: its adapter keeps diffusers' names

    def __init__(self, model: str, config: dict, time_scale: float = 1.0, num_classes: int = 0,
                 schedule: dict | None = None, sigma_d: float = SIGMA_D, formulation: str = "trigflow",
                 prediction: str | None = None, time_input: str = "schedule", time_frequencies: int = 32,
                 adaptive_weight: bool = False):
        super().__init__()
        if model not in MODELS:
            raise ValueError(f"network.model must be one of {', '.join(MODELS)}, got {model!r}")
        if formulation not in ("trigflow", "edm"):
            raise ValueError(f"formulation must be 'trigflow' or 'edm', got {formulation!r}")
        if formulation == "edm" and schedule is None:
            raise ValueError("formulation 'edm' is for diffusers models with their schedule (schedule=...)")
        if time_input not in TIME_INPUTS:
            raise ValueError(f"time_input must be one of {', '.join(TIME_INPUTS)}, got {time_input!r}")
        if not (isinstance(time_frequencies, int) and time_frequencies >= 2):
            raise ValueError(f"time_frequencies must be an integer >= 2, got {time_frequencies!r}")
        self.model = getattr(import_diffusers(), model).from_config(dict(config))
        if "timestep" not in inspect.signature(self.model.forward).parameters:
            raise ValueError(f"{type(self.model).__name__}'s forward takes no timestep: it cannot be a fewstep network")
        self.time_scale = time_scale
        self.num_classes = num_classes  # K: labels 0..K-1, and K for "no label" (the model embeds K + 1)
        self.formulation = formulation
        self.text_input = takes_text(self.model)  # the network contract's text cond (network_info)
        self.schedule_source = schedule  # {"scheduler": class name, "config": ...}, as given
        # `prediction` re-reads the model's output (e.g. a v_prediction student of an epsilon teacher)
        self.schedule = None if schedule is None else TrigFlowSchedule.from_scheduler(
            schedule["scheduler"], schedule["config"], sigma_d, prediction or schedule.get("prediction"))
        self.time_input = time_input
        # sCM's learned loss weight w(t), beside the diffusers model (trained, never exported)
        self.weight_head = AdaptiveWeight() if adaptive_weight else None
        if isinstance(getattr(self.model, "time_proj", None), nn.Embedding):  # e.g. an exported smooth student
            self.model.time_proj = InterpolatedTimestepTable(self.model.time_proj)
        if time_input == "smooth":
            embedding = getattr(self.model, "time_embedding", None)
            dim = getattr(getattr(embedding, "linear_2", None), "out_features", None)
            if not hasattr(self.model, "time_proj") or dim is None:
                raise ValueError(f"time_input 'smooth' replaces a UNet's time_proj and time_embedding; "
                                 f"{model} has none")
            self.model.time_proj = SmoothTimeFeatures(time_frequencies)
            self.model.time_embedding = SmoothTimeEmbedding(time_frequencies, dim)

    def _model(self, x: torch.Tensor, timestep: torch.Tensor, labels: torch.Tensor | None, text=None,
               text_mask=None) -> torch.Tensor:
        if labels is None and self.num_classes:  # the contract's "no label" is class K
            labels = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
        kwargs = self._text_kwargs(x, text, text_mask)  # {} without text; a one-line error for text it cannot take
        if labels is not None:
            kwargs["class_labels"] = labels
        # the timestep by keyword: it is not the second positional parameter of every model (PixArt's,
        # and so a Transformer2DModel config that diffusers builds as PixArt, takes the text there)
        out = self.model(x, timestep=timestep, **kwargs, return_dict=False)[0]
        if out.shape[1] == 2 * x.shape[1]:  # a learned-variance model (DiT): the first half is the prediction
            out = out[:, :x.shape[1]]
        return out

    def _text_kwargs(self, x: torch.Tensor, text, text_mask) -> dict:
        """The text cond in the model's own keywords (SD's UNet reads no mask, as its pipelines)."""
        name = type(self.model).__name__
        if not self.text_input:
            if text is not None:
                raise ValueError(f"this {name} takes no text: it is not a text-to-image model")
            return {}
        if not (torch.is_tensor(text) and text.ndim == 3 and text.shape[0] == x.shape[0]):
            raise ValueError(f"this {name} is text-conditioned: pass text= prompt embeddings of shape (B, L, D) with "
                             f"B = {x.shape[0]}, got {tuple(text.shape) if torch.is_tensor(text) else text!r}")
        if name == "UNet2DConditionModel":
            return {"encoder_hidden_states": text}
        return {"encoder_hidden_states": text, "encoder_attention_mask": text_mask,
                "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None, text=None,
                text_mask=None) -> torch.Tensor:
        t_trig = t
        if self.schedule is not None and self.formulation == "edm":  # t is c_noise = ln(sigma) / 4, sigma = sigma_d tan(t)
            t_trig = torch.atan(torch.exp(4 * t) / self.schedule.sigma_d)

        def model(xm, k):  # a smooth time input reads TrigFlow time, not the schedule's timestep
            return self._model(xm, t_trig if self.time_input == "smooth" else k, labels, text, text_mask)

        if self.schedule is None:
            return model(x, t * self.time_scale)
        sign = -1 if self.formulation == "edm" else 1
        return sign * self.schedule.velocity(model, x, t_trig)

    def adaptive_weight(self, t: torch.Tensor) -> torch.Tensor | None:
        """`w_phi(t)` (docs/math.md#adaptive-weighting), or None without `adaptive_weight=True`."""
        return None if self.weight_head is None else self.weight_head(t)

    def timestep(self, t: torch.Tensor) -> torch.Tensor:
        """The model's timestep input at TrigFlow time t (B,), as `forward` gives it."""
        if self.schedule is None:
            return t * self.time_scale
        return self.schedule.model_inputs(torch.zeros(t.shape[0], 1, dtype=t.dtype, device=t.device), t)[1]

    def load_teacher(self, teacher: "DiffusersNetwork", grid: int = 4097) -> dict:
        """Take a teacher's weights (the same diffusers model). With the teacher's time input the
        student is the teacher, exactly. With a smooth one in place of the teacher's own (or of a smooth
        one with another `time_frequencies`), every weight but the time embedding is copied, and the
        embedding's linear map is the least-squares fit of the teacher's embedding over `grid` TrigFlow
        times in [0, pi/2]. Returns the fit's relative RMS error."""
        from fewstep.networks.convert import copy_teacher_weights

        if self.time_input == teacher.time_input and (
                self.time_input == "schedule" or len(self.model.time_proj.freqs) == len(teacher.model.time_proj.freqs)):
            copy_teacher_weights(self, teacher)  # the teacher, or a student fine-tuned further (rCM after sCD)
            return {}
        if self.time_input == "schedule":
            raise ValueError("network.time_input=schedule cannot start from a network with a smooth time input: "
                             "keep network.time_input=smooth")
        copy_teacher_weights(self, teacher, own=("model.time_proj.", "model.time_embedding."))
        p = next(teacher.parameters())
        t = torch.linspace(0, torch.pi / 2, grid, dtype=torch.float64, device=p.device)
        with torch.no_grad():
            k = t if teacher.time_input == "smooth" else teacher.timestep(t).to(p.dtype)
            target = teacher.model.time_embedding(teacher.model.time_proj(k).to(p.dtype)).double()
            features = self.model.time_proj(t)
            weight = torch.linalg.lstsq(features, target).solution  # (n, dim); f = 0 is the constant
            linear = self.model.time_embedding.linear
            linear.weight.copy_(weight.T)
            linear.bias.zero_()
            err = (features @ weight - target).square().mean().sqrt() / target.square().mean().sqrt().clamp_min(1e-12)
        return {"time_embedding_fit_error": float(err)}
