"""Named starting points for `fewstep train --preset NAME`; flags and `--set` override them."""

from __future__ import annotations

import math

# The default demo: MeanFlow on scikit-learn's 8x8 digits, the best of five recipes compared at equal
# wall clock (8 minutes of training steps on 2 CPU cores; docs/results.md, benchmarks/demo_recipes.py):
# its 2-step FID (N = 1,000) was within 25% of a flow model's 35-NFE FID trained as long.
_DIGITS_NETWORK = {"model_channels": 32, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [4],
                   "dropout": 0.0}
_DIGITS_TRAIN = {"batch_size": 64, "sample_every": 1000, "ckpt_every": 1000, "num_samples": 100}
DIGITS = {
    "data": {"name": "digits"},
    "network": _DIGITS_NETWORK,
    "method": {"name": "meanflow"},
    "optim": {"lr": 2e-3, "warmup_steps": 100, "schedule": "cosine"},
    "train": {"steps": 5800, **_DIGITS_TRAIN},
}

# The other recipes of that comparison, each sized to the same 8 minutes (steps from the measured
# seconds per step): sCT from scratch, flow matching alone (the 35-NFE reference), and flow
# matching for half the budget followed by ECT or sCD from it (`train.pretrain_steps`: one command).
DIGITS_RECIPES = {
    "digits-sct": {**DIGITS, "method": {"name": "sct"}, "train": {"steps": 6200, **_DIGITS_TRAIN}},
    "digits-flow": {**DIGITS, "method": {"name": "flow"}, "train": {"steps": 8300, **_DIGITS_TRAIN}},
    "digits-ect": {**DIGITS, "method": {"name": "ect"}, "optim": {**DIGITS["optim"], "lr": 1e-4},
                   "train": {"steps": 3750, "pretrain_steps": 4190, "pretrain_lr": 2e-3, **_DIGITS_TRAIN}},
    "digits-scd": {**DIGITS, "method": {"name": "scd", "warmup_steps": 500}, "optim": {**DIGITS["optim"], "lr": 5e-5},
                   "train": {"steps": 2840, "pretrain_steps": 4190, "pretrain_lr": 2e-3, **_DIGITS_TRAIN}},
}

TOY = {
    "network": {"width": 128, "depth": 3},
    "method": {"name": "sct"},
    "optim": {"lr": 2e-3, "warmup_steps": 100},
    "train": {"steps": 3000, "batch_size": 512, "sample_every": 1000, "ckpt_every": 1000},
}

TOY_NAMES = ("8gaussians", "checkerboard", "moons", "swissroll", "gaussian")

# ------------------------------------------------------------------------------------------------
# The papers' recipes (docs/reproduce.md). `train.batch_size` is per process: the values below are the
# papers' global batches over 8 GPUs. Sources: the sCM paper (Lu & Song, ICLR 2025, arXiv 2410.11081),
# Appendix G; ECT's `run_ecm_1hour.sh` (locuslab/ect); EDM2's `train_edm2.py` presets (NVlabs/edm2).
# Values the papers leave unstated are marked "assumed".

GPUS = 8  # the torchrun commands of docs/reproduce.md

# sCM, Appendix G: RAdam, lr 1e-4, betas (0.9, 0.99), eps 1e-8, no learning-rate schedule (CIFAR-10).
_SCM_RADAM = {"name": "radam", "lr": 1e-4, "betas": [0.9, 0.99], "eps": 1e-8, "schedule": "constant", "warmup_steps": 0}
# sCM, Appendix G, shared: c = 0.1, tangent warmup over 10k iterations, sampling from t_max = arctan(80 / sigma_d),
# 2-step t_mid = 1.1 (fewstep's default second time).
_SCM_SHARED = {"norm_const": 0.1, "warmup_steps": 10_000, "sigma_max": 80.0}
# sCM, Appendix G: CIFAR-10's DDPM++ in TrigFlow: c_noise(t) = t, positional time embedding, adaptive double
# normalization (and the learned adaptive loss weighting of section 4.2).
_SCM_DDPMPP = {"arch": "ddpmpp", "precond": "trigflow", "embedding_type": "positional", "double_norm": True,
               "adaptive_weight": True}
_CIFAR10 = {"name": "cifar-10-python.tar.gz"}  # the python archive; --data PATH where it lives elsewhere
_CIFAR10_TRAIN = {"batch_size": 512 // GPUS,  # assumed: 512 (CM and iCT's CIFAR-10 batch)
                  "ema_decay": 0.9999,  # assumed: CM's CIFAR-10 EMA
                  "sample_every": 10_000, "ckpt_every": 10_000, "keep_ckpts": 3}

# sCM, Appendix G: ImageNet 64x64 on EDM2's network (config G), size S (C = 192) here; the CM optimizer is
# Adam at 0.01x EDM2's lr (0.0100 for img64-s -> 1e-4) with EDM2's betas and inverse-sqrt decay (35k iterations).
_IMAGENET64 = {"name": "imagenet-64x64.zip", "resolution": 64}  # EDM's dataset_tool zip, labels in dataset.json
_EDM2_ADAM = {"name": "adam", "betas": [0.9, 0.99], "eps": 1e-8, "schedule": "inv_sqrt", "warmup_steps": 0}
_IMAGENET_TRAIN = {"steps": 400_000,  # sCM, Appendix G: 400k iterations
                   "batch_size": 2048 // GPUS,  # assumed: EDM2's batch 2048
                   "ema_sigma_rel": 0.05,  # assumed: EDM2's power-function EMA
                   "precision": "bf16", "sample_every": 10_000, "ckpt_every": 10_000, "keep_ckpts": 3}
_EDM2_S = {"arch": "edm2", "size": "s", "precond": "trigflow", "class_conditional": True,
           "dropout": 0.45, "dropout_res": 16}  # sCM, Appendix G: dropout 45% at resolutions <= 16

PAPER_PRESETS = {
    # sCT on CIFAR-10 (sCM, Appendix G and Table 1: FID 2.85 / 2.06 at 1 / 2 steps).
    "cifar10-sct": {
        "data": _CIFAR10,
        "network": {**_SCM_DDPMPP, "dropout": 0.20},  # sCM, Appendix G: sCT dropout 0.20
        "method": {"name": "sct", "p_mean": -1.0, "p_std": 1.4, **_SCM_SHARED},
        "optim": _SCM_RADAM,
        "train": {"steps": 400_000, **_CIFAR10_TRAIN},  # assumed: 400k, ImageNet-64's length
    },
    # sCD on CIFAR-10 from a TrigFlow DDPM++ teacher (--teacher; sCM Table 1: FID 3.66 / 2.52). The student is
    # initialized from the teacher's weights (train.init_from_teacher) with the teacher's architecture.
    "cifar10-scd": {
        "data": _CIFAR10,
        "method": {"name": "scd", "p_mean": -1.0, "p_std": 1.4, **_SCM_SHARED},  # sCM, Appendix G: CIFAR-10's (P_mean, P_std)
        "optim": _SCM_RADAM,
        "train": {"steps": 200_000, **_CIFAR10_TRAIN},  # assumed: 200k, ImageNet-512's sCD length
    },
    # ECT's 1 A100-hour recipe (`run_ecm_1hour.sh`): EDM's `edm-cifar10-32x32-uncond-vp.pkl` tuned with batch 128,
    # RAdam lr 1e-4 (betas 0.9 / 0.999), dropout 0.2, no augmentation, q = 256 in one stage, k = 8, b = 1, c = 0,
    # (P_mean, P_std) = (-1.1, 2.0), the sigmoid mapping, EMA 0.9993, fp32; its first evaluation at 1.024 Mimg
    # (8k iterations) is about one A100-hour: 2-step FID 2.73 with t_mid = 0.821 (sigma), TrigFlow 1.024.
    "cifar10-ecm-1h": {
        "data": _CIFAR10,
        "network": {"arch": "ddpmpp", "dropout": 0.2},  # the student's own dropout over the teacher's architecture
        "method": {"name": "ect", "p_mean": -1.1, "p_std": 2.0, "q": 256.0, "k": 8.0, "b": 1.0, "stages": 1,
                   "mapping": "sigmoid", "metric": "pseudo_huber", "huber_c": 0.0, "weighting": "inv_dt",
                   "sigma_max": 80.0},
        "optim": {"name": "radam", "lr": 1e-4, "betas": [0.9, 0.999], "eps": 1e-8, "schedule": "constant",
                  "warmup_steps": 0},
        "train": {"steps": 8000, "batch_size": 128 // GPUS, "ema_decay": 0.9993, "precision": "fp32",
                  "sample_times": [math.pi / 2, math.atan(0.821 / 0.5)], "sample_every": 2000, "ckpt_every": 2000, "keep_ckpts": 4},
    },
    # sCT on ImageNet 64x64, EDM2-S (sCM, Appendix G; the paper's ImageNet-64 numbers are for XL: sCT 2-step FID 1.48).
    "imagenet64-sct-s": {
        "data": _IMAGENET64,
        "network": _EDM2_S,
        "method": {"name": "sct", "p_mean": -1.0, "p_std": 1.6, **_SCM_SHARED},
        "optim": {**_EDM2_ADAM, "lr": 1e-4, "decay_start": 35_000},
        "train": _IMAGENET_TRAIN,
    },
    # sCD on ImageNet 64x64 from an EDM2-S teacher (--teacher, e.g. EDM2's edm2-img64-s snapshot; XL: 2-step FID 1.66).
    "imagenet64-scd-s": {
        "data": _IMAGENET64,
        "network": {"arch": "edm2", "dropout": 0.45, "dropout_res": 16},  # the teacher's architecture, sCM's dropout
        "method": {"name": "scd", "p_mean": -1.0, "p_std": 1.6, **_SCM_SHARED},
        "optim": {**_EDM2_ADAM, "lr": 1e-4, "decay_start": 35_000},
        "train": _IMAGENET_TRAIN,
    },
    # sCD on ImageNet 512x512 in EDM2-S's latent space (sCM, Appendix G; XXL: 2-step FID 1.88): a class-conditional
    # teacher trained with label dropout 0.1 (--teacher), CFG scale s ~ U[1, 2] given to the student as an input,
    # 200k iterations, latents normalized per channel with the paper's mean and std (then std 0.5 = sigma_d).
    "imagenet512-scd-s": {
        "data": {"name": "imagenet-512x512.zip", "resolution": 512, "vae": "stabilityai/sd-vae-ft-mse",
                 "latent_mean": [1.56, -0.695, 0.483, 0.729], "latent_std": [5.27, 5.91, 4.21, 4.31]},
        "network": {"guidance_input": True, "class_conditional": True},
        "method": {"name": "scd", "p_mean": -0.8, "p_std": 1.6, "sigma_d": 0.5, "guidance_range": [1.0, 2.0],
                   **_SCM_SHARED},
        "optim": {**_EDM2_ADAM, "lr": 1e-4, "decay_start": 70_000},  # 0.01x EDM2's img512-s lr 0.0100
        "train": {**_IMAGENET_TRAIN, "steps": 200_000},
    },
}

# Presets that distill or tune a teacher: `fewstep train` refuses them without --teacher, naming what to give.
TEACHERS = {
    "cifar10-scd": "a TrigFlow DDPM++ diffusion model of CIFAR-10 (a fewstep flow run, or an EDM .pkl snapshot)",
    "cifar10-ecm-1h": "EDM's edm-cifar10-32x32-uncond-vp.pkl",
    "imagenet64-scd-s": "an EDM2-S ImageNet-64 diffusion model (e.g. EDM2's edm2-img64-s .pkl snapshot)",
    "imagenet512-scd-s": "an EDM2-S ImageNet-512 latent diffusion model trained with label dropout 0.1",
}

# What `fewstep train` trains when given neither --preset nor --config (its --help names it from here).
DEFAULT_PRESET = "digits"

PRESETS = {"digits": DIGITS, **DIGITS_RECIPES, **{name: {**TOY, "data": {"name": name}} for name in TOY_NAMES},
           **PAPER_PRESETS}

# What a preset changes when another method is chosen (`--method`): distillation fine-tunes a
# trained teacher, so it wants a much smaller learning rate than training from scratch. On the
# digits, sCD at lr 5e-5 came within 10% of the teacher's FID in 2,000 steps; at 1e-3 it fell
# apart (noisy samples, FID 68 -> 80; docs/results.md).
# DMD2 and rCM fine-tune the teacher's weights too (the generator and the fake score both start from them).
METHOD_OVERRIDES = {
    "digits": {"scd": {"optim": {"lr": 5e-5}, "method": {"warmup_steps": 500}, "train": {"steps": 2000}},
               "dmd2": {"optim": {"lr": 5e-5}, "method": {"fake_lr": 1e-4}, "train": {"steps": 2000}},
               "rcm": {"optim": {"lr": 5e-5}, "method": {"warmup_steps": 500, "dmd_warmup_steps": 100},
                       "train": {"steps": 2000}}},
    **{name: {"scd": {"optim": {"lr": 5e-4}, "method": {"warmup_steps": 100}},
              "dmd2": {"optim": {"lr": 5e-4}, "method": {"fake_lr": 1e-3}},
              "rcm": {"optim": {"lr": 5e-4}, "method": {"warmup_steps": 100, "fake_lr": 1e-3}}} for name in TOY_NAMES},
}


def check_teacher(name: str | None, cfg) -> None:
    """A teacher preset needs `train.teacher` (or `train.init_from`): one line that names what to give."""
    if name not in TEACHERS or cfg.method.get("name") != PRESETS[name]["method"]["name"]:
        return  # another method on the preset's data and network (e.g. --method flow: the teacher itself)
    if not (cfg.train.teacher or cfg.train.init_from or cfg.train.pretrain_steps):
        raise ValueError(f"preset {name!r} starts from a teacher: give --teacher PATH ({TEACHERS[name]})")


def preset_config(name: str, method: str | None = None) -> dict:
    """The preset `name`, adjusted for `method` when it differs from the preset's own."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    data = dict(PRESETS[name])
    if method is not None and method != data.get("method", {}).get("name"):
        data["method"] = {"name": method}  # another method: drop the preset's method fields
        for section, values in METHOD_OVERRIDES.get(name, {}).get(method, {}).items():
            data[section] = {**data.get(section, {}), **values}
    return data
