"""`fewstep edit`: zero-shot editing with a consistency checkpoint (`fewstep.apps.edit`), as PNG grids.

Inputs are images of the checkpoint's training data (the test split where there is one) or of
`--input`; the grid shows, per column, the original, what the model was given, and the result
(interpolation: one row per frame).
"""

from __future__ import annotations

import math
from pathlib import Path

from fewstep.cli.common import checkpoint_command, count, number

EXAMPLES = """examples:
  fewstep edit runs/digits --task inpaint --mask center          # fill the centre quarter, 4 steps
  fewstep edit runs/digits --task inpaint --mask random --fraction 0.7 --steps 8
  fewstep edit runs/digits --task superres --factor 2             # 4x4 -> 8x8
  fewstep edit runs/digits --task denoise --sigma 0.4
  fewstep edit runs/digits --task sdedit --t0 1.0                 # from coarse 'strokes' of the inputs
  fewstep edit runs/cifar --task colorize --input photos/
  fewstep edit runs/digits --task interpolate --frames 8
  fewstep edit runs/mine --task inpaint --import mynets.py        # a network of your own

Rows of the grid: original, what the model saw (masked / grey / low-res / noisy / strokes), result.
Times: pi/2, then --steps - 1 times from 1.1 down to 0.2 (sdedit: --steps times from --t0 down),
or --times. Known content is kept exactly (inpainting: the kept pixels; colorization: the
luminance; super-resolution: the patch means).
"""


def add_parser(sub) -> None:
    from fewstep.apps.edit import TASKS

    p = checkpoint_command(sub, "edit", help="zero-shot editing: inpaint, colorize, super-resolve, SDEdit, denoise, "
                                             "interpolate",
                           description="Zero-shot editing with a consistency model (CM paper, Algorithm 4; docs/math.md#zero-shot-editing).",
                           epilog=EXAMPLES)
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--input", default=None, help="images to edit: a dataset name or path (default: the "
                                                 "checkpoint's training data, test split where there is one)")
    p.add_argument("--num", type=count(1), default=8, help="how many images (default 8)")
    p.add_argument("--steps", type=count(1), default=4, help="editing steps = NFE (default 4)")
    p.add_argument("--times", default=None, help="explicit decreasing times instead of --steps")
    p.add_argument("--mask", choices=("center", "left", "top", "random"), default="center",
                   help="inpaint: the region to fill (default center)")
    p.add_argument("--fraction", type=number(0, 1, low_open=True), default=0.25,
                   help="inpaint: fraction of the image to fill (default 0.25)")
    p.add_argument("--factor", type=count(2), default=2, help="superres: upscaling factor (patch size)")
    p.add_argument("--sigma", type=number(0, low_open=True), default=0.3,
                   help="denoise: noise std added to the inputs (default 0.3)")
    p.add_argument("--t0", type=number(0, math.pi / 2, low_open=True), default=1.0,
                   help="sdedit: the time the strokes are noised to, in (0, pi/2] (default 1.0)")
    p.add_argument("--frames", type=count(2), default=8, help="interpolate: frames between two noises (default 8)")
    p.add_argument("--label", type=count(0), default=None, help="class label (class-conditional models)")
    p.add_argument("--seed", type=count(0), default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--no-ema", action="store_true", help="use the raw training weights, not the EMA")
    p.add_argument("--out", default=None, help="PNG path (default: <run>/edit-<task>.png)")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from fewstep.devices import resolve_device
    from fewstep.apps.edit import check_editable, edit_images, edit_inputs, edit_times, interpolation_frames, task_nfe
    from fewstep.apps.generate import load_model, parse_times
    from fewstep.image import save_image_grid

    model = load_model(args.checkpoint, resolve_device(args.device), ema=not args.no_ema)
    check_editable(model)
    if args.label is not None and model.num_classes and not args.label < model.num_classes:
        raise ValueError(f"--label must be in [0, {model.num_classes}), got {args.label}")
    first = args.t0 if args.task == "sdedit" else math.pi / 2
    times = parse_times(args.times) if args.times else edit_times(args.steps, first)
    if args.task == "interpolate":
        frames = interpolation_frames(model, args.num, args.frames, label=args.label, seed=args.seed)
        grid, nrow = frames.reshape(-1, *model.output_shape), args.num
    else:
        x = edit_inputs(model, args.input, args.num, args.seed)
        shown, edited = edit_images(model, args.task, x, times, mask=args.mask, fraction=args.fraction,
                                    factor=args.factor, sigma=args.sigma, label=args.label, seed=args.seed)
        grid, nrow = torch.cat([x, shown, edited]), x.shape[0]
    path = Path(args.out) if args.out else model.run_dir / f"edit-{args.task}.png"
    save_image_grid(grid.float().cpu(), path, nrow=nrow)
    print(f"{args.task}: {args.num} images, NFE {task_nfe(args.task, times)} per image -> {path}")
    return 0
