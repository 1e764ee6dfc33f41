"""Speed and memory of attention with its forward-mode tangent (docs/math.md#attention-tangent-rule).

Each mode computes the attention output AND its tangent along random (q', k', v'), no backward:
  func-jvp   `torch.func.jvp` of math attention written out (softmax(q k^T s) v); O(L S) memory
  math       `attention_with_tangent(..., backend="math")`: SDPA primal + math tangent (fp32); O(L S)
  triton     `attention_with_tangent(..., backend="triton")`: SDPA primal + fused kernel; O(L)

Wall-clock is the median of `--repeats` timed calls after `--warmup` calls. Peak memory (CUDA) is
`torch.cuda.max_memory_allocated` during one call, minus what was allocated before it (inputs
and tangents); on CPU it is not measured. `err` is the largest |out_dot - ref| / max |ref|, with ref
the math tangent in float32 from the same (rounded) inputs.

Examples:
  python benchmarks/attention_jvp.py --device cuda                      # L = 256..4096, 8 heads, d 64, bf16
  python benchmarks/attention_jvp.py --device cuda --causal --dtype fp16
  python benchmarks/attention_jvp.py --device cpu --backend math        # smoke test at tiny sizes
"""

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fewstep.jvp.attention import attention_tangent_math, attention_with_tangent  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BACKENDS = {"all": ("func-jvp", "math", "triton"), "math": ("func-jvp", "math"), "triton": ("triton",)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda or cpu (default cuda)")
    p.add_argument("--backend", default="all", choices=tuple(BACKENDS),
                   help="all: the three modes; math: func-jvp and math (no Triton); triton: the kernel only")
    p.add_argument("--lengths", type=int, nargs="+", help="sequence lengths L = S (default 256..4096 on "
                   "cuda, 32 64 128 on cpu)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default=None, choices=tuple(DTYPES), help="default bf16 on cuda, fp32 on cpu")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/attention_jvp-<device>.json)")
    return p.parse_args(argv)


def math_attention(q, k, v, is_causal):
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if is_causal:
        keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def make_call(mode, primals, tangents, causal):
    if mode == "func-jvp":
        return lambda: torch.func.jvp(lambda q, k, v: math_attention(q, k, v, causal), primals, tangents)
    return lambda: attention_with_tangent(*primals, *tangents, is_causal=causal, backend=mode)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(call, device, warmup, repeats):
    """(median ms, peak MiB over the inputs or None, out_dot of the last call)."""
    for _ in range(warmup):
        call()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    peak = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out_dot = call()[1]
        sync(device)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        out_dot = call()[1]
    return statistics.median(times), peak, out_dot


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    lengths = args.lengths or ([256, 512, 1024, 2048, 4096] if device.type == "cuda" else [32, 64, 128])
    modes = BACKENDS[args.backend]
    rows = []
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():  # forward-mode AD does not need autograd's graph
        for n in lengths:
            shape = (args.batch, args.heads, n, args.head_dim)
            primals = tuple(torch.randn(shape, device=device, dtype=dtype, generator=gen) for _ in range(3))
            tangents = tuple(torch.randn(shape, device=device, dtype=dtype, generator=gen) for _ in range(3))
            ref = attention_tangent_math(*(x.float() for x in primals + tangents), is_causal=args.causal)
            scale_ref = ref.abs().max().item()
            del ref
            for mode in modes:
                row = {"mode": mode, "length": n}
                try:
                    ms, mib, out_dot = measure(make_call(mode, primals, tangents, args.causal), device,
                                               args.warmup, args.repeats)
                    ref = attention_tangent_math(*(x.float() for x in primals + tangents), is_causal=args.causal)
                    row |= {"ms": ms, "peak_mib": mib, "err": (out_dot.float() - ref).abs().max().item() / scale_ref}
                    del out_dot, ref
                except torch.cuda.OutOfMemoryError:
                    row |= {"ms": None, "peak_mib": None, "err": None, "error": "out of memory"}
                except RuntimeError as e:  # e.g. Triton missing or the shape unsupported
                    row |= {"ms": None, "peak_mib": None, "err": None, "error": str(e).splitlines()[0]}
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                rows.append(row)
                print(format_row(row), flush=True)

    result = {
        "config": {k: v for k, v in vars(args).items() if k != "out"} | {"dtype": str(dtype), "lengths": lengths},
        "env": environment(device),
        "rows": rows,
    }
    out = Path(args.out or Path(__file__).parent / "results" / f"attention_jvp-{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


def format_row(row):
    if row.get("error"):
        return f"{row['mode']:>9} L={row['length']:>5}  {row['error']}"
    mem = "      n/a" if row["peak_mib"] is None else f"{row['peak_mib']:9.1f}"
    return f"{row['mode']:>9} L={row['length']:>5}  {row['ms']:9.3f} ms  {mem} MiB  err {row['err']:.2e}"


def environment(device):
    env = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine()}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


if __name__ == "__main__":
    main()
