"""`fewstep edit`: zero-shot editing with a consistency checkpoint (fewstep.editing), as PNG grids.

Inputs are images of the checkpoint's training data (the test split where there is one) or of
`--input`; the grid shows, per column, the original, what the model was given, and the result
(interpolation: one row per frame).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F

TASKS = ("inpaint", "colorize", "superres", "sdedit", "denoise", "interpolate")

EDIT_EXAMPLES = """examples:
  fewstep edit runs/digits --task inpaint --mask center          # fill the centre quarter, 4 steps
  fewstep edit runs/digits --task inpaint --mask random --fraction 0.7 --steps 8
  fewstep edit runs/digits --task superres --factor 2             # 4x4 -> 8x8
  fewstep edit runs/digits --task denoise --sigma 0.4
  fewstep edit runs/digits --task sdedit --t0 1.0                 # from coarse 'strokes' of the inputs
  fewstep edit runs/cifar --task colorize --input photos/
  fewstep edit runs/digits --task interpolate --frames 8

Rows of the grid: original, what the model saw (masked / grey / low-res / noisy / strokes), result.
Times: pi/2, then --steps - 1 times from 1.1 down to 0.2 (sdedit: --steps times from --t0 down),
or --times. Known content is kept exactly (inpainting: the kept pixels; colorization: the
luminance; super-resolution: the patch means).
"""


def edit_times(steps: int, first: float = math.pi / 2, low: float = 0.2) -> list[float]:
    """`first`, then `steps - 1` times evenly from min(1.1, first) down to `low`."""
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    if steps == 1:
        return [first]
    top = min(1.1, first * 0.75) if first < math.pi / 2 else 1.1
    low = min(low, top / 2)  # a small --t0 still gets decreasing times
    return [first] + [float(t) for t in torch.linspace(top, low, steps - 1)]


def _parser(sub):
    p = sub.add_parser("edit", help="zero-shot editing: inpaint, colorize, super-resolve, SDEdit, denoise, "
                                    "interpolate", description="Zero-shot editing with a consistency model "
                       "(CM paper, Algorithm 4; SPEC 4).", epilog=EDIT_EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a consistency-model run folder, checkpoints/ folder or ckpt-*.json")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--input", default=None, help="images to edit: a dataset name or path (default: the "
                                                 "checkpoint's training data, test split where there is one)")
    p.add_argument("--num", type=int, default=8, help="how many images (default 8)")
    p.add_argument("--steps", type=int, default=4, help="editing steps = NFE (default 4)")
    p.add_argument("--times", default=None, help="explicit decreasing times instead of --steps")
    p.add_argument("--mask", default="center", help="inpaint: center, left, top or random")
    p.add_argument("--fraction", type=float, default=0.25, help="inpaint: fraction of the image to fill")
    p.add_argument("--factor", type=int, default=2, help="superres: upscaling factor (patch size)")
    p.add_argument("--sigma", type=float, default=0.3, help="denoise: noise std added to the inputs")
    p.add_argument("--t0", type=float, default=1.0, help="sdedit: the time the strokes are noised to")
    p.add_argument("--frames", type=int, default=8, help="interpolate: frames between two noises")
    p.add_argument("--label", type=int, default=None, help="class label (class-conditional models)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-ema", action="store_true", help="use the raw training weights, not the EMA")
    p.add_argument("--out", default=None, help="PNG path (default: <run>/edit-<task>.png)")
    return p


def _inputs(model, spec: str | None, num: int, seed: int) -> torch.Tensor:
    from fewstep.evaluate import load_reference

    ds, _ = load_reference(spec or model.data_cfg.get("name") or "digits", None,
                           resolution=model.data_cfg.get("resolution"), channels=model.data_cfg.get("channels"))
    if ds.kind != "image" or tuple(ds.shape) != tuple(model.shape):
        raise ValueError(f"editing needs images shaped like the model's {tuple(model.shape)}; "
                         f"the input holds {ds.kind}s {tuple(ds.shape)}")
    x = ds.all()[0]
    pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:num]
    return x[pick].to(model.device)


def cmd_edit(args) -> int:
    from fewstep import editing
    from fewstep.generate import consistency_sampler_fn, load_model, parse_times
    from fewstep.image import save_image_grid
    from fewstep.train import resolve_device

    if args.num < 1:
        raise ValueError(f"--num must be >= 1, got {args.num}")
    model = load_model(args.checkpoint, resolve_device(args.device), ema=not args.no_ema)
    if not model.is_consistency:
        raise ValueError(f"editing needs a consistency model; {model.checkpoint} is a {model.method!r} model")
    if model.kind != "image":
        raise ValueError("editing works on image models")
    if model.num_classes and args.label is not None and not 0 <= args.label < model.num_classes:
        raise ValueError(f"--label must be in [0, {model.num_classes}), got {args.label}")
    gen = torch.Generator(device=model.device).manual_seed(args.seed)
    sd = model.sigma_d
    first = args.t0 if args.task == "sdedit" else math.pi / 2
    if not 0 < first <= math.pi / 2:
        raise ValueError(f"--t0 must be in (0, pi/2], got {first}")
    times = parse_times(args.times) if args.times else edit_times(args.steps, first)
    x = None if args.task == "interpolate" else _inputs(model, args.input, args.num, args.seed)
    batch = args.num if x is None else x.shape[0]
    labels = None
    if model.num_classes:  # the null label (unconditional) unless --label
        labels = torch.full((batch,), model.num_classes if args.label is None else args.label, device=model.device)
    fn = consistency_sampler_fn(model, labels)

    if args.task == "interpolate":
        shape = (args.num, *model.shape)
        z0 = torch.randn(shape, device=model.device, generator=gen)
        z1 = torch.randn(shape, device=model.device, generator=gen)
        alphas = torch.linspace(0, 1, max(2, args.frames)).tolist()
        frames = editing.interpolate(fn, z0, z1, alphas, sd)  # (frames, num, ...)
        grid, nrow = frames.reshape(-1, *model.shape), args.num
    else:
        if args.task == "inpaint":
            mask = editing.inpaint_mask(x.shape, args.mask, args.fraction, args.seed).to(x)
            seen = x * (1 - mask) - mask  # the hole shown black
            out = editing.inpaint(fn, x, mask, times, sd, gen)
        elif args.task == "colorize":
            if model.shape[0] != 3:
                raise ValueError("colorization needs an RGB model (data.channels=3)")
            lum = editing.luminance(x)
            seen = (lum / editing.colour_matrix(x.dtype)[0].sum()).expand_as(x)  # grey of equal luminance
            out = editing.colorize(fn, x, times, sd, gen)
        elif args.task == "superres":
            if args.factor < 2 or model.shape[-1] % args.factor:
                raise ValueError(f"--factor must be >= 2 and divide the image size {model.shape[-1]}, "
                                 f"got {args.factor}")
            low = F.avg_pool2d(x, args.factor)
            seen = F.interpolate(low, scale_factor=args.factor, mode="nearest")
            out = editing.super_resolve(fn, low, args.factor, times, sd, gen)
        elif args.task == "denoise":
            seen = x + args.sigma * torch.randn(x.shape, device=x.device, generator=gen)
            out = editing.denoise(fn, seen, args.sigma, sd)
        else:  # sdedit: coarse strokes of the input (4x4 blocks, 3 grey levels)
            block = max(1, model.shape[-1] // 4)
            strokes = F.interpolate(F.avg_pool2d(x, block), scale_factor=block, mode="nearest")
            seen = (strokes * 1.5).round().clamp(-1, 1)
            out = editing.sdedit(fn, seen, times, sd, gen)
        grid, nrow = torch.cat([x, seen, out]), batch
    path = Path(args.out) if args.out else model.run_dir / f"edit-{args.task}.png"
    save_image_grid(grid.float().cpu(), path, nrow=nrow)
    nfe = 1 if args.task in ("denoise", "interpolate") else len(times)
    print(f"{args.task}: {args.num} images, NFE {nfe} per image -> {path}")
    return 0


def add_edit_command(subparsers) -> None:
    _parser(subparsers).set_defaults(func=cmd_edit)
