"""`fewstep sample`: a checkpoint -> a PNG grid (images) or scatter plot (vectors), and .npz."""

from __future__ import annotations

from pathlib import Path

from fewstep.cli.common import add_sampling, checkpoint_command, count, number

EXAMPLES = """examples:
  fewstep sample runs/digits                       # 2 steps (t = pi/2, 1.1), 64 samples -> runs/digits/samples.png
  fewstep sample runs/digits --steps 1 --num 256 --out one_step.png --npz one_step.npz
  fewstep sample runs/digits/checkpoints/ckpt-0003000.json --times 1.5708,1.1,0.6
  fewstep sample runs/teacher --sampler heun --steps 18 --label 3 --guidance 2   # a diffusion model, 35 NFE
  fewstep sample runs/t2i --prompt "a handwritten digit three" --steps 1 --num 16   # text-to-image
  fewstep sample runs/t2i --prompts prompts.txt --num 64      # one prompt per line, used in turn
  fewstep sample path/to/sd-pipeline --prompt "a cat" --steps 18 --guidance 3    # the teacher, 35 NFE
  fewstep sample runs/mine --import mynets.py     # a network of your own: import its registered class first
"""


def add_parser(sub) -> None:
    p = checkpoint_command(sub, "sample", help="sample from a checkpoint to a PNG grid and .npz",
                           description="Sample from a trained model (EMA weights by default).", epilog=EXAMPLES)
    p.add_argument("--steps", type=count(1), default=None,
                   help="consistency models: 1 (t = pi/2) or 2 (pi/2, 1.1; the default) or more; "
                        "diffusion models: ODE solver steps (default 18)")
    p.add_argument("--times", default=None, help="consistency models: comma-separated decreasing times in (0, pi/2]")
    p.add_argument("--sampler", default=None,
                   help="diffusion models: heun (default), euler, dpmpp_2m (ddim for a PD student)")
    p.add_argument("--guidance", type=number(0), default=1.0,
                   help="classifier-free guidance scale (class-conditional diffusion models, text-to-image diffusion "
                        "models against the empty prompt, and sCD students distilled with method.guidance_range; "
                        "1 = none)")
    p.add_argument("--num", type=count(1), default=64, help="number of samples (default 64)")
    p.add_argument("--label", type=count(0), default=None, help="class label for a class-conditional model")
    p.add_argument("--prompt", action="append", default=None,
                   help="text-to-image models: the prompt (repeat for several; samples use them in turn)")
    p.add_argument("--prompts", default=None, help="text-to-image models: a text file of prompts, one per line")
    add_sampling(p)
    p.add_argument("--out", default=None, help="PNG path (default: <run>/samples.png)")
    p.add_argument("--npz", default=None, help="also write the samples as .npz (key 'x', and 'labels')")
    p.set_defaults(func=run)


def run(args) -> int:
    import numpy as np
    import torch

    from fewstep.devices import resolve_device
    from fewstep.apps.generate import generate, load_model, parse_times
    from fewstep.image import save_image_grid, save_scatter

    if args.times is not None and args.steps is not None:
        raise ValueError("give --steps or --times, not both")
    model = load_model(args.checkpoint, resolve_device(args.device), ema=not args.no_ema)
    times = parse_times(args.times) if args.times is not None else None
    schedule = model.sampler.schedule(args.steps, times, args.sampler)
    labels = None
    if model.num_classes:
        if args.label is not None and not args.label < model.num_classes:
            raise ValueError(f"--label must be in [0, {model.num_classes}), got {args.label}")
        labels = torch.full((args.num,), args.label) if args.label is not None else None
    elif args.label is not None:
        raise ValueError("--label needs a class-conditional checkpoint (network.class_conditional=true)")
    prompts = _prompts(args, model)
    x, nfe, seconds = generate(model, schedule, args.num, args.batch_size, args.seed, args.guidance,
                               progress=True, labels=labels, prompts=prompts)
    out = Path(args.out or model.run_dir / "samples.png")
    if model.kind == "image":
        save_image_grid(x, out)
    else:
        save_scatter({f"{schedule.sampler}, NFE {nfe}": x}, out)
    if args.npz:
        Path(args.npz).parent.mkdir(parents=True, exist_ok=True)
        if model.num_classes and labels is None:  # generate's default: balanced 0, 1, ..., K-1, 0, ...
            labels = torch.arange(args.num) % model.num_classes
        extra = {} if labels is None else {"labels": labels.numpy()}
        if prompts:
            extra["prompts"] = np.array([prompts[i % len(prompts)] for i in range(args.num)])
        np.savez(args.npz, x=x.numpy(), nfe=nfe, **schedule.to_dict(), **extra)
    print(f"wrote {args.num} samples ({model.method_name}, {schedule.sampler}, NFE {nfe}, {seconds:.2f}s) to {out}"
          + (f" and {args.npz}" if args.npz else ""))
    return 0


def _prompts(args, model) -> list[str] | None:
    """--prompt / --prompts, checked against the model and its text encoder (one-line errors)."""
    from fewstep.interop.diffusers.text import check_prompt_lengths, read_prompt_file

    if args.prompt is not None and args.prompts is not None:
        raise ValueError("give --prompt or --prompts, not both")
    given = args.prompt is not None or args.prompts is not None
    if not model.takes_text:
        if given:
            raise ValueError("--prompt/--prompts need a text-to-image checkpoint; this model takes no text")
        return None
    if not given:
        raise ValueError("this model is text-to-image: give --prompt TEXT or --prompts FILE")
    prompts = list(args.prompt) if args.prompt is not None else read_prompt_file(args.prompts)
    check_prompt_lengths(model.prompt_encoder(), prompts, "--prompt" if args.prompt is not None else
                         f"--prompts {args.prompts}")
    return prompts
