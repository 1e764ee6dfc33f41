"""Which recipe gives the best 1- and 2-step digits in the demo's budget? (issue 13; docs/results.md)

Every recipe gets the same wall clock on the machine it runs on (default 480 s: the README's
"about 8 minutes on 2 CPU cores"). Step counts come from a calibration at the start: each kind of
step is timed on the digits UNet, and a stage of S seconds runs S / (seconds per step) steps. Recipes:

    sct          sCT from scratch (the 0.2 default)
    meanflow     MeanFlow from scratch
    flow+sct     flow matching for half the budget, then sCT from its weights (train.init_from)
    flow+ect     flow matching for half the budget, then ECT from its weights
    flow+scd     flow matching for half the budget as the teacher, then sCD
    flow+dmd2    the same teacher, then DMD2 (a 1-step generator against a fake score, 5 fake updates per step)
    flow+rcm     the same teacher, then rCM (sCD plus the DMD term, lambda = 1 after 100 warmup steps)
    flow         flow matching for the whole budget, sampled with Heun at 35 NFE (the reference)

The half-budget flow run is trained once and shared by the two-stage recipes. Each model is
scored by `fewstep eval` (FID / KID / precision / recall, N = 1,000 against all 1,797 digits) and by
the digits pixel precision/recall of `metrics.json`.

    python benchmarks/demo_recipes.py --out runs/recipes [--budget 480] [--only sct,flow]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

LR = {"flow": 2e-3, "sct": 2e-3, "meanflow": 2e-3, "tune-sct": 1e-4, "tune-ect": 1e-4, "tune-scd": 5e-5,
      "tune-dmd2": 5e-5, "tune-rcm": 5e-5}
# The distribution-matching recipes' own options (their fake score's lr is method.fake_lr).
DMD2 = ("--set", "method.fake_lr=1e-4")
RCM = ("--set", "method.warmup_steps=500", "--set", "method.dmd_warmup_steps=100", "--set", "method.fake_lr=1e-4")
# The recipes, in the order of the table (`--only` picks; "a+b": a's half budget, then b's from it).
RECIPES = ("sct", "meanflow", "flow", "flow+sct", "flow+ect", "flow+scd", "flow+dmd2", "flow+rcm")


def fewstep(*args: str, log: Path) -> float:
    """Run `fewstep ARGS` to completion (output to `log`); returns the wall-clock seconds."""
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "fewstep", *args], stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"fewstep {' '.join(args)} failed; see {log}")
    return time.perf_counter() - start


def train(out: Path, method: str, steps: int, lr: float, *extra: str) -> float:
    return fewstep("train", "--preset", "digits", "--method", method, "--steps", str(steps), "--lr", str(lr),
                   "--out", str(out), "--set", "train.progress=false", "--set", f"train.sample_every={steps}",
                   "--set", f"train.ckpt_every={steps}", *extra, log=out.with_suffix(".log"))


def seconds_per_step(out: Path, method: str, lr: float, *extra: str, steps: int = 60) -> float:
    """Time `steps` steps after 20 warm-up steps (the second run resumes the first)."""
    quick = ("--set", "train.num_samples=4", "--set", "train.log_every=10")
    train(out, method, 20, lr, *quick, *extra)
    seconds = train(out, method, 20 + steps, lr, *quick, *extra)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    rates = [r["steps_per_s"] for r in records if r.get("step", 0) > 20 and "steps_per_s" in r]
    return 1.0 / (sum(rates) / len(rates)) if rates else seconds / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--budget", type=float, default=480.0, help="seconds per recipe")
    p.add_argument("--only", default=None, help="comma-separated recipes")
    p.add_argument("--no-eval", action="store_true")
    args = p.parse_args()
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    state_path = root / "recipes.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}

    def save():
        state_path.write_text(json.dumps(state, indent=1))

    cal = root / "calibration"
    kinds = {"flow": (LR["flow"],), "sct": (LR["sct"],), "meanflow": (LR["meanflow"],),
             "ect": (LR["tune-ect"], "--teacher", str(cal / "flow")),
             "scd": (LR["tune-scd"], "--teacher", str(cal / "flow")),
             "dmd2": (LR["tune-dmd2"], "--teacher", str(cal / "flow"), *DMD2),
             "rcm": (LR["tune-rcm"], "--teacher", str(cal / "flow"), *RCM)}
    names = args.only.split(",") if args.only else list(RECIPES)
    if unknown := [n for n in names if n not in RECIPES]:
        raise SystemExit(f"unknown recipe(s) {', '.join(unknown)}; known: {', '.join(RECIPES)}")
    # calibrate only the kinds the chosen recipes train; a distilling kind's teacher is the flow run
    needed = {kind for n in names for kind in n.split("+")}
    needed |= {"flow"} if needed - {"flow", "sct", "meanflow"} else set()
    c = state.setdefault("calibration", {})
    if any(kind not in c for kind in needed):  # seconds per step of each kind, on this machine, now
        cal.mkdir(exist_ok=True)
        for kind, (lr, *extra) in kinds.items():
            if kind in needed and kind not in c:  # a calibration written before a kind existed gains it
                c[kind] = seconds_per_step(cal / kind, kind, lr, *extra)
        save()
        print("seconds per step:", json.dumps(c), flush=True)
    cal, budget = state["calibration"], args.budget
    steps = {k: int(budget / cal[k]) if k in cal else 0 for k in kinds}  # 0: a kind no chosen recipe trains
    half = {k: int(budget / 2 / cal[k]) if k in cal else 0 for k in kinds}
    plan = {
        "sct": [("sct", "sct", steps["sct"], LR["sct"], ())],
        "meanflow": [("meanflow", "meanflow", steps["meanflow"], LR["meanflow"], ())],
        "flow": [("flow", "flow", steps["flow"], LR["flow"], ())],
        "flow+sct": [("flow-half", "flow", half["flow"], LR["flow"], ()),
                     ("flow+sct", "sct", half["sct"], LR["tune-sct"], ("--set", f"train.init_from={root / 'flow-half'}"))],
        "flow+ect": [("flow-half", "flow", half["flow"], LR["flow"], ()),
                     ("flow+ect", "ect", half["ect"], LR["tune-ect"], ("--teacher", str(root / "flow-half")))],
        "flow+scd": [("flow-half", "flow", half["flow"], LR["flow"], ()),
                     ("flow+scd", "scd", half["scd"], LR["tune-scd"], ("--teacher", str(root / "flow-half")))],
        "flow+dmd2": [("flow-half", "flow", half["flow"], LR["flow"], ()),
                      ("flow+dmd2", "dmd2", half["dmd2"], LR["tune-dmd2"], ("--teacher", str(root / "flow-half"), *DMD2))],
        "flow+rcm": [("flow-half", "flow", half["flow"], LR["flow"], ()),
                     ("flow+rcm", "rcm", half["rcm"], LR["tune-rcm"], ("--teacher", str(root / "flow-half"), *RCM))],
    }
    assert tuple(plan) == RECIPES
    runs = state.setdefault("runs", {})
    for name in names:
        for run, method, n, lr, extra in plan[name]:
            if run in runs:
                continue
            seconds = train(root / run, method, n, lr, *extra)
            runs[run] = {"method": method, "steps": n, "lr": lr, "seconds": seconds,
                         "metrics": json.loads((root / run / "metrics.json").read_text()).get("metrics", {})}
            save()
            print(f"{run}: {method} {n} steps in {seconds:.0f} s", flush=True)
        if args.no_eval:
            continue
        run = plan[name][-1][0]
        if "eval" in runs[run]:
            continue
        eval_args = ["--nfe", "35"] if name == "flow" else ["--steps", "1,2"]
        fewstep("eval", str(root / run), *eval_args, "--num", "1000", "--out", str(root / f"eval-{run}.json"),
                log=root / f"eval-{run}.log")
        rows = json.loads((root / f"eval-{run}.json").read_text())["rows"]
        runs[run]["eval"] = [{k: r.get(k) for k in ("nfe", "fid", "kid", "precision", "recall")} for r in rows]
        save()
        print(f"{run}: " + ", ".join(f"NFE {r['nfe']} FID {r['fid']:.2f}" for r in rows), flush=True)


if __name__ == "__main__":
    main()
