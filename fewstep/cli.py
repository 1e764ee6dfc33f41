"""The `fewstep` command line: `fewstep train` and `fewstep sample`."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

TRAIN_EXAMPLES = """examples:
  fewstep train                                   # the default demo: sCT on the 8x8 digits
  fewstep train --preset 8gaussians --out runs/8g --steps 2000
  fewstep train --config my.toml --set method.tangent_norm=rms --set train.precision=bf16
  fewstep train --data path/to/images --set data.resolution=32 --set network.attn_resolutions=[16]

A config file (JSON or TOML) has the sections data, network, method, optim, train;
`--set section.key=value` overrides one key (values are read as JSON: 3, 1e-3, true, [1,2]).
Presets: {presets}. Training resumes from the latest checkpoint in --out.
"""

SAMPLE_EXAMPLES = """examples:
  fewstep sample runs/digits                       # 2 steps (t = pi/2, 1.1), 64 samples -> runs/digits/samples.png
  fewstep sample runs/digits --steps 1 --num 256 --out one_step.png --npz one_step.npz
  fewstep sample runs/digits/checkpoints/ckpt-0003000.json --times 1.5708,1.1,0.6 --label 3
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
    p.add_argument("--method", default=None, help="training objective (method.name): sct, flow, ...")
    p.add_argument("--steps", type=int, default=None, help="training steps (train.steps)")
    p.add_argument("--batch-size", type=int, default=None, help="train.batch_size")
    p.add_argument("--lr", type=float, default=None, help="optim.lr")
    p.add_argument("--device", default=None, help="train.device: auto, cpu, cuda, cuda:N")
    p.add_argument("--precision", default=None, help="train.precision: fp32, bf16, fp16")
    p.add_argument("--seed", type=int, default=None, help="train.seed")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override one key")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--fresh", action="store_true", help="do not resume; fails if --out has checkpoints")
    return p


def _sample_parser(sub):
    p = sub.add_parser("sample", help="sample from a checkpoint to a PNG grid and .npz",
                       description="Sample from a trained consistency model (EMA weights by default).",
                       epilog=SAMPLE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a run folder, its checkpoints/ folder, or a ckpt-*.json file")
    p.add_argument("--steps", type=int, default=None, help="1 (t = pi/2) or 2 (pi/2, 1.1); default 2")
    p.add_argument("--times", default=None, help="comma-separated decreasing times in (0, pi/2]")
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
    from fewstep.presets import PRESETS

    preset = args.preset or (None if args.config else "digits")
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    data = dict(PRESETS[preset]) if preset else {}
    if args.config:
        data = merge(data, load_config_file(args.config))
    flags = {("data", "name"): args.data, ("method", "name"): args.method, ("train", "steps"): args.steps,
             ("train", "batch_size"): args.batch_size, ("optim", "lr"): args.lr, ("train", "device"): args.device,
             ("train", "precision"): args.precision, ("train", "seed"): args.seed}
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
    print(f"fewstep train: method={cfg.method['name']} data={cfg.data.name} steps={cfg.train.steps} -> {out}")
    summary = train(cfg, out)
    print(json.dumps({k: summary[k] for k in ("steps", "samples", "metrics") if k in summary}, indent=1))
    print(f"done: samples in {out / 'samples'}, checkpoint in {out / 'checkpoints'}, log in {out / 'log.jsonl'}")
    return 0


def cmd_sample(args) -> int:
    import numpy as np
    import torch

    from fewstep.checkpoint import load_checkpoint, resolve_checkpoint, unprefixed
    from fewstep.config import config_from_dict, validate_times
    from fewstep.image import save_image_grid, save_scatter
    from fewstep.networks import build_network
    from fewstep.samplers import TWO_STEP_TIMES, sample_trigflow_cm
    from fewstep.train import resolve_device

    if args.times is not None:
        try:
            times = [float(v) for v in args.times.split(",")]
        except ValueError:
            raise ValueError(f"--times must be comma-separated numbers, got {args.times!r}") from None
    elif args.steps is not None:
        if args.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {args.steps}")
        # 1 and 2 steps as in the sCM paper; more steps: evenly spaced in t below 1.1.
        times = list(TWO_STEP_TIMES[: args.steps]) if args.steps <= 2 else \
            [math.pi / 2] + list(np.linspace(1.1, 0.2, args.steps - 1))
    else:
        times = list(TWO_STEP_TIMES)
    validate_times("--times", times)
    if args.num < 1:
        raise ValueError(f"--num must be >= 1, got {args.num}")

    device = resolve_device(args.device)
    json_path = resolve_checkpoint(args.checkpoint)
    tensors, state = load_checkpoint(json_path, device=device)
    cfg = config_from_dict(state["config"])
    info = state["data"]
    net = build_network(cfg.network, info["kind"], tuple(info["shape"]), info["num_classes"]).to(device).eval()
    net.load_state_dict(unprefixed("net" if args.no_ema else "ema", tensors))
    labels = None
    if getattr(net, "num_classes", 0):
        if args.label is not None and not 0 <= args.label < net.num_classes:
            raise ValueError(f"--label must be in [0, {net.num_classes}), got {args.label}")
        labels = (torch.full((args.num,), args.label) if args.label is not None
                  else torch.arange(args.num) % net.num_classes)
    sigma_d = cfg.method.get("sigma_d", 0.5)
    x = sample_trigflow_cm(net, args.num, tuple(info["shape"]), times, sigma_d, labels, args.batch_size,
                           device, args.seed)
    run_dir = json_path.parent.parent if json_path.parent.name == "checkpoints" else json_path.parent
    out = Path(args.out or run_dir / "samples.png")
    if info["kind"] == "image":
        save_image_grid(x, out)
    else:
        save_scatter({f"{len(times)}-step": x}, out)
    if args.npz:
        Path(args.npz).parent.mkdir(parents=True, exist_ok=True)
        extra = {} if labels is None else {"labels": labels.numpy()}
        np.savez(args.npz, x=x.numpy(), times=np.array(times), **extra)
    print(f"wrote {args.num} samples (NFE {len(times)}, times {[round(t, 4) for t in times]}) to {out}"
          + (f" and {args.npz}" if args.npz else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fewstep", description="Consistency models: train and sample.")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub).set_defaults(func=cmd_train)
    _sample_parser(sub).set_defaults(func=cmd_sample)
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
