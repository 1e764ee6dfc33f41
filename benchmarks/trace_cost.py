"""Cost of tracing the joint primal+tangent graph (`fewstep.jvp.traced`), with and without the
fake-tensor node metadata that make_fx builds by default (the trace skips it: nothing reads it).

    OMP_NUM_THREADS=1 python benchmarks/trace_cost.py --rounds 3

The network is the tiny UNet of the tests (`tests/helpers.py`), batch 4, float32; each round
traces a fresh network once per variant, interleaved. CPU seconds are the figure to compare on a
shared machine (wall seconds grow with the load).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import tiny_unet  # noqa: E402

from fewstep.jvp import jvp, traced  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=4)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    traced.TRACE_AT_CALL = 1
    skip = traced._no_node_metadata
    x, t = torch.randn(args.batch, 2, 8, 8), torch.rand(args.batch)
    jvp(tiny_unet(), (x, t), (x, 1.0))  # the tracer's imports, outside the timings
    times: dict[str, list] = {"with metadata": [], "without (default)": []}
    for _ in range(args.rounds):
        for name in times:
            traced._no_node_metadata = contextlib.nullcontext if name == "with metadata" else skip
            net = tiny_unet()
            cpu, wall = time.process_time(), time.perf_counter()
            jvp(net, (x, t), (x, 1.0))
            times[name].append((time.process_time() - cpu, time.perf_counter() - wall))
    traced._no_node_metadata = skip
    nodes = len(next(iter(traced.runner_of(net).graphs.values()))[0].graph.nodes)
    print(f"graph: {nodes} nodes after dead-code removal")
    for name, runs in times.items():
        print(f"{name:18s} CPU s {[round(c, 2) for c, _ in runs]}  wall s {[round(w, 2) for _, w in runs]}")


if __name__ == "__main__":
    main()
