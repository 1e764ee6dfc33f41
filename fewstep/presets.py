"""Named starting points for `fewstep train --preset NAME`; flags and `--set` override them."""

from __future__ import annotations

# The default demo: sCT on scikit-learn's 8x8 digits, sized to train in under 10 minutes on 2 CPU
# cores. Tangent normalization 'l2' (the paper's) beat 'rms' clearly here (docs/results.md).
DIGITS = {
    "data": {"name": "digits"},
    "network": {"model_channels": 32, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [4],
                "dropout": 0.0},
    "method": {"name": "sct"},
    "optim": {"lr": 2e-3, "warmup_steps": 100, "schedule": "cosine"},
    "train": {"steps": 4000, "batch_size": 64, "sample_every": 1000, "ckpt_every": 1000, "num_samples": 100},
}

TOY = {
    "network": {"width": 128, "depth": 3},
    "method": {"name": "sct"},
    "optim": {"lr": 2e-3, "warmup_steps": 100},
    "train": {"steps": 3000, "batch_size": 512, "sample_every": 1000, "ckpt_every": 1000},
}

TOY_NAMES = ("8gaussians", "checkerboard", "moons", "swissroll", "gaussian")

PRESETS = {"digits": DIGITS, **{name: {**TOY, "data": {"name": name}} for name in TOY_NAMES}}

# What a preset changes when another method is chosen (`--method`): distillation fine-tunes a
# trained teacher, so it wants a much smaller learning rate than training from scratch. On the
# digits, sCD at lr 5e-5 came within 10% of the teacher's FID in 2,000 steps; at 1e-3 it fell
# apart (noisy samples, FID 68 -> 80; docs/results.md).
METHOD_OVERRIDES = {
    "digits": {"scd": {"optim": {"lr": 5e-5}, "method": {"warmup_steps": 500}, "train": {"steps": 2000}}},
    **{name: {"scd": {"optim": {"lr": 5e-4}, "method": {"warmup_steps": 100}}} for name in TOY_NAMES},
}


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
