"""Named starting points for `fewstep train --preset NAME`; flags and `--set` override them."""

from __future__ import annotations

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

# What `fewstep train` trains when given neither --preset nor --config (its --help names it from here).
DEFAULT_PRESET = "digits"

PRESETS = {"digits": DIGITS, **DIGITS_RECIPES, **{name: {**TOY, "data": {"name": name}} for name in TOY_NAMES}}

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
