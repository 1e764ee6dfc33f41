"""`fewstep plot`: the command line of `fewstep.apps.plot`."""

from __future__ import annotations

import sys

from fewstep.cli.common import add_import, command, count, one_line

EXAMPLES = """examples:
  fewstep plot runs/digits                      # training_curves.png, eval plot and sample grids in runs/digits
  fewstep plot runs/digits/eval.json            # eval_vs_nfe.png and eval-<sampler>-nfe<k>.png beside it
  fewstep plot runs/sct/eval.json runs/flow/eval.json --out plots/   # both on one score-vs-NFE plot
  fewstep plot runs/digits --no-samples
  fewstep plot runs/mine --import mynets.py     # sample grids of a network of your own

A run folder gives its log.jsonl as curves (loss, mse, grad_norm, w_mean, lr, ...), its eval.json
as score-vs-NFE plots, and sample grids from its latest checkpoint (EMA weights).
"""


def add_parser(sub) -> None:
    p = command(sub, "plot", help="plot a run's training curves, an eval's scores vs NFE, sample grids",
                description="Write PNG plots of run folders, log.jsonl files and eval JSONs.", epilog=EXAMPLES)
    p.add_argument("paths", nargs="+", help="run folders, log.jsonl files or eval JSONs")
    p.add_argument("--out", default=None, help="output folder (default: next to each input)")
    p.add_argument("--no-samples", action="store_true", help="no sample grids")
    p.add_argument("--num", type=count(1), default=64, help="images per sample grid (default 64)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    add_import(p)
    p.set_defaults(func=run)


def _skipped(path, error) -> None:
    print(f"fewstep plot: no sample grids for {path}: {one_line(error)}", file=sys.stderr)


def run(args) -> int:
    from fewstep.apps.plot import plot_paths

    written = plot_paths(args.paths, args.out, samples=not args.no_samples, num=args.num, device=args.device,
                         on_skip=_skipped)
    for p in written:
        print(f"wrote {p}")
    return 0
