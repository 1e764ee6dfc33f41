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
student of an epsilon teacher is better read as `v_prediction`; docs/results.md).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from fewstep.interop.diffusers.schedules import TrigFlowSchedule, import_diffusers
from fewstep.networks.registry import register_network
from fewstep.core.trigflow import SIGMA_D

MODELS = ("UNet2DModel", "DiTTransformer2DModel", "Transformer2DModel", "UNet2DConditionModel",
          "PixArtTransformer2DModel")
# Text-conditioned models: they take the contract's `text` (B, L, D) and `text_mask` (B, L) cond.
TEXT_MODELS = ("UNet2DConditionModel", "PixArtTransformer2DModel")


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
                 prediction: str | None = None):
        super().__init__()
        if model not in MODELS:
            raise ValueError(f"network.model must be one of {', '.join(MODELS)}, got {model!r}")
        if formulation not in ("trigflow", "edm"):
            raise ValueError(f"formulation must be 'trigflow' or 'edm', got {formulation!r}")
        if formulation == "edm" and schedule is None:
            raise ValueError("formulation 'edm' is for diffusers models with their schedule (schedule=...)")
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
        def model(xm, k):
            return self._model(xm, k, labels, text, text_mask)

        if self.schedule is None:
            return model(x, t * self.time_scale)
        if self.formulation == "edm":  # t is c_noise = ln(sigma) / 4, sigma = sigma_d tan(t_trigflow)
            t_trig = torch.atan(torch.exp(4 * t) / self.schedule.sigma_d)
            return -self.schedule.velocity(model, x, t_trig)
        return self.schedule.velocity(model, x, t)
