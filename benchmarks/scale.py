"""Step time and memory of `fewstep.fit` across parallelism, compile and precision (issue 11).

One configuration (run it under torchrun for several processes):

    python benchmarks/scale.py --net unet --method sct --steps 20
    torchrun --standalone --nproc_per_node=2 benchmarks/scale.py --net dit --parallel fsdp --precision bf16

The whole grid (none / ddp / fsdp x compile off / on x fp32 / bf16, on a CIFAR-size UNet and a
DiT), each configuration in its own process group, as a table and JSON:

    python benchmarks/scale.py --sweep --device cuda --nproc 8 --out benchmarks/results/scale-gpu.json
    python benchmarks/scale.py --sweep --device cpu --nproc 2 --small --out benchmarks/results/scale-cpu.json

Step time: the median over the timed steps (after `--warmup` steps, which include compiling);
memory: `torch.cuda.max_memory_allocated` on CUDA, the peak RSS on CPU (process 0).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--net", default="unet", choices=["unet", "dit"])
    p.add_argument("--method", default="sct", choices=["flow", "sct"])
    p.add_argument("--parallel", default="none", choices=["none", "ddp", "fsdp"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=64, help="per process")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--small", action="store_true", help="CPU-sized networks (16x16 images, narrow)")
    p.add_argument("--sweep", action="store_true", help="run the whole grid, one process group each")
    p.add_argument("--nproc", type=int, default=2, help="--sweep: processes for ddp and fsdp")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def build_net(args):
    from fewstep.networks import DiT, UNet

    res, ch = (16, 32) if args.small else (32, 128)  # CIFAR-10 size: 32x32x3, 128 channels (EDM's DDPM++)
    if args.net == "unet":
        return UNet(3, res, ch, (1, 2, 2), 2, attn_resolutions=(res // 2,)), res
    return DiT(3, res, patch_size=2, hidden_size=2 * ch, depth=4 if args.small else 12, heads=4), res


def step_timer(device: str):
    """A `fit` callback that records the wall-clock of each optimizer step on process 0."""
    import torch

    from fewstep.training.fit import Callback

    class StepTimer(Callback):
        def __init__(self):
            self.times, self.last = [], None
            self.sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

        def on_step(self, run):
            self.sync()
            now = time.perf_counter()
            if self.last is not None:
                self.times.append(now - self.last)
            self.last = now

    return StepTimer()


def run_one(args) -> dict | None:
    import torch

    from fewstep import fit
    from fewstep.methods import SCT, FlowMatching

    torch.manual_seed(0)
    net, res = build_net(args)
    timer = step_timer(args.device)
    data = [torch.randn(args.batch, 3, res, res)] * 4
    out = tempfile.mkdtemp(prefix="fewstep-scale-")
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    try:
        fit(net, SCT() if args.method == "sct" else FlowMatching(), data, out, steps=args.warmup + args.steps,
            device=args.device, precision=args.precision, parallel=args.parallel, compile=args.compile,
            progress=False, ckpt_every=0, log_every=10 ** 6, callbacks=[timer])
    finally:
        shutil.rmtree(out, ignore_errors=True)
    if int(os.environ.get("RANK", "0")):
        return None
    if args.device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated()
    else:
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    timed = timer.times[args.warmup:] or timer.times
    return {"net": args.net, "method": args.method, "parallel": args.parallel, "compile": args.compile,
            "precision": args.precision, "processes": int(os.environ.get("WORLD_SIZE", "1")),
            "batch_per_process": args.batch, "params": sum(p.numel() for p in net.parameters()),
            "ms_per_step": 1e3 * statistics.median(timed), "peak_mib": peak / 2 ** 20}


def sweep(args) -> list[dict]:
    rows = []
    grid = itertools.product(("unet", "dit"), ("flow", "sct"), ("none", "ddp", "fsdp"), (False, True),
                             ("fp32", "bf16"))
    for net, method, parallel, compiled, precision in grid:
        if args.device == "cpu" and precision == "bf16":
            continue  # CPU bf16 autocast measures nothing a GPU user needs
        cmd = [sys.executable, __file__] if parallel == "none" else \
            [shutil.which("torchrun") or "torchrun", "--standalone", f"--nproc_per_node={args.nproc}", __file__]
        with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
            cmd += ["--net", net, "--method", method, "--parallel", parallel, "--precision", precision,
                    "--device", args.device, "--batch", str(args.batch), "--steps", str(args.steps),
                    "--warmup", str(args.warmup), "--out", tmp.name] + (["--compile"] if compiled else []) + \
                (["--small"] if args.small else [])
            res = subprocess.run(cmd, capture_output=True, text=True)
            row = json.loads(Path(tmp.name).read_text()) if res.returncode == 0 and Path(tmp.name).stat().st_size \
                else {"net": net, "method": method, "parallel": parallel, "compile": compiled,
                      "precision": precision, "error": res.stderr.strip().splitlines()[-1:] or ["failed"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main():
    args = parse_args()
    if args.sweep:
        rows = sweep(args)
        print(f"\n{'net':<5}{'method':<7}{'parallel':<9}{'compile':<8}{'prec':<6}{'ms/step':>9}{'peak MiB':>10}")
        for r in rows:
            print(f"{r['net']:<5}{r['method']:<7}{r['parallel']:<9}{str(r['compile']):<8}{r['precision']:<6}"
                  + (f"{r['ms_per_step']:>9.0f}{r['peak_mib']:>10.0f}" if "ms_per_step" in r else f"  {r['error']}"))
        result = rows
    else:
        result = run_one(args)
        if result is None:
            return
        print(json.dumps(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
