"""The text-conditioned digits row: a text-to-image diffusers teacher on captioned 8x8 digits ("a
handwritten digit three"), trained with diffusers' textbook epsilon loop and a frozen random tiny
CLIP text encoder, then its sCD student; scored by prompt accuracy (an RBF SVC trained on the real
digits, `fewstep.metrics.digits`, labels each sample; accuracy = label == the prompt's digit).

    python benchmarks/text_digits.py --out runs/text-digits                   # teacher, student, table
    python benchmarks/text_digits.py --out runs/text-digits --teacher-steps 300 --student-steps 50   # smoke
    python benchmarks/text_digits.py --out runs/text-digits --student exact    # the epsilon reading (saturates)

The student (`--student`): `v+convert` (default) reads the teacher's weights as v_prediction, regresses
them onto the teacher's guided velocity for `--convert-steps`, then distils; `exact` keeps the
teacher's epsilon reading, whose output gain near pure noise saturates the student (docs/results.md).

Importable by `benchmarks/diffusers_students.py`: `train_teacher`, `teacher_samples`, `distil`,
`student_samples`, `prompt_accuracy`, `run`.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PROMPTS = [f"a handwritten digit {n}" for n in NUMBERS]
_EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny_text_to_image.py"


def _example():
    """examples/tiny_text_to_image.py: the hand-written CLIP tokenizer and the captioned digits."""
    spec = importlib.util.spec_from_file_location("tiny_text_to_image", _EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_models(width: int = 32, text_dim: int = 32, seed: int = 0):
    """(tokenizer files folder -> tokenizer, random CLIP text encoder, pixel-space UNet2DConditionModel)."""
    import diffusers
    import transformers

    torch.manual_seed(seed)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=54, hidden_size=text_dim, intermediate_size=2 * text_dim, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=32, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(width, 2 * width),
        # cross-attention at 4x4 only: at 8x8 it costs 1.5 s of CPU per batch of 128 (1 thread)
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=text_dim,
        norm_num_groups=8, attention_head_dim=8)
    return text_encoder.requires_grad_(False).eval(), unet


def save_pipeline(folder: Path, tokenizer, text_encoder, unet, scheduler) -> Path:
    """A text-to-image pipeline folder without a VAE (pixel space): what fewstep reads as a teacher."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder / "tokenizer")
    text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    scheduler.save_pretrained(folder / "scheduler")
    index = {"_class_name": "StableDiffusionPipeline", "tokenizer": ["transformers", "CLIPTokenizer"],
             "text_encoder": ["transformers", "CLIPTextModel"], "unet": ["diffusers", "UNet2DConditionModel"],
             "scheduler": ["diffusers", "DDPMScheduler"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=1))
    return folder


def train_teacher(out: str | Path, steps: int = 3000, batch_size: int = 128, lr: float = 1e-3, ema: float = 0.999,
                  drop: float = 0.1, seed: int = 0) -> tuple[Path, Path]:
    """diffusers' textbook epsilon loop on the captioned digits, the prompt dropped to "" with
    probability `drop` (for CFG). Returns (pipeline folder, captioned-digits folder)."""
    import diffusers
    from sklearn.datasets import load_digits

    out = Path(out)
    example = _example()
    data_dir = example.captioned_digits(out / "digits", count=1797)
    tokenizer = example.tiny_tokenizer(out / "tokenizer-files")
    text_encoder, unet = make_models(seed=seed)
    digits = load_digits()
    x_all = torch.from_numpy(digits.images).float().div(8).sub(1).unsqueeze(1)
    y_all = torch.from_numpy(digits.target)
    with torch.no_grad():
        ids = tokenizer(PROMPTS + [""], padding="max_length", max_length=tokenizer.model_max_length,
                        return_tensors="pt").input_ids
        table = text_encoder(ids)[0]  # (11, L, D): ten prompts and the empty one
    ema_unet = copy.deepcopy(unet).requires_grad_(False)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")
    opt = torch.optim.Adam(unet.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(len(x_all), (batch_size,), generator=gen)
        x0, y = x_all[idx], y_all[idx]
        y = torch.where(torch.rand(batch_size, generator=gen) < drop, torch.full_like(y, 10), y)
        noise = torch.randn(x0.shape, generator=gen)
        k = torch.randint(0, 1000, (batch_size,), generator=gen)
        pred = unet(scheduler.add_noise(x0, noise, k), k, encoder_hidden_states=table[y]).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        # warmed up as diffusers' EMAModel does: with a flat 0.999, 30% of the EMA after 1,200 steps
        # would still be the random init (its samples were noise at every prompt)
        decay = min(ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for p, q in zip(ema_unet.parameters(), unet.parameters()):
                p.lerp_(q, 1 - decay)
        if step % 500 == 0 or step == steps - 1:
            print(f"teacher step {step}: loss {loss.item():.4f} ({time.perf_counter() - start:.0f}s)", flush=True)
    return save_pipeline(out / "teacher", tokenizer, text_encoder, ema_unet, scheduler), data_dir


def prompt_accuracy(samples: torch.Tensor, digits: torch.Tensor) -> float:
    """The fraction of samples (N, 1, 8, 8) in [-1, 1] that the digits classifier labels as their prompt's digit."""
    from fewstep.metrics.digits import _digits

    x = samples.double().reshape(len(samples), -1).clamp(-1, 1).numpy()
    return float((_digits()[1].predict(x) == digits.numpy()).mean())


def _prompts_for(n: int) -> tuple[list[str], torch.Tensor]:
    digits = torch.arange(n) % 10
    return [PROMPTS[int(d)] for d in digits], digits


def teacher_samples(teacher: str | Path, n: int = 1000, guidance: float = 2.0, steps: int = 18, seed: int = 0):
    """The teacher's samples by Heun (2 * steps - 1 NFE) on its exact TrigFlow ODE, guided against the
    empty prompt (what `fewstep sample TEACHER --prompt ... --guidance W` does). Returns (samples, digits)."""
    from fewstep.apps.generate import generate, load_diffusers_model

    model = load_diffusers_model(teacher, sigma_d=0.5)
    prompts, digits = _prompts_for(n)
    x, _, _ = generate(model, model.sampler.schedule(steps, sampler="heun"), n, batch_size=500, seed=seed,
                       guidance=guidance, progress=False, prompts=prompts)
    return x, digits


def distil(teacher: str | Path, data: str | Path, out: str | Path, steps: int = 500, lr: float = 5e-5,
           guidance: float = 2.0, batch_size: int = 128, extra: list[str] | None = None) -> Path:
    """sCD from the text teacher through `fewstep train` (pixel space: no VAE)."""
    from fewstep.cli import main

    args = ["train", "--method", "scd", "--teacher", str(teacher), "--data", str(data), "--steps", str(steps),
            "--lr", str(lr), "--set", f"method.guidance={guidance}", "--set", f"train.batch_size={batch_size}",
            "--set", "train.sample_every=0", "--set", "train.progress=false", "--device", "cpu", "--out", str(out),
            *(extra or [])]
    if main(args) != 0:
        raise SystemExit("distillation failed")
    return Path(out)


def student_samples(run: str | Path, n: int = 1000, steps: int = 1, seed: int = 0):
    from fewstep.apps.generate import generate, load_model

    model = load_model(run)
    prompts, digits = _prompts_for(n)
    x, _, _ = generate(model, model.sampler.schedule(steps), n, batch_size=500, seed=seed, progress=False,
                       prompts=prompts)
    return x, digits


def student_args(student: str, convert_steps: int = 150, convert_lr: float = 5e-4) -> list[str]:
    """The `fewstep train` arguments of a student kind (`STUDENTS`)."""
    if student == "exact":
        return []
    return ["--set", "network.arch=diffusers", "--set", "network.prediction=v_prediction",
            "--set", f"train.convert_steps={convert_steps}", "--set", f"train.convert_lr={convert_lr}"]


STUDENTS = ("v+convert", "exact")


def run(out: str | Path, teacher_steps: int = 3000, student_steps: int = 500, n: int = 1000,
        guidance: float = 2.0, lr: float = 5e-5, student: str = "v+convert", convert_steps: int = 150,
        convert_lr: float = 5e-4) -> list[dict]:
    from fewstep.metrics.digits import digits_score

    out = Path(out)
    start = time.perf_counter()
    if (out / "teacher" / "model_index.json").exists():  # a rerun with another student keeps the teacher
        teacher, data = out / "teacher", out / "digits"
    else:
        teacher, data = train_teacher(out, teacher_steps)
    t_teacher = time.perf_counter() - start
    rows = []
    x, digits = teacher_samples(teacher, n, guidance)
    rows.append({"model": f"teacher (Heun 35 NFE, CFG {guidance:g})", "nfe": 35,
                 "prompt_accuracy": prompt_accuracy(x, digits), **digits_score(x)})
    start = time.perf_counter()
    student_run = distil(teacher, data, out / f"scd-{student}", student_steps, lr, guidance,
                         extra=student_args(student, convert_steps, convert_lr))
    t_student = time.perf_counter() - start
    for steps in (1, 2):
        x, digits = student_samples(student_run, n, steps)
        rows.append({"model": f"sCD student ({student}), {steps} step{'s' * (steps > 1)}", "nfe": steps,
                     "prompt_accuracy": prompt_accuracy(x, digits), **digits_score(x)})
    for r in rows:
        r.update(teacher_steps=teacher_steps, student_steps=student_steps, n=n,
                 teacher_seconds=round(t_teacher), student_seconds=round(t_student))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--teacher-steps", type=int, default=3000)
    p.add_argument("--student-steps", type=int, default=500)
    p.add_argument("--num", type=int, default=1000)
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--student", choices=STUDENTS, default="v+convert")
    p.add_argument("--convert-steps", type=int, default=150)
    p.add_argument("--convert-lr", type=float, default=5e-4)
    args = p.parse_args()
    rows = run(args.out, args.teacher_steps, args.student_steps, args.num, args.guidance, args.lr, args.student,
               args.convert_steps, args.convert_lr)
    print("| model | NFE | prompt accuracy | precision | recall | coverage |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['model']} | {r['nfe']} | {r['prompt_accuracy']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} "
              f"| {r['coverage']:.3f} |")
    Path(args.out, f"table-{args.student}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
