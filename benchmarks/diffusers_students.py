"""Students of diffusers teachers of every output type, on the 8x8 digits (issue 19, docs/results.md).

Per teacher (trained by diffusers' own textbook loop, `benchmarks/diffusers_teacher.py`: epsilon and
v_prediction with `DDPMScheduler`, rectified flow with `FlowMatchEulerDiscreteScheduler`), its sCD
students at equal budget, scored by FID at N samples at 1 and 2 steps beside the teacher's 35-NFE FID:

- `exact`: the teacher's own model behind the exact conversion (the student starts as the teacher);
- `v`: the same weights read as v_prediction (bounded output gain; its start is not the teacher);
- `v+convert`: the same weights read as v_prediction (`network.prediction`), first regressed onto the
  teacher's velocity (`train.convert_steps`), then sCD: for teachers whose reading has a large output
  gain (epsilon near pure noise, sample near clean data).
- `smooth`: the teacher's reading with a smooth time input (`network.time_input=smooth`: a cosine
  series of TrigFlow time, fitted to the teacher's time embedding); `v+convert+smooth`: both.

    python benchmarks/diffusers_students.py --out runs/students                # the table of docs/results.md
    python benchmarks/diffusers_students.py --out runs/students-quick --quick  # smoke test, a few minutes
    python benchmarks/diffusers_students.py --out runs/students --features random  # no Inception weights

The defaults are the 2-core CPU budget: 0.18M-parameter teachers (width 16, 1,500 steps), 400 or
1,600 sCD steps per student, FID with Inception features (N = 1,000; most of the run time goes there),
the teachers two at a time (`--jobs`). The 2-step sampler's middle time is 0.6 (`--times`: measured
best on these students; `--times search` chooses it per student by `fewstep search-times` on cheap
random features, which ordered the times wrongly on two of three students).

The default student per teacher, its learning rate and steps are the ones measured best (`BEST`, `LR`,
`STEPS`); `--students exact,v+convert` trains the others too. The `text` teacher is `benchmarks/text_digits.py`'s text-to-image row (a
`UNet2DConditionModel` with a tiny random CLIP text encoder, its student read as v and converted),
scored by prompt accuracy. The tables are printed as markdown and written to <out>/table.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1])]  # this checkout's fewstep
from diffusers_teacher import train_teacher  # noqa: E402

HALF_PI = math.pi / 2
# teacher name -> its prediction type in benchmarks/diffusers_teacher.py
TEACHERS = {"epsilon": "epsilon", "v_prediction": "v_prediction", "flow": "flow", "text": "epsilon"}
# student name -> (extra `fewstep train` arguments, the teachers it is for)
STUDENTS = {  # `--students` picks; the default is each teacher's best, `BEST`
    "exact": (lambda a: [], ("epsilon", "v_prediction", "flow")),
    "v": (lambda a: ["--set", "network.arch=diffusers", "--set", "network.prediction=v_prediction"], ("epsilon",)),
    "v+convert": (lambda a: ["--set", "network.arch=diffusers", "--set", "network.prediction=v_prediction",
                             "--set", f"train.convert_steps={a.convert_steps}",
                             "--set", f"train.convert_lr={a.convert_lr}"], ("epsilon",)),
    # the teacher's reading with a smooth time input fitted to the teacher's (docs/math.md#smooth-time-input)
    "smooth": (lambda a: ["--set", "network.arch=diffusers", "--set", "network.time_input=smooth"],
               ("epsilon", "v_prediction", "flow")),
    "v+convert+smooth": (lambda a: [*STUDENTS["v+convert"][0](a), "--set", "network.time_input=smooth"], ("epsilon",)),
}

# the default student per teacher, the best measured (docs/results.md): the exact reading of an epsilon
# teacher is noise at 1 and 2 steps, and the teacher's time input makes every student drift with training
BEST = {"epsilon": "v+convert+smooth", "v_prediction": "smooth", "flow": "smooth"}
# per teacher, its students' learning rate and sCD steps, the best measured (docs/results.md): of 5e-5 to 1e-3,
# the flow teacher's smooth student learns best at 3e-4 and drifts when trained longer at that rate
LR = {"epsilon": 1e-4, "v_prediction": 1e-4, "flow": 3e-4}
STEPS = {"epsilon": 1600, "v_prediction": 1600, "flow": 400}


def fewstep(*args: str) -> None:
    from fewstep.cli import main

    if main(list(args)) != 0:
        raise SystemExit(f"fewstep {' '.join(args)} failed")


def fid_rows(run: Path, out: Path, flag: str, value: str, args, *more: str) -> list[dict]:
    if out.exists():  # scored already (a rerun with more students)
        return json.loads(out.read_text())["rows"]
    fewstep("eval", str(run), flag, value, *more, "--num", str(args.num), "--ref", "digits", "--device", args.device,
            "--out", str(out), "--features", args.features)
    return json.loads(out.read_text())["rows"]


def _middle_time(text: str) -> str:
    if text != "search" and not 0 < float(text) < HALF_PI:
        raise argparse.ArgumentTypeError(f"a TrigFlow time in (0, pi/2) or 'search', got {text!r}")
    return text


def two_step_times(run: Path, out: Path, args) -> list[float]:
    """The 2-step sampler's times: (pi/2, `--times`), or with `--times search` those that
    `fewstep search-times` chooses by FID on the cheap random features (the Inception FID then scores them)."""
    if args.times != "search":
        return [HALF_PI, float(args.times)]
    if not out.exists():
        fewstep("search-times", str(run), "--steps", "2", "--num", str(args.num), "--ref", "digits", "--device",
                args.device, "--features", "random", "--out", str(out), "--no-progress")
    return json.loads(out.read_text())["times"]


def pixel_scores(run: Path, num: int, steps: int | None = None, device: str = "cpu", times=None) -> dict:
    """`fewstep.metrics.digits`: pixel-space precision / recall against the real digits and the
    coverage of the ten classes by a digit classifier, for `num` samples at `steps` or `times` (None:
    the teacher's Heun at 35 NFE)."""
    from fewstep.apps.generate import generate, load_model
    from fewstep.metrics.digits import digits_score

    model = load_model(run, device)
    if times is not None:
        schedule = model.sampler.schedule(times=times)
    else:
        schedule = model.sampler.schedule(18, None, "heun") if steps is None else model.sampler.schedule(steps)
    samples, _, _ = generate(model, schedule, num, progress=False)
    return digits_score(samples)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--teachers", default=",".join(TEACHERS), help="comma list of " + ", ".join(TEACHERS))
    p.add_argument("--students", default=None,
                   help="comma list of " + ", ".join(STUDENTS) + " (default: per teacher, the one the table "
                        "measured best: " + ", ".join(f"{t} {s}" for t, s in BEST.items()) + ")")
    p.add_argument("--teacher-steps", type=int, default=1500)
    p.add_argument("--text-steps", default="1200,300", help="the text row's teacher and student steps")
    p.add_argument("--width", type=int, default=16, help="the teachers' UNet width")
    p.add_argument("--student-steps", default=None,
                   help="sCD steps per student; a comma list runs each budget (run folders end in -s<steps>) "
                        "(default: per teacher, the best measured: " + ", ".join(f"{t} {n}" for t, n in STEPS.items()) + ")")
    p.add_argument("--convert-steps", type=int, default=150)
    p.add_argument("--convert-lr", type=float, default=5e-4)
    p.add_argument("--lr", type=float, default=None,
                   help="the students' learning rate (default: per teacher, the best measured: " +
                        ", ".join(f"{t} {v:g}" for t, v in LR.items()) + ")")
    p.add_argument("--jobs", type=int, default=2,
                   help="teachers run side by side, each on its share of the cores: a second thread speeds the "
                        "small UNets' steps up only 1.2x (docs/results.md), a second process 2x")
    p.add_argument("--warmup", type=int, default=100, help="tangent warmup steps")
    p.add_argument("--num", type=int, default=1000, help="samples per FID")
    p.add_argument("--times", type=_middle_time, default="0.6",
                   help="the 2-step sampler's middle time (default 0.6: the best of 0.35, 0.6, 0.8 and 1.1, sCM's "
                        "default for 64x64 images, on the flow and v_prediction students; docs/results.md), or "
                        "'search': chosen per student by `fewstep search-times` on random features")
    p.add_argument("--features", choices=("inception", "random"), default="inception",
                   help="FID features (inception needs its weights: fewstep eval --download)")
    p.add_argument("--device", default="cpu", help="where teachers and students train, and FID runs")
    p.add_argument("--quick", action="store_true", help="smoke test: tiny budgets")
    args = p.parse_args()
    if args.quick:
        args.teacher_steps, args.student_steps, args.convert_steps, args.num, args.width = 20, "3", 3, 64, 8
        args.warmup, args.features, args.text_steps = 1, "random", "20,3"
    root, begin = Path(args.out), time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    names = args.teachers.split(",")
    for name in names:
        if name not in TEACHERS:
            raise SystemExit(f"unknown teacher {name!r}; known: {', '.join(TEACHERS)}")
    if args.features == "inception":  # the reference statistics, once, before the teachers share the cores
        fewstep("ref-stats", "--ref", "digits", "--device", args.device, "--features", args.features, "--no-progress")
    if args.jobs > 1:  # one process per teacher, each on its share of the cores
        import multiprocessing
        import os
        from concurrent.futures import ProcessPoolExecutor

        threads = max(1, (os.cpu_count() or 1) // args.jobs)
        with ProcessPoolExecutor(args.jobs, multiprocessing.get_context("spawn"), _one_thread_pool,
                                 (threads,)) as pool:
            futures = [pool.submit(teacher_part, name, args) for name in names]
        parts, failed = [], []
        for name, future in zip(names, futures):  # a failed teacher does not take the others' rows with it
            if future.exception() is None:
                parts.append(future.result())
            else:
                failed.append(f"{name}: {' '.join(str(future.exception()).split())[:300]}")
    else:
        parts, failed = [teacher_part(name, args) for name in names], []
    table = [row for part in parts for row in part.get("rows", [])]
    text_rows = [row for part in parts for row in part.get("text", [])]
    total = time.perf_counter() - begin
    (root / "table.json").write_text(json.dumps({"args": vars(args), "rows": table, "text": text_rows,
                                                 "seconds": total, "failed": failed}, indent=1))
    print(f"\nwhole run: {total / 60:.1f} min (teachers, students, scoring)")
    print(f"\n| teacher | student | steps | NFE (times) | FID ({args.features} features, N = {args.num}) | precision | "
          f"recall | pixel precision / recall / coverage | seconds |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in table:
        px, times = r["pixels"], r.get("times")
        nfe = f"{r['nfe']} ({', '.join(f'{t:.3f}' for t in times)})" if times else str(r["nfe"])
        print(f"| {r['teacher']} | {r['student']} | {r['steps']} | {nfe} | {r['fid']:.2f} | {r['precision']:.3f} | "
              f"{r['recall']:.3f} | {px['precision']:.3f} / {px['recall']:.3f} / {px['coverage']:.2f} | "
              f"{r['seconds']:.0f} |")

    if text_rows:
        print("\n| text-to-image | NFE | prompt accuracy | pixel precision / recall / coverage | seconds |\n"
              "| --- | --- | --- | --- | --- |")
        for r in text_rows:
            seconds = r["teacher_seconds"] if r["nfe"] == 35 else r["student_seconds"]
            print(f"| {r['model']} | {r['nfe']} | {r['prompt_accuracy']:.3f} | {r['precision']:.3f} / "
                  f"{r['recall']:.3f} / {r['coverage']:.2f} | {seconds} |")
    if failed:
        raise SystemExit("teachers that failed (the table holds the others):\n" + "\n".join(failed))


def _one_thread_pool(threads: int) -> None:
    import os

    import torch

    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


def teacher_part(name: str, args) -> dict:
    """One teacher's rows: train it (diffusers' textbook loop), its students, and score them all;
    also written to <out>/part-<name>.json."""
    root = Path(args.out)
    if name == "text":
        part = {"text": text_row(root / "text", args)}
        (root / f"part-{name}.json").write_text(json.dumps(part, indent=1))
        return part
    folder, table = root / f"teacher-{name}", []
    budgets = [int(n) for n in str(args.student_steps or STEPS[name]).split(",")]
    begin = start = time.perf_counter()
    if not (folder / "model_index.json").exists():
        train_teacher(str(folder), steps=args.teacher_steps, batch_size=64, prediction=TEACHERS[name],
                      width=args.width, device=args.device)
    teacher_seconds = time.perf_counter() - start
    students = args.students.split(",") if args.students else [BEST[name]]
    lr = args.lr or LR[name]
    for student, steps in ((s, n) for s in students for n in budgets):
        extra, teachers = STUDENTS[student]
        if name not in teachers:
            continue
        tag = f"{name}-{student}" + (f"-s{steps}" if len(budgets) > 1 else "")
        run, start = root / tag, time.perf_counter()
        fewstep("train", "--method", "scd", "--teacher", str(folder), "--out", str(run), "--data", "digits",
                "--steps", str(steps), "--lr", str(lr), "--batch-size", "64",
                "--set", f"method.warmup_steps={args.warmup}", "--set", "train.sample_every=0",
                "--set", f"train.ckpt_every={steps}", "--no-progress", "--device", args.device,
                *extra(args))
        seconds = time.perf_counter() - start
        times = two_step_times(run, root / f"{tag}-times.json", args)
        rows = fid_rows(run, root / f"{tag}-eval.json", "--times", f"{HALF_PI:.6f}", args,
                        "--times", ",".join(f"{t:.6f}" for t in times))
        for r in rows:
            table.append({"teacher": name, "student": student, "steps": steps, "lr": lr, "nfe": r["nfe"],
                          "fid": r["fid"], "precision": r["precision"], "recall": r["recall"], "seconds": seconds,
                          "times": r.get("times"), "pixels": pixel_scores(run, args.num, r["nfe"], args.device,
                                                                         r.get("times"))})
    # the teacher is scored after its students, so that its students start training at once
    row = fid_rows(folder, root / f"teacher-{name}-eval.json", "--nfe", "35", args)[0]
    table.insert(0, {"teacher": name, "student": "teacher (Heun)", "steps": args.teacher_steps, "nfe": 35,
                     "fid": row["fid"], "precision": row["precision"], "recall": row["recall"],
                     "seconds": teacher_seconds, "pixels": pixel_scores(folder, args.num, None, args.device)})
    part = {"rows": table, "seconds": time.perf_counter() - begin}
    (root / f"part-{name}.json").write_text(json.dumps(part, indent=1))
    return part


def text_row(out: Path, args) -> list[dict]:
    """`benchmarks/text_digits.py`: the text teacher (CFG 2 against the empty prompt) and its student
    read as v and converted, scored by prompt accuracy at N samples."""
    import text_digits

    teacher_steps, student_steps = (int(n) for n in args.text_steps.split(","))
    return text_digits.run(out, teacher_steps, student_steps, args.num, student="v+convert",
                           convert_steps=args.convert_steps, convert_lr=args.convert_lr)


if __name__ == "__main__":
    main()
