"""`fewstep encode` and `fewstep export`: the command lines of `fewstep.interop.diffusers.latents` and `fewstep.interop.diffusers.export`."""

from __future__ import annotations

from fewstep.cli.common import add_import, checkpoint_command, command, count

ENCODE_EXAMPLES = """examples:
  fewstep encode --data digits --vae path/to/vae --out digits-latents.safetensors
  fewstep encode --data path/to/images --resolution 256 --vae stabilityai/sd-vae-ft-mse --out latents.safetensors
  fewstep train --data digits-latents.safetensors --method sct        # trains in latents, samples decode

The file holds each image's posterior mean and std (EDM2-style: training draws a fresh latent from
them at every load), the labels, and a record of the VAE and the latents' measured sigma_d.
"""

EXPORT_EXAMPLES = """examples:
  fewstep export runs/scd --out scd-pipeline
  python -c "import diffusers; print(diffusers.DDPMPipeline.from_pretrained('scd-pipeline')(num_inference_steps=1))"
  fewstep sample scd-pipeline --steps 1                               # fewstep reads the folder too

The student must be an sCT/sCD model on a diffusers UNet2DModel distilled from a VP (DDPM/DDIM)
teacher; the folder is a DDPMPipeline with an LCMScheduler, which generates in 1 or 2 steps. A
text-to-image student on SD's UNet2DConditionModel is written as a StableDiffusionPipeline (its VAE,
tokenizer and text encoder beside it); sample it with guidance_scale=1 (the guidance is distilled in).
A LoRA student (network.lora_rank) exports its adapter instead, where diffusers' LoRA loaders read
it: pytorch_lora_weights.safetensors (`pipe.load_lora_weights(FOLDER)`, or a model's
`load_lora_adapter(FOLDER, prefix="unet", use_safetensors=True)`) and the LCMScheduler's scheduler_config.json.
"""


def add_parsers(sub) -> None:
    p = command(sub, "encode", help="encode an image dataset into VAE latents (for latent-space training)",
                description="Encode every image of a dataset with a diffusers AutoencoderKL into one safetensors "
                            "file.", epilog=ENCODE_EXAMPLES)
    p.add_argument("--data", required=True, help="dataset name or path (as data.name)")
    p.add_argument("--vae", required=True, help="diffusers AutoencoderKL folder, pipeline folder, or Hub id")
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    p.add_argument("--resolution", type=count(1), default=None, help="resize images first (as data.resolution)")
    p.add_argument("--channels", type=int, choices=(1, 3), default=None, help="convert to 1 or 3 channels")
    p.add_argument("--split", default=None, help="dataset split (e.g. train)")
    p.add_argument("--batch-size", type=count(1), default=64)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    add_import(p)
    p.set_defaults(func=run_encode)

    p = checkpoint_command(sub, "export", help="export an sCT/sCD student on a diffusers model as a diffusers "
                                               "pipeline folder", description="Write a diffusers DDPMPipeline "
                                                                              "folder with an LCMScheduler.",
                           epilog=EXPORT_EXAMPLES)
    p.add_argument("--out", required=True, help="the folder to write")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA")
    p.add_argument("--device", default="cpu", help="where to load the checkpoint (default cpu)")
    p.set_defaults(func=run_export)


def run_encode(args) -> int:
    from pathlib import Path

    from fewstep.data import load_dataset
    from fewstep.devices import resolve_device
    from fewstep.interop.diffusers.latents import encode_dataset, read_record

    if not args.out.endswith(".safetensors"):
        raise ValueError(f"--out must be a .safetensors file, got {args.out!r}")
    options = {} if args.split is None else {"split": args.split}
    dataset = load_dataset(args.data, resolution=args.resolution, channels=args.channels, **options)
    source = {"name": str(Path(args.data).resolve()) if Path(args.data).exists() else args.data,
              "resolution": args.resolution, "channels": args.channels, "options": options}
    path = encode_dataset(dataset, args.vae, args.out, batch_size=args.batch_size,
                          device=resolve_device(args.device), source=source)
    record = read_record(path)
    print(f"wrote {record['count']} latents {tuple(record['latent_shape'])} of {tuple(record['pixel_shape'])} images "
          f"to {path}: sigma_d = {record['sigma_d']:.4f} (measured)")
    return 0


def run_export(args) -> int:
    from fewstep.devices import resolve_device
    from fewstep.interop.diffusers.export import export_diffusers
    from fewstep.apps.generate import load_model

    model = load_model(args.checkpoint, resolve_device(args.device), ema=not args.no_ema)
    out = export_diffusers(model, args.out)
    if (out / "pytorch_lora_weights.safetensors").exists():
        what = "a LoRA adapter (pytorch_lora_weights.safetensors) and its LCMScheduler"
    else:
        import json

        pipeline = json.loads((out / "model_index.json").read_text()).get("_class_name", "pipeline")
        what = f"a diffusers {pipeline} with an LCMScheduler"
    print(f"wrote {what} ({model.method_name}, step {model.step}) to {out}")
    return 0
