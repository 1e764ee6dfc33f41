"""Train a config (what `fewstep train` runs): `fit` over the objects `fewstep.training.build.build`
makes, with sample previews and loss curves, after an optional flow-matching stage."""

from __future__ import annotations

from pathlib import Path

from fewstep.apps.callbacks import LossCurves, SamplePreviews
from fewstep.config import Config
from fewstep.training.build import after_pretrain_config, build, pretrain_config
from fewstep.training.distributed import main_process
from fewstep.training.fit import fit
from fewstep.training.registries import validate_against_registries


def train(cfg: Config, out_dir: str | Path) -> dict:
    """Train `cfg` into `out_dir`: `fit` over what `build(cfg)` makes. Resumes from the latest
    checkpoint in `out_dir` when `train.resume`. With `train.pretrain_steps`, a flow-matching run
    is trained first into `<out_dir>/pretrain` (resumed, or skipped once finished) and becomes the
    teacher (sCD, ECT, CD, PD) or the starting weights (sCT, MeanFlow, ...)."""
    if cfg.train.pretrain_steps:
        validate_against_registries(cfg.validate())  # the whole run's mistakes before stage 1, not after it
        pre_dir = Path(out_dir) / "pretrain"
        if main_process():
            print(f"stage 1: flow matching, {cfg.train.pretrain_steps} steps -> {pre_dir}")
        train(pretrain_config(cfg), pre_dir)
        cfg = after_pretrain_config(cfg, pre_dir)
        if main_process():
            print(f"stage 2: {cfg.method['name']} from the flow model, {cfg.train.steps} steps -> {out_dir}")
    built = build(cfg, out_dir)
    tc = built.config.train
    previews = [SamplePreviews(tc.sample_every, tc.num_samples, tc.sample_times, built.data), LossCurves()]
    return fit(*built, out_dir, **{**built.options, "callbacks": [*previews, *built.options["callbacks"]]})
