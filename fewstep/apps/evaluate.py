"""Evaluation (docs/math.md#evaluation-protocol): what `fewstep eval`, `ref-stats` and `search-times` run (their command
lines are in `fewstep.cli.evaluate`).

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
EDM) use a probability-flow ODE solver from `fewstep.core.ode` (`--sampler heun --steps 18`, or
`--nfe 35`). `seconds` is the wall time of sampling alone.

    result = evaluate("runs/digits", steps=[1, 2], num=1000)
    print(format_table(result))
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from fewstep.data import DataError, Dataset, load_dataset
from fewstep.devices import resolve_device
from fewstep.training.distributed import DistInfo, barrier, broadcast_object, gather_batches, gather_objects
from fewstep.apps.generate import generate, load_model
from fewstep.image import to_uint8

IMAGE_METRICS = ("fid", "kid", "precision", "recall")
VECTOR_METRICS = ("sliced_wasserstein", "mmd", "energy_distance")
PR_K = 3
KID_SUBSET = 1000
KID_SUBSETS = 100
# The protocol of the papers' tables (EDM's `fid.py`; the CM, sCM and ECT papers): 50,000 samples against
# the training images' statistics, FID alone, sampled with three seeds, the minimum reported with its spread.
PAPER_PROTOCOL = {"num": 50_000, "seeds": [0, 1, 2], "default_split": "train", "fid_only": True}


# ----------------------------------------------------------------------------------------------
# References: the dataset, and its cached feature statistics


def load_reference(spec: str, split: str | None = None, *, resolution: int | None = None,
                   channels: int | None = None, download: bool = False,
                   default_split: str = "test") -> tuple[Dataset, str | None]:
    """A reference dataset and the split used: `split`, else `default_split` where the dataset has one."""
    opts = {k: v for k, v in (("resolution", resolution), ("channels", channels)) if v is not None}
    if download:
        opts["download"] = True
    if split is not None:
        return load_dataset(spec, split=split, **opts), split
    try:
        return load_dataset(spec, split=default_split, **opts), default_split
    except DataError as e:
        if "'split'" not in str(e):  # the dataset has splits, but the test files are missing
            raise
    return load_dataset(spec, **opts), None


def training_data(model) -> dict:
    """The `data` section of a checkpoint's run config (empty for a network trained by `fit` on
    data of the user's own); for a latent model, the pixel dataset that was encoded."""
    if getattr(model, "latents", None):
        return model.latents.get("source") or {}
    return model.config.get("data") or {}


def reference_name(model, ref: str | None = None) -> str:
    """`ref`, else the dataset the checkpoint was trained on."""
    name = ref or training_data(model).get("name")
    if not name:
        raise ValueError(f"{model.checkpoint} records no training dataset (trained by fit on data of its own); "
                         f"name the reference dataset (--ref)")
    return name


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
    """The first `limit` images (all when None) as uint8, read a chunk at a time."""
    for x, _ in dataset.batches(chunk, limit):
        yield to_uint8(x)


def first_examples(dataset: Dataset, num: int, chunk: int = 4096) -> torch.Tensor:
    """The dataset's first `num` examples (its fixed draw for on-the-fly data), reading no more."""
    return torch.cat([x for x, _ in dataset.batches(chunk, num)])


def reference_image_stats(dataset: Dataset, spec: str, split: str | None, extractor, *,
                          num: int | None = None, channels: int | None = None, cache_dir=None,
                          refresh: bool = False, progress: bool = True, keep_features: bool = True):
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
                            num_images=num, refresh=refresh, progress=progress, keep_features=keep_features)
    path = reference_stats_path(_ref_key(spec, channels), split_key, resolution, extractor, num, cache_dir)
    return stats, path, not computed


class Scorer:
    """Scores samples in two halves: `features(samples)`, which each process runs on its own
    batches (image features; vectors are their own features), and `scores(features)` of all the
    features together, which process 0 runs on what it gathered. `scorer(samples)` does both."""

    def __init__(self, features, scores):
        self.features, self.scores = features, scores

    def __call__(self, samples: torch.Tensor) -> dict:
        return self.scores(self.features(samples))


def _image_scores(feats: torch.Tensor, ref_stats, seed: int, progress: bool,
                  metrics: tuple[str, ...] = IMAGE_METRICS) -> dict:
    from fewstep.metrics import FeatureStats, fid, kid, precision_recall

    fake = FeatureStats.from_features(feats)
    out = {"fid": fid(fake, ref_stats)}
    real = ref_stats.features
    if "kid" in metrics:
        out["kid"] = kid(feats, real, KID_SUBSETS, KID_SUBSET, seed, progress=progress)
    if "precision" in metrics or "recall" in metrics:
        # Precision / recall on equal set sizes: the k-NN radii shrink as a set grows.
        m = min(len(feats), len(real))
        pick = np.random.default_rng(seed).choice(len(real), m, replace=False) if m < len(real) else slice(None)
        out["precision"], out["recall"] = precision_recall(real[pick], feats[:m].numpy(), PR_K)
    return out


def _vector_scores(samples: torch.Tensor, ref: torch.Tensor) -> dict:
    from fewstep.metrics import energy_distance, mmd, sliced_wasserstein

    return {"sliced_wasserstein": sliced_wasserstein(samples, ref), "mmd": mmd(samples, ref),
            "energy_distance": energy_distance(samples, ref)}


# ----------------------------------------------------------------------------------------------
# Evaluation


def prepare_scoring(model, *, num: int, ref: str | None = None, split: str | None = None,
                    ref_num: int | None = None, features: str = "inception", extractor=None,
                    inception_weights: str | Path | None = None, device=None, download: bool = False,
                    cache_dir=None, seed: int = 0, progress: bool = True, fid_only: bool = False,
                    default_split: str = "test"):
    """The reference of `model`'s samples and a scorer for them: returns `(info, score)` where
    `info` describes the reference and protocol (JSON-ready) and `score(samples) -> {metric: value}`
    (a `Scorer`, whose halves `evaluate` splits over processes). `fid_only`: images are scored by
    FID alone (the papers' tables; precision/recall of 50,000 against 50,000 costs far more)."""
    data = training_data(model)
    ref_spec = reference_name(model, ref)
    ref_ds, ref_split = load_reference(ref_spec, split, resolution=data.get("resolution"),
                                       channels=data.get("channels"), download=download, default_split=default_split)
    if ref_ds.kind != model.kind:
        raise ValueError(f"the checkpoint generates {model.kind}s {model.shape} but reference {ref_spec!r} "
                         f"holds {ref_ds.kind}s {ref_ds.shape}")
    info = {}
    if model.kind == "image":
        if len(ref_ds) < 2:
            raise ValueError(f"reference {ref_spec!r} holds fewer than 2 images")
        extractor = extractor or make_extractor(features, inception_weights, device or model.device, download)
        metrics = ("fid",) if fid_only else IMAGE_METRICS
        ref_stats, path, hit = reference_image_stats(ref_ds, ref_spec, ref_split, extractor, num=ref_num,
                                                     channels=data.get("channels"), keep_features=not fid_only,
                                                     cache_dir=cache_dir, progress=progress)
        info["reference"] = {"name": ref_spec, "split": ref_split, "num": ref_stats.num,
                             "stats": str(path), "cached": hit}
        info["features"] = {"name": extractor.name, "sha256": extractor.sha256, "dim": extractor.dim}
        info["metrics"] = list(metrics)
        info["protocol"] = f"FID on all {ref_stats.num} reference features (covariance with N - 1)" + (
            "" if fid_only else f"; KID: {KID_SUBSETS} subsets of min({KID_SUBSET}, N); precision/recall "
                                f"k={PR_K} on equal-size sets")
        return info, Scorer(lambda x: extractor(to_uint8(x), progress=False),
                            lambda feats: _image_scores(feats, ref_stats, seed, progress, metrics))
    if model.shape != ref_ds.shape:
        raise ValueError(f"the checkpoint generates vectors {model.shape}, reference {ref_spec!r} "
                         f"holds {ref_ds.shape}")
    ref_x = first_examples(ref_ds, ref_num or num)  # equal sizes by default: O(N^2) pairs, as in training
    info["reference"] = {"name": ref_spec, "split": ref_split, "num": len(ref_x)}
    info["metrics"] = list(VECTOR_METRICS)
    info["protocol"] = ("model space, equal set sizes; sliced Wasserstein p=2, 512 directions; "
                        "MMD^2 RBF mixture (median x 0.5, 1, 2); energy distance")
    return info, Scorer(lambda x: x, lambda x: _vector_scores(x, ref_x))


def _sample_and_score(model, schedule, num, batch_size, seed, guidance, progress, score,
                      distributed: DistInfo | None = None) -> dict:
    """One table row. Each process samples its batches (`generate`'s split) and extracts their
    features batch by batch, as they are made (50,000 samples at 512 px would not fit in memory);
    process 0 gathers the features in batch order and scores them, so the row equals a single
    process's bit for bit. Every process returns the row."""
    dist_info = distributed or DistInfo()
    feats, finite, feature_seconds = [], [True], [0.0]

    def features(batch: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        finite[0] = finite[0] and bool(torch.isfinite(batch).all())
        if finite[0]:
            feats.append(score.features(batch).cpu())
        feature_seconds[0] += time.perf_counter() - t0
        return batch[:0]  # nothing of the samples is kept

    _, used_nfe, seconds = generate(model, schedule, num, batch_size, seed, guidance, progress,
                                    rank=dist_info.rank, world_size=dist_info.world_size, transform=features)
    status = gather_objects((finite[0], used_nfe, seconds - feature_seconds[0], feature_seconds[0]), dist_info)
    if not all(s[0] for s in status):
        raise ValueError(f"{model.method_name} {schedule.sampler} with {schedule.steps} steps produced "
                         f"non-finite samples")
    feats = gather_batches(feats, dist_info, main_only=True)
    row = None
    if dist_info.is_main:
        t0 = time.perf_counter()
        scores = score.scores(torch.cat(feats))
        row = {"method": model.method_name, **schedule.to_dict(), "nfe": max(s[1] for s in status),
               "seed": seed, **{k: float(v) for k, v in scores.items()}, "seconds": max(s[2] for s in status),
               "metric_seconds": max(s[3] for s in status) + time.perf_counter() - t0}
    return broadcast_object(row, dist_info)


def over_seeds(rows: list[dict], metrics: list[str]) -> dict:
    """One table row from one schedule sampled with several seeds, as EDM's tables report it: the
    values of the seed with the lowest first metric (FID), `spread` {metric: {min, mean, max}} over
    the seeds, and every seed's values in `per_seed`."""
    best = min(rows, key=lambda r: r[metrics[0]])
    spread = {m: {"min": min(r[m] for r in rows), "mean": float(np.mean([r[m] for r in rows])),
                  "max": max(r[m] for r in rows)} for m in metrics}
    per_seed = [{"seed": r["seed"], **{m: r[m] for m in metrics}} for r in rows]
    return {**best, "seeds": [r["seed"] for r in rows], "spread": spread, "per_seed": per_seed,
            "seconds": float(np.mean([r["seconds"] for r in rows]))}


def evaluate(checkpoint: str | Path, steps: list[int] | None = None, *, nfe: list[int] | None = None,
             samplers: list[str] | None = None, times: list[list[float]] | None = None, num: int = 1000,
             ref: str | None = None, split: str | None = None, ref_num: int | None = None,
             features: str = "inception", extractor=None, inception_weights: str | Path | None = None,
             device: str = "auto", batch_size: int = 256, seed: int = 0, guidance: float = 1.0,
             ema: bool = True, download: bool = False, cache_dir=None, progress: bool = True,
             distributed: DistInfo | None = None, seeds: list[int] | None = None,
             fid_only: bool = False, default_split: str = "test") -> dict:
    """Sample a checkpoint at each schedule and score the samples against a reference.

    `seeds`: each schedule is sampled once per seed and its row reports the seed with the lowest
    FID (first metric), the spread over the seeds beside it (`over_seeds`; default: `[seed]`).
    `fid_only`: score images by FID alone. `default_split`: the reference split when `split` is
    None and the dataset has splits. `PAPER_PROTOCOL` holds the papers' values of these
    (`fewstep eval --protocol paper`; `evaluate(run, **PAPER_PROTOCOL)`).

    `ref` defaults to the checkpoint's training data (`data.name`, with its resolution and
    channels), test split where there is one. `extractor` (a `FeatureExtractor`) overrides
    `features`. `times`: explicit multistep time lists for a consistency model, each one row
    (instead of `steps`). Returns a JSON-ready dict; its `rows` hold one dict per
    (method, sampler, NFE).

    `distributed` (`fewstep.training.distributed.init_distributed` under `torchrun`): the processes split
    each row's sampling batches and feature extraction; process 0 computes (or reads the cache
    of) the reference statistics first and scores the gathered features. The result equals a
    single process's with the same seed and batch size, and every process returns it.
    """
    if num < 2:
        raise ValueError(f"--num must be >= 2, got {num}")
    seeds = [seed] if seeds is None else list(seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds must be distinct sampling seeds, got {seeds}")
    seed = seeds[0]
    dist_info = distributed or DistInfo()
    progress = progress and dist_info.is_main
    dev = resolve_device(device)
    model = load_model(checkpoint, dev, ema)
    if times:
        if steps or nfe:
            raise ValueError("--times applies to consistency models, instead of --steps/--nfe")
        plan = [model.sampler.schedule(times=ts) for ts in times]
    else:
        plan = model.sampler.schedules(steps, nfe, samplers)
    if not dist_info.is_main:
        barrier(dist_info)  # process 0 computes and caches the reference statistics; the others read them
    info, score = prepare_scoring(model, num=num, ref=ref, split=split, ref_num=ref_num, features=features,
                                  extractor=extractor, inception_weights=inception_weights, device=dev,
                                  download=download and dist_info.is_main, cache_dir=cache_dir, seed=seed,
                                  progress=progress, fid_only=fid_only, default_split=default_split)
    if dist_info.is_main:
        barrier(dist_info)
    info = broadcast_object(info, dist_info)  # process 0's (its `cached` flag)
    result = {"fewstep_eval": 1, "checkpoint": str(model.checkpoint.resolve()), "step": model.step,
              "method": model.method_name, "weights": model.weights, "kind": model.kind, "shape": list(model.shape),
              "num": num, "seed": seed, "guidance": guidance, **info}
    if len(seeds) > 1:
        result["seeds"] = seeds
    generate(model, plan[0], 2, batch_size, seed, guidance, progress=False)  # warm-up: not in the timings
    result["processes"] = dist_info.world_size
    rows = []
    for schedule in tqdm(plan, desc="eval", unit="row", disable=not progress or len(plan) < 2, leave=False):
        per_seed = [_sample_and_score(model, schedule, num, batch_size, s, guidance, progress, score, dist_info)
                    for s in seeds]
        rows.append(per_seed[0] if len(seeds) == 1 else over_seeds(per_seed, info["metrics"]))
    result["rows"] = rows
    return result


def search_times(checkpoint: str | Path, steps: int = 2, *, metric: str | None = None, grid: int = 40,
                 num: int = 1000, ref: str | None = None, split: str | None = None, ref_num: int | None = None,
                 features: str = "inception", extractor=None, inception_weights: str | Path | None = None,
                 device: str = "auto", batch_size: int = 256, seed: int = 0, guidance: float = 1.0,
                 ema: bool = True, download: bool = False, cache_dir=None, progress: bool = True) -> dict:
    """Multistep time points for a consistency checkpoint by greedy ternary search (docs/math.md#choosing-the-times):
    each schedule tried is sampled (`num` samples, fixed seed) and scored by `metric` (default
    FID for images, sliced Wasserstein for vectors; lower is better) against the reference of
    `evaluate`. Candidates: `grid` Karras noise levels as TrigFlow times. Returns a JSON-ready
    dict with the chosen `times`, and `rows` as in `evaluate` for the default times and the
    chosen ones."""
    from fewstep.core.samplers import ternary_search_times, trigflow_search_grid

    if num < 2:
        raise ValueError(f"--num must be >= 2, got {num}")
    if grid < 3:
        raise ValueError(f"--grid must be >= 3, got {grid}")
    model = load_model(checkpoint, resolve_device(device), ema)
    sampler = model.sampler
    if sampler.consistency_fn() is None:  # only multistep samplers have times to search
        raise ValueError(f"time search is for consistency models; {model.checkpoint} is a {model.method_name!r} model "
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
        x, _, _ = generate(model, sampler.schedule(times=times), num, batch_size, seed, guidance, progress=False)
        value = float(score(x)[metric])
        bar.update(1)
        bar.set_postfix({metric: f"{value:.4g}", "t": f"{times[-1]:.3f}"})
        return value if np.isfinite(value) else float("inf")

    times, history = ternary_search_times(schedule_score, steps, trigflow_search_grid(grid, model.sigma_d),
                                          first=sampler.schedule(1).times[0])
    bar.close()
    rows = [_sample_and_score(model, schedule, num, batch_size, seed, guidance, False, score)
            for schedule in (sampler.schedule(steps), sampler.schedule(times=times))]
    return {"fewstep_search_times": 1, "checkpoint": str(model.checkpoint.resolve()), "step": model.step,
            "method": model.method_name, "weights": model.weights, "kind": model.kind, "shape": list(model.shape),
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
    seeds = [_seed_line(r, metrics[0]) for r in result["rows"] if "spread" in r]
    return "\n".join([fmt(head)] + [fmt(row) for row in lines] + seeds + [note])


def _seed_line(row: dict, metric: str) -> str:
    """The reported value of a row sampled with several seeds, with its NFE and its spread."""
    s = row["spread"][metric]
    seeds = ", ".join(str(k) for k in row["seeds"])
    return (f"{row['method']} {row['sampler']} NFE {row['nfe']}: {_HEAD.get(metric, metric)} {s['min']:.4g} = min over "
            f"seeds {seeds} (mean {s['mean']:.4g}, max {s['max']:.4g})")
