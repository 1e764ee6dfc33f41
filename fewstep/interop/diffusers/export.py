"""Export a consistency student in a diffusers architecture as a diffusers pipeline folder.

    fewstep export runs/scd --out ddpm-scd-1step
    pipe = diffusers.DDPMPipeline.from_pretrained("ddpm-scd-1step")
    images = pipe(batch_size=16, num_inference_steps=1).images      # or 2 steps

Why this is exact: an sCT/sCD student built on a diffusers model keeps the model's own time input
and output (`networks.noise_schedules`), and with that conversion its TrigFlow consistency function
`cos(t) x_t - sin(t) sigma_d F` is exactly the model's x0 estimate at the noise level of t. That is
what diffusers' `LCMScheduler` computes at each step, from the same epsilon / v / sample prediction
and the same `alphas_cumprod`; it then re-noises to the next timestep, which is multistep
consistency sampling (docs/math.md#multistep-consistency-sampling). LCM's boundary-condition mix `c_skip x + c_out x0` is made
negligible (`timestep_scaling` = 1000: `c_skip < 1e-9` at every timestep LCM visits), so diffusers'
pipeline and fewstep agree to float rounding (tests/test_diffusers_pipeline.py).

The folder keeps `fewstep.json` (method, data, training step) beside diffusers' files, so that
`fewstep sample`/`eval` read it as the consistency model it is. A text-to-image student on SD's
`UNet2DConditionModel` is written as a `StableDiffusionPipeline` (its VAE, tokenizer, text encoder,
the student's UNet and the `LCMScheduler`), one on a `PixArtTransformer2DModel` as a
`PixArtAlphaPipeline` (as PixArt-LCM), sampled without CFG: the guidance is distilled into them.
A smooth time input (`network.time_input=smooth`) is written as diffusers' learned time
embedding, a row per timestep (`with_timestep_table`). A LoRA student (`network.lora_rank`)
exports only its adapter, for diffusers' LoRA loaders, on top of the teacher they already have.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

LCM_TIMESTEP_SCALING = 1000.0
# text-to-image students' models -> the pipeline they are exported as
TEXT_PIPELINES = {"UNet2DConditionModel": "StableDiffusionPipeline", "PixArtTransformer2DModel": "PixArtAlphaPipeline"}
VP_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
           "rescale_betas_zero_snr")


def export_diffusers(model, out: str | Path) -> Path:
    """Write `model` (a `fewstep.apps.generate.Model` of an sCT/sCD student on a diffusers `UNet2DModel`
    with a VP schedule) as a `DDPMPipeline` folder with an `LCMScheduler`; a LoRA student as its adapter
    (`export_lora`)."""
    from fewstep.interop.diffusers.network import import_diffusers
    from fewstep.networks.lora import LoRANetwork
    from fewstep.networks.registry import unwrap

    if isinstance(unwrap(model.net), LoRANetwork):
        return export_lora(model, out)
    net = _consistency_student(model, unwrap(model.net))
    if type(net.model).__name__ in TEXT_PIPELINES:
        return export_text_to_image(model, net, out)
    if type(net.model).__name__ != "UNet2DModel":
        raise ValueError(f"export writes UNet2DModel students (DDPMPipeline), UNet2DConditionModel students "
                         f"(StableDiffusionPipeline) and PixArtTransformer2DModel students (PixArtAlphaPipeline); "
                         f"got {type(net.model).__name__}")
    if net.num_classes:
        raise ValueError("export writes unconditional students: DDPMPipeline takes no class labels")
    if model.latents:
        raise ValueError("export writes pixel-space students: DDPMPipeline has no VAE")
    diffusers = import_diffusers()
    out = Path(out)
    unet = net.model if net.time_input == "schedule" else with_timestep_table(net)
    diffusers.DDPMPipeline(unet=unet, scheduler=lcm_scheduler(net)).save_pretrained(out, safe_serialization=True)
    _write_record(model, out)
    return out


def export_text_to_image(model, net, out: str | Path) -> Path:
    """A text-to-image student as its pipeline folder (`TEXT_PIPELINES`: SD's `UNet2DConditionModel` as
    a `StableDiffusionPipeline`, a `PixArtTransformer2DModel` as a `PixArtAlphaPipeline`) with an
    `LCMScheduler`, beside the run's VAE, tokenizer and text encoder. Sample it without CFG
    (`guidance_scale=1`): the teacher's guidance is distilled into the student."""
    from fewstep.interop.diffusers.latents import load_vae
    from fewstep.interop.diffusers.network import import_diffusers

    if not model.latents:
        raise ValueError("export of a text-to-image student needs its VAE: train it in latents (data.vae)")
    encoder = model.prompt_encoder()
    out = Path(out)
    parts = dict(vae=load_vae(model.latents["vae"]), text_encoder=encoder.model, tokenizer=encoder.tokenizer,
                 scheduler=lcm_scheduler(net))
    if type(net.model).__name__ == "UNet2DConditionModel":
        pipe = import_diffusers().StableDiffusionPipeline(unet=net.model, safety_checker=None, feature_extractor=None,
                                                         requires_safety_checker=False, **parts)
    else:
        pipe = import_diffusers().PixArtAlphaPipeline(transformer=net.model, **parts)
    pipe.save_pretrained(out, safe_serialization=True)
    # The folder is its own text encoder and VAE when fewstep reads it back.
    data = {**(model.config.get("data") or {}), "text_encoder": str(out.resolve()),
            "latents": {**model.latents, "vae": str(out.resolve())}}
    _write_record(model, out, data=data)
    return out


def export_lora(model, out: str | Path) -> Path:
    """Write a LoRA student's adapter (`fewstep.networks.lora`) where diffusers' LoRA loaders read it:
    `out/pytorch_lora_weights.safetensors` (peft's adapter state, keyed by the diffusers model's module
    names, prefixed `unet.` or `transformer.`), with the `LCMScheduler` that samples it
    (`out/scheduler_config.json`)."""
    from safetensors.torch import save_file

    from fewstep.networks.registry import unwrap

    lora = unwrap(model.net)
    net = _consistency_student(model, lora.base)
    state = lora.adapter_state_dict()
    # The loaders take alpha = rank when no alphas are given: fold peft's scale alpha / rank into B.
    scale = lora.alpha / lora.rank
    state = {k: (v * scale if "lora_B" in k else v) for k, v in state.items()}
    name = type(net.model).__name__
    prefix = "unet" if name.startswith("UNet") else "transformer"
    # peft's key layout (`lora_A` / `lora_B`), which the loaders read as it is. Not diffusers' older
    # `lora.down` layout: `convert_state_dict_to_diffusers` renames the attention keys but not the
    # convolutions', and a loader that sees a mixed file converts by its first key and drops the rest.
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({f"{prefix}.{k}": v.detach().contiguous() for k, v in state.items()},
              str(out / "pytorch_lora_weights.safetensors"), metadata={"format": "pt"})
    lcm_scheduler(net).save_config(out)
    _write_record(model, out, lora={"rank": lora.rank, "alpha": lora.alpha, "targets": lora.targets, "model": name})
    return out


def _consistency_student(model, net):
    """`net` if it is a TrigFlow consistency student on a diffusers model with a VP schedule."""
    from fewstep.core.samplers import TrigFlowConsistencySampler
    from fewstep.interop.diffusers.network import DiffusersNetwork

    if not isinstance(net, DiffusersNetwork) or net.schedule is None:
        raise ValueError("export needs a student on a diffusers model with its schedule (distilled from a diffusers "
                         "teacher); this checkpoint's network is fewstep's own")
    if net.time_input != "schedule" and type(net.model).__name__ != "UNet2DModel":
        raise ValueError(f"export writes a smooth time input (network.time_input=smooth) only for UNet2DModel "
                         f"students, as a table of timesteps; this one is a {type(net.model).__name__}")
    if net.schedule.kind != "vp":
        raise ValueError("export writes VP (DDPM/DDIM-schedule) students; this student has a rectified-flow "
                         "schedule, which no diffusers UNet pipeline samples")
    if not isinstance(model.sampler, TrigFlowConsistencySampler):
        raise ValueError(f"export writes TrigFlow consistency models (sct, scd, ect, dmd2, rcm), whose consistency function is the "
                         f"model's x0 estimate; this checkpoint was trained with {model.method_name!r}")
    return net


def _silu_inverse(y: torch.Tensor) -> torch.Tensor:
    """u >= 0 with u sigmoid(u) = y, for y in [0, 1] (Newton from u = 2y; SiLU is monotone there)."""
    u = 2 * y
    for _ in range(50):
        sig = torch.sigmoid(u)
        u = u - (u * sig - y) / (sig * (1 + u * (1 - sig)))
    return u


def with_timestep_table(net):
    """A smooth-time `UNet2DModel` student as diffusers' own `UNet2DModel` with a learned time embedding
    (a row per integer timestep, `time_embedding_type="learned"`), equal to the student at every
    timestep LCM visits: row k holds SiLU^-1((cos(2 f t_k) + 1) / 4) in its first n channels, with t_k
    the TrigFlow time of timestep k (pi/2 for the last); `linear_1` passes those channels through the SiLU, and `linear_2`
    maps them back to the student's `W cos(2 f t) + b`. Exact to float rounding (docs/math.md#smooth-time-input)."""
    from fewstep.interop.diffusers.network import import_diffusers
    from fewstep.networks.convert import copy_teacher_weights

    model, schedule = net.model, net.schedule
    n = model.time_embedding.linear.in_features
    width = model.config["block_out_channels"][0]
    if model.config.get("class_embed_type") == "timestep":
        raise ValueError("export cannot write a smooth time input for a UNet2DModel that embeds classes as timesteps")
    if n > width:
        raise ValueError(f"export writes a smooth time input of at most {width} cosines for this UNet2DModel "
                         f"(block_out_channels[0]); this one has network.time_frequencies={n}")
    config = {**dict(model.config), "time_embedding_type": "learned", "num_train_timesteps": len(schedule.log_snr)}
    table_model = import_diffusers().UNet2DModel.from_config(config).to(next(model.parameters()).dtype)
    copy_teacher_weights(table_model, model, own=("time_proj.", "time_embedding."))  # all but the time input
    t = schedule.trigflow_time(torch.arange(len(schedule.log_snr), dtype=torch.float64))
    t[-1] = math.pi / 2  # the model's inputs clamp every t beyond it to the last timestep: LCM's first step is t = pi/2
    phi = model.time_proj(t.to(model.time_embedding.linear.weight.device)).cpu()  # (T, n), float64
    linear = model.time_embedding.linear
    w, b = linear.weight.detach().double().cpu(), linear.bias.detach().double().cpu()
    with torch.no_grad():
        table = torch.zeros(len(t), width, dtype=torch.float64)
        table[:, :n] = _silu_inverse((phi + 1) / 4)
        emb = table_model.time_embedding
        emb.linear_1.weight.zero_()
        emb.linear_1.weight[:n, :n] = torch.eye(n)
        emb.linear_1.bias.zero_()
        emb.linear_2.weight.zero_()
        emb.linear_2.weight[:, :n] = 4 * w
        emb.linear_2.bias.copy_(b - w.sum(1))  # W phi + b with phi = 4 h - 1
        table_model.time_proj.weight.copy_(table)
    return table_model


def lcm_scheduler(net):
    """The `LCMScheduler` that samples the student `net` (module docstring: why it is exact)."""
    from fewstep.interop.diffusers.network import import_diffusers

    sched_cfg = {k: v for k, v in net.schedule_source["config"].items() if k in VP_KEYS}
    sched_cfg.update(prediction_type=net.schedule.prediction, clip_sample=False, thresholding=False,
                     set_alpha_to_one=True, timestep_scaling=LCM_TIMESTEP_SCALING)
    return import_diffusers().LCMScheduler.from_config(sched_cfg)


def _write_record(model, out: Path, **extra) -> None:
    from fewstep.methods.base import method_config

    record = {"method": method_config(model.method), "data": model.config.get("data") or {}, "step": model.step,
              "weights": model.weights, "exported_from": str(model.checkpoint) if model.checkpoint else None}
    record.update(extra)
    (out / "fewstep.json").write_text(json.dumps(record, indent=1))
