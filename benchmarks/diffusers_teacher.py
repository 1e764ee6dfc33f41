"""Train a diffusers DDPM teacher on the 8x8 digits with diffusers' own epsilon objective, and save it
as a `DDPMPipeline` folder: the teacher of the issue-12 measurement (docs/results.md).

    python benchmarks/diffusers_teacher.py --out runs/ddpm-digits            # ~5 min on 2 CPU cores
    fewstep eval runs/ddpm-digits --nfe 35 --num 1000 --ref digits            # the teacher, 35 NFE (Heun)
    fewstep train --method scd --teacher runs/ddpm-digits --out runs/ddpm-scd --steps 2000 --lr 5e-5
    fewstep eval runs/ddpm-scd --steps 1,2 --num 1000

The training loop is diffusers' textbook one (as in its `train_unconditional.py`): uniform integer
timesteps, `scheduler.add_noise`, MSE on epsilon, Adam, EMA of the weights. Nothing in it is fewstep's,
so the distillation starts from a model made the way users make theirs.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def digits_tensor() -> torch.Tensor:
    from sklearn.datasets import load_digits

    return torch.from_numpy(load_digits().images).float().div(8).sub(1).unsqueeze(1)  # [-1, 1], (1797, 1, 8, 8)


def make_unet(width: int = 32):
    import diffusers

    return diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(width, 2 * width), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
                                 attention_head_dim=width)


PREDICTIONS = ("epsilon", "v_prediction", "flow")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prediction", choices=PREDICTIONS, default="epsilon",
                   help="epsilon / v_prediction (DDPMScheduler) or flow (FlowMatchEulerDiscreteScheduler)")
    p.add_argument("--width", type=int, default=32, help="channels of the first UNet level")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    train_teacher(args.out, args.steps, args.batch_size, args.lr, args.ema, args.seed, args.prediction, args.width,
                  args.device)


def train_teacher(out: str, steps: int = 3000, batch_size: int = 128, lr: float = 1e-3, ema_decay: float = 0.999,
                  seed: int = 0, prediction: str = "epsilon", width: int = 32, device: str = "cpu") -> Path:
    """Train and save one teacher (a `DDPMPipeline` folder; its scheduler names the prediction type)."""
    import diffusers

    args = argparse.Namespace(out=out, steps=steps, batch_size=batch_size, lr=lr, ema=ema_decay, seed=seed,
                              prediction=prediction, width=width, device=device)

    torch.manual_seed(args.seed)
    data = digits_tensor().to(device)
    unet = make_unet(args.width).to(device)
    ema = copy.deepcopy(unet).requires_grad_(False)
    if args.prediction == "flow":  # diffusers' rectified-flow loop (train_dreambooth_sd3.py): x = (1-s) x0 + s eps
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    else:
        scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                            prediction_type=args.prediction)
    opt = torch.optim.Adam(unet.parameters(), lr=args.lr)
    log, start = [], time.perf_counter()
    for step in range(args.steps):
        x0 = data[torch.randint(len(data), (args.batch_size,)).to(device)]
        noise = torch.randn_like(x0)
        if args.prediction == "flow":  # uniform s, the model at timestep s * 1000, target eps - x0
            s = torch.rand(len(x0)).to(device)
            x = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * noise
            loss = F.mse_loss(unet(x, s * scheduler.config.num_train_timesteps).sample, noise - x0)
        else:
            k = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),)).to(device)
            target = noise if args.prediction == "epsilon" else scheduler.get_velocity(x0, noise, k)
            loss = F.mse_loss(unet(scheduler.add_noise(x0, noise, k), k).sample, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for group in opt.param_groups:  # linear warmup over 200 steps, then cosine decay
            warm = min(1.0, (step + 1) / 200)
            group["lr"] = args.lr * warm * 0.5 * (1 + torch.cos(torch.tensor(step / args.steps * torch.pi)).item())
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))  # diffusers' EMAModel: the early average forgets the init
        with torch.no_grad():
            for pe, pu in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(pu, 1 - decay)
        if step % 100 == 0 or step == args.steps - 1:
            log.append({"step": step, "loss": loss.item(), "seconds": time.perf_counter() - start})
            print(json.dumps(log[-1]), flush=True)
    out = Path(args.out)
    diffusers.DDPMPipeline(unet=ema.cpu(), scheduler=scheduler).save_pretrained(out, safe_serialization=True)
    (out / "train_log.json").write_text(json.dumps({"args": vars(args), "log": log}, indent=1))
    print(f"saved the DDPMPipeline (EMA weights) to {out} after {time.perf_counter() - start:.0f} s")
    return out


if __name__ == "__main__":
    main()
