"""The `fewstep` command line: `fewstep train`, `sample`, `eval`, `ref-stats`, `plot`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

TRAIN_EXAMPLES = """examples:
  fewstep train                                   # the default demo: sCT on the 8x8 digits
  fewstep train --preset 8gaussians --out runs/8g --steps 2000
  fewstep train --config my.toml --set method.tangent_norm=rms --set train.precision=bf16
  fewstep train --data path/to/images --set data.resolution=32 --set network.attn_resolutions=[16]
  fewstep train --preset 8gaussians --method flow --out runs/teacher            # a diffusion teacher
  fewstep train --preset 8gaussians --method scd --teacher runs/teacher --out runs/scd
  fewstep train --preset 8gaussians --method ict --out runs/ict                   # improved CT (discrete time)

A config file (JSON or TOML) has the sections data, network, method, optim, train;
`--set section.key=value` overrides one key (values are read as JSON: 3, 1e-3, true, [1,2]).
Presets: {presets}. Training resumes from the latest checkpoint in --out.
"""

SAMPLE_EXAMPLES = """examples:
  fewstep sample runs/digits                       # 2 steps (t = pi/2, 1.1), 64 samples -> runs/digits/samples.png
  fewstep sample runs/digits --steps 1 --num 256 --out one_step.png --npz one_step.npz
  fewstep sample runs/digits/checkpoints/ckpt-0003000.json --times 1.5708,1.1,0.6
  fewstep sample runs/teacher --sampler heun --steps 18 --label 3 --guidance 2   # a diffusion model, 35 NFE
"""


def _train_parser(sub):
    from fewstep.presets import PRESETS

    p = sub.add_parser("train", help="train a model (default: sCT on the embedded digits)",
                       description="Train a consistency model (or a TrigFlow flow-matching model).",
                       epilog=TRAIN_EXAMPLES.format(presets=", ".join(PRESETS)),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, help="starting config (default: digits, or none with --config)")
    p.add_argument("--config", default=None, help="a JSON or TOML config file, applied over the preset")
    p.add_argument("--out", default=None, help="run folder (default: runs/<preset or data name>)")
    p.add_argument("--data", default=None, help="dataset name or path (data.name)")
    p.add_argument("--method", default=None, help="training objective (method.name): sct, scd (continuous-time "
                   "CMs), flow, edm (diffusion), cd, ct, ict (discrete-time CMs)")
    p.add_argument("--steps", type=int, default=None, help="training steps (train.steps)")
    p.add_argument("--batch-size", type=int, default=None, help="train.batch_size")
    p.add_argument("--lr", type=float, default=None, help="optim.lr")
    p.add_argument("--device", default=None, help="train.device: auto, cpu, cuda, cuda:N")
    p.add_argument("--precision", default=None, help="train.precision: fp32, bf16, fp16")
    p.add_argument("--seed", type=int, default=None, help="train.seed")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override one key")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--fresh", action="store_true", help="do not resume; fails if --out has checkpoints")
    p.add_argument("--teacher", default=None, help="sCD / CD: the diffusion teacher's checkpoint (train.teacher)")
    return p


def _sample_parser(sub):
    p = sub.add_parser("sample", help="sample from a checkpoint to a PNG grid and .npz",
                       description="Sample from a trained consistency model (EMA weights by default).",
                       epilog=SAMPLE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a run folder, its checkpoints/ folder, or a ckpt-*.json file")
    p.add_argument("--steps", type=int, default=None,
                   help="consistency models: 1 (t = pi/2) or 2 (pi/2, 1.1; the default) or more; "
                        "diffusion models: ODE solver steps (default 18)")
    p.add_argument("--times", default=None, help="consistency models: comma-separated decreasing times in (0, pi/2]")
    p.add_argument("--sampler", default=None, help="diffusion models: heun (default), euler, dpmpp_2m")
    p.add_argument("--guidance", type=float, default=1.0,
                   help="classifier-free guidance scale (class-conditional diffusion models, and sCD students "
                        "distilled with method.guidance_range; 1 = none)")
    p.add_argument("--num", type=int, default=64, help="number of samples (default 64)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--label", type=int, default=None, help="class label for a class-conditional model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-ema", action="store_true", help="use the raw training weights, not the EMA")
    p.add_argument("--out", default=None, help="PNG path (default: <run>/samples.png)")
    p.add_argument("--npz", default=None, help="also write the samples as .npz (key 'x', and 'labels')")
    return p


def build_train_config(args):
    from fewstep.config import apply_overrides, config_from_dict, load_config_file, merge
    from fewstep.presets import preset_config

    preset = args.preset or (None if args.config else "digits")
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
    data = apply_overrides(data, args.set)
    cfg = config_from_dict(data)
    out = Path(args.out or f"runs/{preset or Path(cfg.data.name).stem}")
    return cfg, out


def cmd_train(args) -> int:
    from fewstep.checkpoint import list_checkpoints
    from fewstep.train import train

    cfg, out = build_train_config(args)
    if args.fresh:
        if list_checkpoints(out / "checkpoints"):
            raise ValueError(f"--fresh given but {out / 'checkpoints'} already holds checkpoints; "
                             f"choose another --out or delete them")
        cfg.train.resume = False
    main_process = int(os.environ.get("RANK", "0")) == 0  # under torchrun, process 0 reports
    if main_process:
        print(f"fewstep train: method={cfg.method['name']} data={cfg.data.name} steps={cfg.train.steps} -> {out}")
    summary = train(cfg, out)
    if main_process:
        print(json.dumps({k: summary[k] for k in ("steps", "samples", "metrics") if k in summary}, indent=1))
        print(f"done: samples in {out / 'samples'}, checkpoint in {out / 'checkpoints'}, log in {out / 'log.jsonl'}")
    return 0


def cmd_sample(args) -> int:
    import numpy as np
    import torch

    from fewstep.generate import Schedule, cm_times, generate, load_model, parse_times, schedules
    from fewstep.image import save_image_grid, save_scatter
    from fewstep.train import resolve_device

    if args.num < 1:
        raise ValueError(f"--num must be >= 1, got {args.num}")
    model = load_model(args.checkpoint, resolve_device(args.device), ema=not args.no_ema)
    if model.is_consistency:
        if args.sampler not in (None, "multistep"):
            raise ValueError(f"{model.method!r} is a consistency model: it samples with its own multistep "
                             f"sampler; --sampler is for diffusion checkpoints (flow, edm)")
        times = parse_times(args.times) if args.times is not None else cm_times(args.steps or 2)
        schedule = Schedule("multistep", len(times), tuple(times))
    else:
        if args.times is not None:
            raise ValueError("--times is for consistency models; use --steps and --sampler for diffusion models")
        schedule = schedules(model.method, [args.steps] if args.steps else None,
                             samplers=[args.sampler] if args.sampler else None, default_steps=model.default_steps)[0]
    labels = None
    if model.num_classes:
        if args.label is not None and not 0 <= args.label < model.num_classes:
            raise ValueError(f"--label must be in [0, {model.num_classes}), got {args.label}")
        labels = torch.full((args.num,), args.label) if args.label is not None else None
    elif args.label is not None:
        raise ValueError("--label needs a class-conditional checkpoint (network.class_conditional=true)")
    x, nfe, seconds = generate(model, schedule, args.num, args.batch_size, args.seed, args.guidance,
                               progress=True, labels=labels)
    out = Path(args.out or model.run_dir / "samples.png")
    if model.kind == "image":
        save_image_grid(x, out)
    else:
        save_scatter({f"{schedule.sampler}, NFE {nfe}": x}, out)
    if args.npz:
        Path(args.npz).parent.mkdir(parents=True, exist_ok=True)
        np.savez(args.npz, x=x.numpy(), nfe=nfe, **schedule.to_dict())
    print(f"wrote {args.num} samples ({model.method}, {schedule.sampler}, NFE {nfe}, {seconds:.2f}s) to {out}"
          + (f" and {args.npz}" if args.npz else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fewstep", description="Consistency models: train, sample, evaluate.")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub).set_defaults(func=cmd_train)
    _sample_parser(sub).set_defaults(func=cmd_sample)
    from fewstep.evaluate import add_commands

    add_commands(sub)  # eval, ref-stats, search-times, plot
    from fewstep.edit_cli import add_edit_command

    add_edit_command(sub)
    args = parser.parse_args(argv)
    from fewstep.train import NonFiniteLossError

    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, NonFiniteLossError) as e:
        # User errors (bad config, path, shape; non-finite training) as one line, no traceback;
        # FEWSTEP_DEBUG=1 shows the traceback.
        if os.environ.get("FEWSTEP_DEBUG"):
            raise
        print(f"fewstep {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
