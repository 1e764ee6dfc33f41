"""`fewstep train`: a config (preset, file, flags, `--set`) -> `fewstep.apps.train.train`."""

from __future__ import annotations

import json
import os
from pathlib import Path

from fewstep.cli.common import add_import, command, count, number

EXAMPLES = """examples:
  fewstep train                                   # the default demo: {default} on the 8x8 digits
  fewstep train --preset 8gaussians --out runs/8g --steps 2000
  fewstep train --config my.toml --set method.tangent_norm=rms --set train.precision=bf16
  fewstep train --data path/to/images --set data.resolution=32 --set network.attn_resolutions=[16]
  fewstep train --preset 8gaussians --method flow --out runs/teacher            # a diffusion teacher
  fewstep train --preset 8gaussians --method scd --teacher runs/teacher --out runs/scd
  fewstep train --preset 8gaussians --method ict --out runs/ict                   # improved CT (discrete time)
  fewstep train --preset 8gaussians --method meanflow --out runs/mf              # MeanFlow (second time input r)
  fewstep train --preset 8gaussians --method ect --teacher runs/teacher --out runs/ect   # ECT from the teacher
  fewstep train --preset 8gaussians --method dmd2 --teacher runs/teacher --out runs/dmd2 # DMD2: 1-step generator + fake score
  fewstep train --method rcm --teacher runs/teacher --set method.dmd_weight=0.5 --out runs/rcm  # sCD + 0.5 x DMD
  fewstep train --method sct --set train.init_from=runs/flow --out runs/tuned   # fine-tune another run's weights
  fewstep train --method scd --teacher path/to/ddpm-pipeline --out runs/scd     # a diffusers teacher (or Hub id)
  fewstep train --data latents.safetensors --out runs/latent                     # VAE latents (fewstep encode)
  fewstep train --import mynets.py --set network.arch=my-net --out runs/mine     # a network of your own

A config file (JSON or TOML) has the sections data, network, method, optim, train;
`--set section.key=value` overrides one key (values are read as JSON: 3, 1e-3, true, [1,2]).
Presets: {presets}. Training resumes from the latest checkpoint in --out.
"""


def add_parser(sub) -> None:
    from fewstep.presets import DEFAULT_PRESET, PRESETS

    default = PRESETS[DEFAULT_PRESET]["method"]["name"]  # named from the preset, so the help cannot drift from it
    p = command(sub, "train", help=f"train a model (default: {default} on the {DEFAULT_PRESET} preset)",
                description="Train a consistency model (or a diffusion model: a teacher, or a baseline).",
                epilog=EXAMPLES.format(presets=", ".join(PRESETS), default=default))
    p.add_argument("--preset", default=None,
                   help=f"starting config (default: {DEFAULT_PRESET}, or none with --config)")
    p.add_argument("--config", default=None, help="a JSON or TOML config file, applied over the preset")
    p.add_argument("--out", default=None, help="run folder (default: runs/<preset or data name>)")
    p.add_argument("--data", default=None, help="dataset name or path (data.name)")
    p.add_argument("--method", default=None, help="training objective (method.name): sct, scd (continuous-time "
                   "CMs), meanflow (average velocity), ect (consistency tuning), dmd2 (distribution "
                   "matching), rcm (sCD + DMD), flow, edm (diffusion), cd, ct, ict "
                   f"(discrete-time CMs), pd (progressive distillation); default: the preset's ({default} for "
                   f"{DEFAULT_PRESET})")
    p.add_argument("--steps", type=count(1), default=None, help="training steps (train.steps)")
    p.add_argument("--batch-size", type=count(1), default=None, help="train.batch_size")
    p.add_argument("--lr", type=number(0, low_open=True), default=None, help="optim.lr")
    p.add_argument("--device", default=None, help="train.device: auto, cpu, cuda, cuda:N")
    p.add_argument("--precision", default=None, help="train.precision: fp32, bf16, fp16")
    p.add_argument("--seed", type=count(0), default=None, help="train.seed")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override one key")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--fresh", action="store_true", help="do not resume; fails if --out has checkpoints")
    p.add_argument("--teacher", default=None, help="sCD / CD / PD / ECT: the diffusion teacher: a fewstep run, a diffusers "
                   "pipeline or model folder, or a Hub id (train.teacher)")
    add_import(p)
    p.set_defaults(func=run)


def build_train_config(args):
    """The run's `Config` (checked against the method and network registries) and run folder from
    the parsed flags: preset, then config file, then flags, then `--set` overrides."""
    from fewstep.config import apply_overrides, config_from_dict, load_config_file, merge
    from fewstep.presets import DEFAULT_PRESET, check_teacher, preset_config

    preset = args.preset or (None if args.config else DEFAULT_PRESET)
    file_data = load_config_file(args.config) if args.config else {}
    method = args.method or file_data.get("method", {}).get("name")
    data = preset_config(preset, method) if preset else {}
    data = merge(data, file_data)
    flags = {("data", "name"): args.data, ("method", "name"): args.method, ("train", "steps"): args.steps,
             ("train", "batch_size"): args.batch_size, ("optim", "lr"): args.lr, ("train", "device"): args.device,
             ("train", "precision"): args.precision, ("train", "seed"): args.seed,
             ("train", "teacher"): args.teacher}
    for (section, key), value in flags.items():
        if value is not None:
            if (section, key) == ("method", "name") and data.get("method", {}).get("name") != value:
                data = {**data, "method": {"name": value}}  # another method: drop the preset's method fields
            data = merge(data, {section: {key: value}})
    if args.no_progress:
        data = merge(data, {"train": {"progress": False}})
    preset_arch = data.get("network", {}).get("arch", "auto")
    data = apply_overrides(data, args.set)
    if data.get("network", {}).get("arch", "auto") != preset_arch:  # another architecture: the preset's own
        user = apply_overrides({}, [o for o in args.set if o.startswith("network.")])  # network fields do not apply
        data = {**data, "network": user.get("network", {})}
    from fewstep.training.registries import validate_against_registries

    cfg = config_from_dict(data)
    check_teacher(preset, cfg)  # before the registries' own check: it names the teacher the preset expects
    cfg = validate_against_registries(cfg)  # every mistake in the config before training starts
    out = Path(args.out or f"runs/{preset or Path(cfg.data.name).stem}")
    return cfg, out


def run(args) -> int:
    from dataclasses import replace

    from fewstep.apps.train import train
    from fewstep.training.checkpoint import list_checkpoints

    cfg, out = build_train_config(args)
    if args.fresh:
        if list_checkpoints(out / "checkpoints"):
            raise ValueError(f"--fresh given but {out / 'checkpoints'} already holds checkpoints; "
                             f"choose another --out or delete them")
        cfg = replace(cfg, train=replace(cfg.train, resume=False))
    main_process = int(os.environ.get("RANK", "0")) == 0  # under torchrun, process 0 reports
    if main_process:
        print(f"fewstep train: method={cfg.method['name']} data={cfg.data.name} steps={cfg.train.steps} -> {out}")
    summary = train(cfg, out)
    if main_process:
        print(json.dumps({k: summary[k] for k in ("steps", "samples", "metrics") if k in summary}, indent=1))
        print(f"done: samples in {out / 'samples'}, checkpoint in {out / 'checkpoints'}, log in {out / 'log.jsonl'}")
    return 0
