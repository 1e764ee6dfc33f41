"""Reproduce the papers' tables with fewstep's paper presets (docs/reproduce.md).

    python benchmarks/reproduce.py                    # each preset's 8-GPU commands, expected FID and GPU-hours
    python benchmarks/reproduce.py --smoke            # every preset for 2 steps on CPU, on tiny stand-ins (CI)
    python benchmarks/reproduce.py --smoke --only cifar10-ecm-1h --keep runs/smoke

The smoke run checks that each preset's whole path works, not its numbers: the preset as
`fewstep train --preset NAME` reads it (its teacher check included), with the network and inputs
shrunk by `--set` overrides (a random CIFAR-10 archive, a random ImageNet zip, a random tiny VAE),
a 2-step flow run of the same architecture as the teacher where the preset needs one, then a
1-step `fewstep eval` of the result with the small random-feature extractor.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

TORCHRUN = "torchrun --standalone --nproc_per_node 8 -m fewstep --"

# Per preset: how to get the teacher (if any), the paper's expected FID, and the expected cost. GPU-hours
# are the papers' where they report them; the others are estimates from EDM's and EDM2's training
# throughput (a CM step costs about two diffusion steps: the JVP pass and the backward), not measurements.
PLAN = {
    "cifar10-sct": {
        "fid": "2.85 (1 step), 2.06 (2 steps): sCM Table 1",
        "gpu_hours": "~250 A100-hours (estimate: 205 Mimg at about twice EDM's DDPM++ cost per image)",
    },
    "cifar10-scd": {
        "teacher": ("runs/cifar10-teacher", f"{TORCHRUN} train --preset cifar10-sct --method flow "
                                            "--out runs/cifar10-teacher"),
        "fid": "3.66 (1 step), 2.52 (2 steps): sCM Table 1",
        "gpu_hours": "~150 A100-hours for the student (estimate: 102 Mimg plus the teacher's pass), "
                     "plus the teacher (~150 A100-hours, EDM's CIFAR-10 budget)",
    },
    "cifar10-ecm-1h": {
        "teacher": ("edm-cifar10-32x32-uncond-vp.pkl",
                    "wget https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-uncond-vp.pkl"),
        "fid": "2.73 (2 steps, t_mid sigma 0.821): ECT, run_ecm_1hour.sh",
        "gpu_hours": "about 1 A100-hour (ECT's; 8 GPUs: under 10 minutes of wall clock)",
    },
    "imagenet64-sct-s": {
        "fid": "S is not in the paper's table; XL: 2.04 (1 step), 1.48 (2 steps): sCM Table 2",
        "gpu_hours": "~2,000 A100-hours (estimate: 819 Mimg of EDM2-S at 64x64, twice a diffusion step)",
    },
    "imagenet64-scd-s": {
        "teacher": ("edm2-img64-s.pkl",
                    "wget https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions/edm2-img64-s-1073741-0.130.pkl "
                    "-O edm2-img64-s.pkl"),
        "fid": "S is not in the paper's table; XL: 2.44 (1 step), 1.66 (2 steps): sCM Table 2",
        "gpu_hours": "~2,500 A100-hours (estimate: as sCT plus the teacher's pass)",
    },
    "imagenet512-scd-s": {
        "teacher": ("runs/imagenet512-teacher",
                    f"{TORCHRUN} train --preset imagenet512-scd-s --method flow --set method.label_dropout=0.1 "
                    "--set method.sigma_d=0.5 "
                    "--set network.arch=edm2 --set network.size=s --set network.precond=trigflow "
                    "--set network.class_conditional=true --out runs/imagenet512-teacher"),
        "fid": "S is not in the paper's table; XXL: 2.28 (1 step), 1.88 (2 steps): sCM Table 3",
        "gpu_hours": "~1,500 A100-hours for the student (estimate: 410 Mimg of 64x64x4 latents), plus the "
                     "teacher and one VAE pass over ImageNet",
    },
}


def train_command(name: str) -> str:
    teacher = PLAN[name].get("teacher")
    return f"{TORCHRUN} train --preset {name}" + (f" --teacher {teacher[0]}" if teacher else "") + f" --out runs/{name}"


def eval_command(name: str) -> str:
    # ECT samples its 2 steps through sigma = 0.821 (TrigFlow 1.024), not sCM's t_mid = 1.1
    steps = "--times 1.5708 --times 1.5708,1.024" if name == "cifar10-ecm-1h" else "--steps 1,2"
    guidance = " --guidance 1.5" if name == "imagenet512-scd-s" else ""
    return f"{TORCHRUN} eval runs/{name} --protocol paper {steps}{guidance}"


def print_plan() -> None:
    for name, plan in PLAN.items():
        print(f"## {name}")
        if "teacher" in plan:
            print(f"teacher:  {plan['teacher'][1]}")
        print(f"train:    {train_command(name)}")
        print(f"evaluate: {eval_command(name)}")
        print(f"expected: FID {plan['fid']}; {plan['gpu_hours']}\n")


# ------------------------------------------------------------------------------------------------
# Smoke: every preset, 2 steps on CPU, tiny inputs


COMMON = ["--device", "cpu", "--no-progress", "--steps", "2", "--batch-size", "4",
          "--set", "train.log_every=1", "--set", "train.sample_every=0", "--set", "train.ckpt_every=0",
          "--set", "train.num_samples=4", "--set", "train.precision=fp32", "--set", "data.workers=0"]
TINY = {"ddpmpp": ["--set", "network.model_channels=16", "--set", "network.channel_mult=[1,1]",
                   "--set", "network.num_blocks=1", "--set", "network.attn_resolutions=[4]"],
        "edm2": ["--set", "network.size=null", "--set", "network.model_channels=16",
                 "--set", "network.channel_mult=[1,1]", "--set", "network.num_blocks=1",
                 "--set", "network.attn_resolutions=[]"]}


def fake_cifar10(folder: Path, per_batch: int = 8) -> Path:
    """cifar-10-python.tar.gz in the real layout (protocol-2 pickles of dicts), random pixels."""
    rng = np.random.default_rng(0)
    members = {"batches.meta": pickle.dumps({b"label_names": [f"class{k}".encode() for k in range(10)]}, protocol=2)}
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        members[name] = pickle.dumps({b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                                      b"labels": rng.integers(0, 10, per_batch).tolist()}, protocol=2)
    path = folder / "cifar-10-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path


def fake_imagenet(folder: Path, name: str, resolution: int, num: int = 16, classes: int = 4) -> Path:
    """An EDM dataset_tool zip: PNGs and dataset.json labels, random pixels."""
    from PIL import Image

    rng = np.random.default_rng(1)
    path = folder / name
    labels = []
    with zipfile.ZipFile(path, "w") as z:
        for k in range(num):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)).save(buf, "PNG")
            member = f"00000/img{k:08d}.png"
            z.writestr(member, buf.getvalue())
            labels.append([member, k % classes])
        z.writestr("dataset.json", json.dumps({"labels": labels}))
    return path


def fake_vae(folder: Path) -> Path:
    """A random diffusers AutoencoderKL: RGB <-> 4 latent channels at half the resolution."""
    import diffusers
    import torch

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8),
                                  latent_channels=4, norm_num_groups=4, sample_size=16, layers_per_block=1)
    vae.save_pretrained(folder / "vae")
    return folder / "vae"


def fewstep(*argv: str) -> None:
    from fewstep.cli import main

    if main(list(argv)) != 0:
        raise SystemExit(f"failed: fewstep {' '.join(argv)}")


def train(*argv: str) -> None:
    """`fewstep train ARGV` as its command line reads it (preset, overrides, the teacher check), trained
    by `fit` without the preview and loss-curve callbacks: the smoke checks the recipe, not the plots."""
    from fewstep.cli import build_parser
    from fewstep.cli.train import build_train_config
    from fewstep.training.build import build
    from fewstep.training.fit import fit

    cfg, out = build_train_config(build_parser().parse_args(["train", *argv]))
    built = build(cfg, out)
    fit(*built, out, **built.options)


def smoke(names: list[str], work: Path) -> dict[str, float]:
    """Each preset for 2 steps (after its 2-step teacher), then a 1-step evaluation; seconds per preset."""
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    os.environ["FEWSTEP_CACHE"] = str(work / "cache")  # encoded latents and reference statistics
    data = {  # made when a preset first needs them
        "cifar10": lambda: ["--data", str(fake_cifar10(work)), "--set", "data.resolution=8"],
        "imagenet64": lambda: ["--data", str(fake_imagenet(work, "imagenet-64x64.zip", 8)), "--set", "data.resolution=8"],
        "imagenet512": lambda: ["--data", str(fake_imagenet(work, "imagenet-512x512.zip", 16)),
                                "--set", "data.resolution=16", "--set", f"data.vae={fake_vae(work)}"],
    }
    made = {}
    arch = {"cifar10": "ddpmpp", "imagenet64": "edm2", "imagenet512": "edm2"}
    teacher_base = {"cifar10-scd": "cifar10-sct", "cifar10-ecm-1h": "cifar10-sct", "imagenet64-scd-s": "imagenet64-sct-s"}
    seconds = {}
    for name in names:
        start = time.perf_counter()
        dataset = name.split("-")[0]
        inputs = made[dataset] = made.get(dataset) or data[dataset]()
        args = []
        if "teacher" in PLAN[name]:
            teacher = work / f"{name}-teacher"
            if name in teacher_base:  # the teacher: a 2-step flow run of the sCT preset's network
                base = ["--preset", teacher_base[name]]
            else:  # ImageNet-512: a class-conditional EDM2 flow model of the latents, label dropout 0.1
                base = ["--preset", name, "--set", "method.label_dropout=0.1", "--set", "method.sigma_d=0.5",
                        "--set", "network.arch=edm2",
                        "--set", "network.precond=trigflow", "--set", "network.class_conditional=true"]
            train(*base, "--method", "flow", "--out", str(teacher), *inputs, *COMMON, *TINY[arch[dataset]])
            args = ["--teacher", str(teacher)]
        else:
            args = TINY[arch[dataset]]
        out = work / name
        train("--preset", name, "--out", str(out), *inputs, *COMMON, *args)
        fewstep("eval", str(out), "--steps", "1", "--num", "4", "--batch-size", "4", "--features", "random",
                "--device", "cpu", "--no-progress")
        seconds[name] = time.perf_counter() - start
        print(f"smoke {name}: ok in {seconds[name]:.1f} s", flush=True)
    return seconds


def main(argv: list[str] | None = None) -> int:
    from fewstep.presets import PAPER_PRESETS

    if set(PLAN) != set(PAPER_PRESETS):
        raise SystemExit(f"PLAN and fewstep.presets.PAPER_PRESETS disagree: {sorted(set(PLAN) ^ set(PAPER_PRESETS))}")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="run every preset for 2 steps on CPU on tiny stand-ins")
    p.add_argument("--only", default=None, help="comma-separated presets (default: all)")
    p.add_argument("--keep", default=None, help="smoke: work in this folder and keep it (default: a temp folder)")
    args = p.parse_args(argv)
    names = args.only.split(",") if args.only else list(PLAN)
    unknown = [n for n in names if n not in PLAN]
    if unknown:
        raise SystemExit(f"unknown presets {unknown}; known: {', '.join(PLAN)}")
    if not args.smoke:
        print_plan()
        return 0
    start = time.perf_counter()
    if args.keep:
        Path(args.keep).mkdir(parents=True, exist_ok=True)
        smoke(names, Path(args.keep))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            smoke(names, Path(tmp))
    print(f"smoke: {len(names)} presets in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
