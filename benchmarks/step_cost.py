"""Cost of one training step: flow matching against sCT and MeanFlow with each JVP path.

Networks (`--net`): fewstep's UNet (`fewstep-unet`), an unmodified diffusers `UNet2DModel` of
about the same size with attention at the lowest resolution (`diffusers-unet`), and fewstep's
DiT (`dit`, patch 2, hidden 256, depth 6). Same network, same batch, full step (forward, loss, backward, optimizer step). Wall-clock is the
median of `--repeats` rounds in ONE process, after warmup, with the modes interleaved in each
round so that drift hits all of them alike. Peak memory is measured per mode in a fresh
subprocess: on CUDA `torch.cuda.max_memory_allocated`; on CPU the peak resident set size
(VmHWM), reported in total and as the growth over the process's size just before the first
step (weights, model and data already there) -- that growth is what the step itself needs
(gradients, Adam state, activations, workspaces). On CPU the probe fixes glibc's mmap threshold
(MALLOC_MMAP_THRESHOLD_=131072) so that freed tensors go back to the OS at once and the peak
RSS tracks the peak of live memory; with glibc's adaptive threshold the same run varies by
+-5% from one process to the next. OpenMP threads wait passively (see below), which keeps
wall-clock steady on a shared machine.

Modes:
  flow           TrigFlow flow matching (docs/math.md#trigflow)
  flow-split     the same, the batch run as two forwards split like MeanFlow's (`--r-neq-t`): the split's own cost
  sct-separate   sCT, torch.func.jvp in a no-grad pass + a separate graded forward
  sct-single     sCT, one grad-enabled forward-AD pass (dual tensors)
  sct-tangent    sCT, the tangent engine: one forward with tangents (`fewstep.jvp.engine`)
  sct-traced     sCT, the engine traced once into a joint primal+tangent graph (`fewstep.jvp.traced`)
  meanflow-tangent   MeanFlow (docs/math.md#meanflow), its JVP along (v, 0, 1) through the tangent engine
  meanflow-traced    MeanFlow, its JVP through the traced joint graph
  meanflow-separate  MeanFlow, torch.func.jvp in a no-grad pass + a separate graded forward
  meanflow-single    MeanFlow, one grad-enabled forward-AD pass
The MeanFlow modes train the same network built with `second_time=True` (its r embedding is the
only difference; fewstep's UNet and DiT, not the diffusers UNet). Only its samples with r != t
take the JVP (`--r-neq-t`, default 0.25 as in the paper); `--r-neq-t 1` prices a JVP on every sample.

Examples:
  python benchmarks/step_cost.py                                  # CPU: batch 32, 32x32, 64 channels
  python benchmarks/step_cost.py --device cuda --amp bf16 --batch 128 --out gpu.json
  python benchmarks/step_cost.py --modes flow sct-tangent --profile  # where the time goes
  python benchmarks/step_cost.py --modes flow meanflow-tangent meanflow-separate --threads 2
  python benchmarks/step_cost.py --modes flow meanflow-tangent --r-neq-t 1 --threads 2   # JVP on every sample
  python benchmarks/step_cost.py --net dit --threads 2 --out benchmarks/results/step_cost-dit-2t.json
  python benchmarks/step_cost.py --modes flow sct-traced --compile --threads 1   # inductor, both steps

`--compile` adds `<mode>+compile` for each mode, timed in the same rounds: the mode on
`torch.compile(net)`. The flow step's forward and backward are compiled, and so is the traced
joint graph (jvp compiles it for a compiled network); the tangent engine unwraps the compiled
network and stays eager. Compilation happens in the warmup steps; compiled modes get no memory
probe. Ratios: `x` to eager flow, `xc` to compiled flow.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning. On a machine shared with other jobs, spinning
# threads wait on descheduled peers and the same step varied 3x from round to round; with
# passive waiting it varies by a few percent. Set OMP_WAIT_POLICY yourself to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fewstep.methods import SCT, FlowMatching, MeanFlow  # noqa: E402
from fewstep.interop.diffusers.network import DiffusersNetwork  # noqa: E402
from fewstep.networks import DiT, UNet  # noqa: E402

MODES = ("flow", "flow-split", "sct-separate", "sct-single", "sct-tangent", "sct-traced", "meanflow-tangent", "meanflow-traced",
         "meanflow-separate", "meanflow-single")
NETS = ("fewstep-unet", "diffusers-unet", "dit")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--net", default="fewstep-unet", choices=NETS)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--img-channels", type=int, default=3)
    p.add_argument("--channels", type=int, default=64, help="UNet model channels")
    p.add_argument("--mult", type=int, nargs="+", default=[1, 2, 2], help="channel multipliers")
    p.add_argument("--blocks", type=int, default=2, help="residual blocks per level")
    p.add_argument("--attn", type=int, nargs="*", default=None,
                   help="attention resolutions (default: the lowest resolution)")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--depth", type=int, default=6, help="DiT blocks (DiT-B: 12)")
    p.add_argument("--heads", type=int, default=4, help="DiT heads (DiT-B: 12); hidden size is 4 x --channels")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per mode first")
    p.add_argument("--mem-steps", type=int, default=2, help="steps run by each memory probe")
    # Weights and data stay float32 (the methods draw t in float32); lower precision via autocast.
    p.add_argument("--amp", default="none", choices=["none", "bf16"], help="bf16 autocast (for GPUs)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--r-neq-t", type=float, default=0.25,
                   help="MeanFlow: fraction of the batch with r != t, the samples that take the JVP "
                        "(default 0.25, the paper's; 1: every sample)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table per mode")
    p.add_argument("--compile", action="store_true",
                   help="also time each mode on torch.compile(net) ('<mode>+compile'; the traced joint graph "
                        "is compiled too)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--probe-memory", default=None, choices=MODES, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------
# The step.


def build(args, second_time: bool = False):
    """The network (each mode trains its own copy) and the batch every step sees; `second_time`:
    the network MeanFlow trains (the same weights, plus its r embedding)."""
    if second_time and args.net == "diffusers-unet":
        raise RuntimeError("MeanFlow needs a network with a second time input r; the diffusers UNet has none")
    extra = {"second_time": True} if second_time else {}
    torch.manual_seed(args.seed)
    levels = len(args.mult)
    attn = args.attn if args.attn is not None else [args.resolution // 2 ** (levels - 1)]
    if args.net == "fewstep-unet":
        net = UNet(args.img_channels, args.resolution, args.channels, tuple(args.mult), args.blocks,
                   attn_resolutions=tuple(attn), dropout=args.dropout, **extra)
    elif args.net == "diffusers-unet":
        down = ["AttnDownBlock2D" if args.resolution // 2 ** i in attn else "DownBlock2D" for i in range(levels)]
        up = ["AttnUpBlock2D" if "Attn" in d else "UpBlock2D" for d in reversed(down)]
        net = DiffusersNetwork("UNet2DModel", {
            "sample_size": args.resolution, "in_channels": args.img_channels, "out_channels": args.img_channels,
            "block_out_channels": [args.channels * m for m in args.mult], "layers_per_block": args.blocks,
            "down_block_types": down, "up_block_types": up, "attention_head_dim": args.channels,
            "dropout": args.dropout})
    else:
        attn = ["all"]
        net = DiT(args.img_channels, args.resolution, patch_size=2, hidden_size=4 * args.channels, depth=args.depth,
                  heads=args.heads, dropout=args.dropout, **extra)
    # Weights as after some training: the zero-initialized output layers would make parts of
    # the backward trivially cheap.
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim > 1 and not p.abs().sum():
                torch.nn.init.normal_(p, std=1e-2)
    net = net.to(args.device)
    x0 = (torch.rand(args.batch, args.img_channels, args.resolution, args.resolution) * 2 - 1).to(args.device)
    return net, x0, attn


def make_step(label: str, net, x0, args):
    """One training step of `label`: a mode, or `<mode>+compile` (the same on `torch.compile(net)`)."""
    mode, compiled = label.removesuffix("+compile"), label.endswith("+compile")
    if mode == "flow":
        method = FlowMatching()
    elif mode == "flow-split":  # flow on MeanFlow's two parts of the batch: the price of the split alone
        flow, k = FlowMatching(), round(args.r_neq_t * x0.shape[0])

        def method(net, x0, labels, step):
            return torch.cat([flow(net, x0[:k], None, step)[0], flow(net, x0[k:], None, step)[0]]), {}
    elif mode.startswith("meanflow"):
        method = MeanFlow(jvp_mode=mode.split("-")[1], ratio_r_neq_t=args.r_neq_t)
    else:
        method = SCT(jvp_mode=mode.split("-")[1])
    opt = torch.optim.Adam(net.parameters(), lr=1e-5)
    if compiled:
        net = torch.compile(net, dynamic=False)

    def amp():
        return torch.autocast(x0.device.type, dtype=torch.bfloat16) if args.amp == "bf16" else nullcontext()
    sync = torch.cuda.synchronize if x0.device.type == "cuda" else (lambda: None)

    def attention_backend():
        """torch.func.jvp (separate, single) needs the math SDPA backend: the fused ones have no
        forward AD. The tangent engine runs on whatever backend the network picks."""
        if mode.endswith(("-separate", "-single")):
            from torch.nn.attention import SDPBackend, sdpa_kernel
            return sdpa_kernel(SDPBackend.MATH)
        return nullcontext()
    step_no = [0]

    def step():
        opt.zero_grad(set_to_none=True)
        with amp(), attention_backend():
            loss, _ = method(net, x0, None, step_no[0])
        loss.mean().backward()
        opt.step()
        step_no[0] += 1
        sync()

    return step


# ------------------------------------------------------------------------------------------------
# Memory: one fresh process per mode.


def _proc_status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def probe_memory(args) -> dict:
    net, x0, _ = build(args, second_time=args.probe_memory.startswith("meanflow"))
    step = make_step(args.probe_memory, net, x0, args)
    if x0.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for _ in range(args.mem_steps):
            step()
        peak = torch.cuda.max_memory_allocated()
    else:
        base = (_proc_status_kib("VmRSS") or 0) * 1024
        for _ in range(args.mem_steps):
            step()
        hwm = _proc_status_kib("VmHWM")
        if hwm is None:  # not Linux: ru_maxrss (KiB on Linux, bytes on macOS)
            import resource
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            hwm = rss // 1024 if platform.system() == "Darwin" else rss
        peak = hwm * 1024
    return {"peak_bytes": peak, "step_bytes": peak - base}


def run_memory_probe(mode: str, argv: list[str]) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--probe-memory", mode]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "131072")}
    res = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"memory probe for {mode} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------


OP_KINDS = (  # (kind, op-name fragments), first match wins: the profile summed per kind of work
    ("convolution", ("conv",)),
    ("matmul", ("addmm", "aten::mm", "bmm", "matmul", "linear", "attention")),
    ("normalization", ("norm",)),
    ("optimizer", ("foreach", "adam", "lerp", "addcdiv", "addcmul")),
    ("elementwise", ("mul", "add", "sub", "div", "silu", "gelu", "sigmoid", "tanh", "exp", "sin", "cos",
                     "neg", "pow", "sqrt", "rsqrt", "where", "clamp", "copy", "fill", "zero", "cat", "sum",
                     "mean", "threshold", "relu", "softmax", "rand", "bernoulli", "dropout")),
)


def op_kinds(self_us: dict[str, float]) -> dict[str, float]:
    """Per-op self times (us) summed into the kinds of `OP_KINDS` (ms); the rest is `other`."""
    out = {kind: 0.0 for kind, _ in OP_KINDS} | {"other": 0.0}
    for op, us in self_us.items():
        name = op.lower()
        kind = next((k for k, frags in OP_KINDS if any(f in name for f in frags)), "other")
        out[kind] += us / 1e3
    return out


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.probe_memory:
        print(json.dumps(probe_memory(args)))
        return

    net, x0, attn = build(args)
    n_params = sum(p.numel() for p in net.parameters())
    failed = {}  # e.g. torch.func.jvp under CPU bf16 autocast raises a dtype mismatch
    two_time = None
    if any(m.startswith("meanflow") for m in args.modes):
        try:
            two_time = build(args, second_time=True)[0]
            two_time.load_state_dict(net.state_dict(), strict=False)  # the same weights, plus the r embedding
        except RuntimeError as err:
            for mode in (m for m in args.modes if m.startswith("meanflow")):
                failed[mode] = str(err)
    steps = {}
    labels = list(args.modes) + ([m + "+compile" for m in args.modes] if args.compile else [])
    for mode in labels:
        if mode.removesuffix("+compile") not in failed:
            steps[mode] = make_step(mode, copy.deepcopy(two_time if mode.startswith("meanflow") else net), x0, args)
    device_name = (torch.cuda.get_device_name() if x0.device.type == "cuda"
                   else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    print(f"{args.net} {n_params / 1e6:.2f}M params, {args.resolution}x{args.resolution}x{args.img_channels}, "
          f"channels {args.channels} x {tuple(args.mult)}, attention at {attn}, batch {args.batch}, "
          f"amp {args.amp}, on {device_name}")

    for mode in (m for m in labels if m.removesuffix("+compile") not in failed):
        try:
            for _ in range(max(1, args.warmup)):
                steps[mode]()
        except RuntimeError as err:
            failed[mode] = str(err).strip().splitlines()[0][:160]
            print(f"  {mode} failed: {failed[mode]}")
    modes = [m for m in labels if m not in failed and m.removesuffix("+compile") not in failed]
    if not modes:
        raise SystemExit("every mode failed")
    times = {mode: [] for mode in modes}
    cpu_times = {mode: [] for mode in modes}
    for r in range(args.repeats):
        for mode in modes:
            t0, c0 = time.perf_counter(), time.process_time()
            steps[mode]()
            times[mode].append(time.perf_counter() - t0)
            cpu_times[mode].append(time.process_time() - c0)
        print(f"  round {r + 1}/{args.repeats}: " +
              ", ".join(f"{m} {times[m][-1] * 1e3:.0f} ms" for m in modes), flush=True)

    memory = {}
    if not args.no_memory:
        for mode in (m for m in modes if not m.endswith("+compile")):
            memory[mode] = run_memory_probe(mode, [a for a in argv if a != "--compile"])

    results = {}
    ref = "flow" if "flow" in modes else modes[0]
    ref_ms = statistics.median(times[ref]) * 1e3
    ref_cpu = statistics.median(cpu_times[ref]) * 1e3
    for mode in modes:
        ms, cpu = statistics.median(times[mode]) * 1e3, statistics.median(cpu_times[mode]) * 1e3
        best = min(times[mode]) * 1e3
        row = {"ms_per_step": ms, "ms_all": [t * 1e3 for t in times[mode]], "time_ratio": ms / ref_ms,
               "best_ms": best, "best_ratio": best / (min(times[ref]) * 1e3),
               "cpu_ms_per_step": cpu, "cpu_ratio": cpu / ref_cpu}
        if mode.endswith("+compile") and "flow+compile" in times:
            row["compiled_ratio"] = ms / (statistics.median(times["flow+compile"]) * 1e3)
        if mode in memory:
            row.update(memory[mode])
            row["peak_ratio"] = memory[mode]["peak_bytes"] / memory[ref]["peak_bytes"]
            row["step_ratio"] = memory[mode]["step_bytes"] / memory[ref]["step_bytes"]
        results[mode] = row

    mib = 2.0 ** 20
    print(f"\n{'mode':<22}{'ms/step':>9}{'x':>6}{'xc':>6}{'best ms':>9}{'x':>6}{'cpu ms':>9}{'x':>6}"
          f"{'peak MiB':>10}{'x':>6}{'step MiB':>10}{'x':>6}")
    for mode, row in results.items():
        mem = (f"{row['peak_bytes'] / mib:>10.0f}{row['peak_ratio']:>6.2f}{row['step_bytes'] / mib:>10.0f}"
               f"{row['step_ratio']:>6.2f}" if "peak_bytes" in row else "")
        xc = f"{row['compiled_ratio']:>6.2f}" if "compiled_ratio" in row else " " * 6
        print(f"{mode:<22}{row['ms_per_step']:>9.0f}{row['time_ratio']:>6.2f}{xc}{row['best_ms']:>9.0f}"
              f"{row['best_ratio']:>6.2f}{row['cpu_ms_per_step']:>9.0f}{row['cpu_ratio']:>6.2f}{mem}")
    for mode, err in failed.items():
        print(f"{mode:<18}failed: {err}")
        results[mode] = {"error": err}
    print(f"x: ratio to {ref}; xc: ratio to flow+compile. ms/step: median wall-clock; best ms: fastest round; "
          "cpu ms: median process CPU time (all threads)")
    if memory:
        print("peak: " + ("torch.cuda.max_memory_allocated" if x0.device.type == "cuda" else "peak RSS")
              + " of a fresh process running that mode; step: its growth over the "
              + ("allocation" if x0.device.type == "cuda" else "RSS") + " just before the first step")

    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x0.device.type == "cuda" else [])
        key = "cuda_time_total" if x0.device.type == "cuda" else "self_cpu_time_total"
        for mode in modes:
            with profile(activities=acts) as prof:
                steps[mode]()
            print(f"\n== {mode} ==")
            print(prof.key_averages().table(sort_by=key, row_limit=15))
            # per-op self time (us) in the JSON: compare thread counts or modes op by op
            own = {e.key: getattr(e, key) for e in prof.key_averages() if getattr(e, key) > 0}
            results[mode]["profile_self_us"] = own
            results[mode]["profile_by_kind_ms"] = by_kind = op_kinds(own)
            print("self time by kind (ms): " + ", ".join(f"{k} {v:.0f}" for k, v in by_kind.items()))

    if args.out:
        out = {"config": {k: v for k, v in vars(args).items() if k not in ("out", "probe_memory")},
               "params": n_params, "attn_resolutions": attn, "device": device_name,
               "torch": torch.__version__, "threads": torch.get_num_threads(), "reference": ref,
               "results": results}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
