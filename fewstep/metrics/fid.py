"""Image metrics on extracted features: FID, KID, precision/recall, Inception Score (docs/math.md#evaluation-protocol).

Everything is float64. Features come from a `FeatureExtractor` (see `features.py`) as
(N, dim) arrays or tensors; `FeatureStats` holds their mean and covariance (and the raw
features when KID or precision/recall need them) and is saved as `.npz`.
`reference_stats` caches the statistics of a dataset on disk, keyed by dataset, split,
resolution, image count and extractor hash.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import numpy as np
import torch
from tqdm.auto import tqdm

from .features import FeatureExtractor, default_cache_dir

ArrayLike = Union[np.ndarray, torch.Tensor]
Images = Union[torch.Tensor, Iterable[torch.Tensor]]


def _as_features(x: ArrayLike, name: str = "features") -> np.ndarray:
    if isinstance(x, FeatureStats):
        if x.features is None:
            raise ValueError(f"{name}: these FeatureStats keep no raw features (keep_features=False)")
        x = x.features
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"{name} must have shape (N, dim), got {x.shape}")
    return x


# ------------------------------------------------------------------------------------------
# Frechet distance


def _psd_factor(s: np.ndarray) -> np.ndarray:
    """A matrix `A` with `A A^T = s` for a symmetric PSD `s`: Cholesky when `s` is numerically
    positive definite (fast), else `V diag(sqrt(w))` from the eigendecomposition `s = V diag(w) V^T`
    (eigenvalues below 0 from round-off clipped), which also handles singular `s`."""
    try:
        return np.linalg.cholesky(s)
    except np.linalg.LinAlgError:
        w, v = np.linalg.eigh(s)
        return v * np.sqrt(np.clip(w, 0, None))


def _frechet(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray,
             factor1: np.ndarray | None = None) -> float:
    """Frechet distance with `tr (S1 S2)^(1/2)` from the spectrum of `A^T S2 A`, `S1 = A A^T`.

    `A^T S2 A` is symmetric PSD and shares its nonzero eigenvalues with `S2 A A^T = S2 S1`,
    so the trace is `sum sqrt(eigvalsh(A^T S2 A))`: no complex parts and no epsilon
    offsets, as `scipy.linalg.sqrtm(S1 @ S2)` needs when covariances are singular (N < dim).
    `A` may be thin (dim x r) when `S1` has rank r, which makes small-N FIDs cheap.
    """
    a = _psd_factor((s1 + s1.T) / 2) if factor1 is None else factor1
    m = a.T @ s2 @ a
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """`||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))`: the squared Wasserstein-2 distance
    between two Gaussians, i.e. FID on Inception statistics (float64)."""
    mu1, mu2 = (np.asarray(m, dtype=np.float64).reshape(-1) for m in (mu1, mu2))
    s1, s2 = (np.asarray(s, dtype=np.float64) for s in (sigma1, sigma2))
    d = mu1.shape[0]
    if mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"shape mismatch: mu1 {mu1.shape}, sigma1 {s1.shape}, mu2 {mu2.shape}, "
                         f"sigma2 {s2.shape}")
    return _frechet(mu1, s1, mu2, s2)


@dataclass
class FeatureStats:
    """Mean (dim,), covariance (dim, dim) (unbiased, N - 1), count, optional raw features.

    `meta` records where the statistics come from (extractor name and hash, dataset, ...).
    """

    mu: np.ndarray
    sigma: np.ndarray
    num: int
    features: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    @classmethod
    def from_features(cls, features: ArrayLike, keep_features: bool = True,
                      meta: dict | None = None) -> FeatureStats:
        f = _as_features(features)
        if f.shape[0] < 2:
            raise ValueError("need at least two feature vectors for a covariance")
        return cls(mu=f.mean(axis=0), sigma=np.cov(f, rowvar=False), num=f.shape[0],
                   features=f if keep_features else None, meta=dict(meta or {}))

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])

    def save(self, path: str | Path) -> Path:
        """Write `.npz` atomically (a temp file renamed in place), so an interrupted run never
        leaves a truncated cache. Raw features are stored as float32 to halve the size."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = dict(mu=self.mu, sigma=self.sigma, num=np.int64(self.num),
                      meta=np.array(json.dumps(self.meta, sort_keys=True)))
        if self.features is not None:
            arrays["features"] = self.features.astype(np.float32)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | Path) -> FeatureStats:
        with np.load(path, allow_pickle=False) as z:
            feats = z["features"].astype(np.float64) if "features" in z.files else None
            return cls(mu=z["mu"].astype(np.float64), sigma=z["sigma"].astype(np.float64),
                       num=int(z["num"]), features=feats, meta=json.loads(str(z["meta"][()])))


def fid(a: FeatureStats, b: FeatureStats) -> float:
    """Frechet distance between the Gaussians fitted to two feature sets.

    When a side keeps fewer raw features than dimensions, its centred features give an
    exact thin factor of its covariance, so the cost is O(dim^2 N) instead of O(dim^3).
    """
    if a.dim != b.dim:
        raise ValueError(f"feature dims differ: {a.dim} vs {b.dim}")
    for x, y in ((a, b), (b, a)):  # the distance is symmetric: factor whichever side is thin
        if x.features is not None and x.num <= x.dim:
            factor = (x.features - x.mu).T / np.sqrt(x.num - 1)
            return _frechet(x.mu, x.sigma, y.mu, y.sigma, factor1=factor)
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


# ------------------------------------------------------------------------------------------
# Kernel Inception distance


def _poly3(k: np.ndarray) -> np.ndarray:
    """`k ** 3` by two in-place products: numpy's generic `pow` is several times slower."""
    k3 = k * k
    k3 *= k
    return k3


def kid_subsets(feats1: ArrayLike, feats2: ArrayLike, num_subsets: int = 100,
                subset_size: int = 1000, seed: int = 0, progress: bool = False) -> np.ndarray:
    """Unbiased `MMD^2` estimates on random subsets, kernel `k(x, y) = (x.y / d + 1)^3`.

    Binkowski et al. 2018. Each subset draws `m = min(subset_size, N1, N2)` rows of each set
    without replacement (local RNG seeded by `seed`); per subset
    `sum_{i!=j} k(x_i,x_j) / (m(m-1)) + sum_{i!=j} k(y_i,y_j) / (m(m-1)) - 2 mean k(x_i,y_j)`.
    """
    f1, f2 = _as_features(feats1, "feats1"), _as_features(feats2, "feats2")
    if f1.shape[1] != f2.shape[1]:
        raise ValueError(f"feature dims differ: {f1.shape[1]} vs {f2.shape[1]}")
    m = min(subset_size, f1.shape[0], f2.shape[0])
    if m < 2:
        raise ValueError("KID needs at least two samples in each set")
    d = f1.shape[1]
    rng = np.random.default_rng(seed)
    if m == f1.shape[0] == f2.shape[0]:  # every subset is both full sets, permuted: one value
        num_subsets = min(num_subsets, 1)
    out = np.empty(num_subsets)
    # ~0.3 s per subset for 2048-d Inception features on 2 CPU cores: worth a progress bar.
    for s in tqdm(range(num_subsets), desc="KID", disable=not progress, leave=False):
        x = f1[rng.choice(f1.shape[0], m, replace=False)]
        y = f2[rng.choice(f2.shape[0], m, replace=False)]
        kxx, kyy, kxy = (_poly3(a @ b.T / d + 1) for a, b in ((x, x), (y, y), (x, y)))
        within = kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)
        out[s] = within / (m * (m - 1)) - 2.0 * kxy.mean()
    return out


def kid(feats1: ArrayLike, feats2: ArrayLike, num_subsets: int = 100, subset_size: int = 1000,
        seed: int = 0, progress: bool = False) -> float:
    """Kernel Inception distance: the mean of `kid_subsets` (an unbiased `MMD^2`)."""
    return float(kid_subsets(feats1, feats2, num_subsets, subset_size, seed, progress).mean())


# ------------------------------------------------------------------------------------------
# Precision and recall


def _knn_radii(feats: torch.Tensor, k: int, rows: int) -> torch.Tensor:
    """Distance from each point to its k-th nearest other point (k + 1 counting itself)."""
    radii = torch.empty(feats.shape[0], dtype=torch.float64)
    for start in range(0, feats.shape[0], rows):
        dist = torch.cdist(feats[start:start + rows], feats)
        radii[start:start + rows] = dist.kthvalue(k + 1, dim=1).values
    return radii


def _coverage(query: torch.Tensor, ref: torch.Tensor, radii: torch.Tensor, rows: int) -> float:
    """Fraction of `query` points inside at least one ball (ref_j, radii_j)."""
    inside = 0
    for start in range(0, query.shape[0], rows):
        dist = torch.cdist(query[start:start + rows], ref)
        inside += int((dist <= radii[None, :]).any(dim=1).sum())
    return inside / query.shape[0]


def precision_recall(real: ArrayLike, fake: ArrayLike, k: int = 3,
                     max_block: int = 1 << 24) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019), returned as (precision, recall).

    Each set's manifold is the union of balls around its points with radius the distance to
    the k-th nearest neighbour within the set. Precision: fraction of fake points on the real
    manifold; recall: fraction of real points on the fake manifold. Distances are computed
    in row blocks of at most `max_block` entries (128 MB in float64).
    """
    r = torch.from_numpy(_as_features(real, "real"))
    f = torch.from_numpy(_as_features(fake, "fake"))
    if r.shape[1] != f.shape[1]:
        raise ValueError(f"feature dims differ: {r.shape[1]} vs {f.shape[1]}")
    if min(r.shape[0], f.shape[0]) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} points in each set")
    rows = max(1, max_block // max(r.shape[0], f.shape[0]))
    precision = _coverage(f, r, _knn_radii(r, k, rows), rows)
    recall = _coverage(r, f, _knn_radii(f, k, rows), rows)
    return precision, recall


# ------------------------------------------------------------------------------------------
# Inception Score


def inception_score(logits: ArrayLike, splits: int = 10) -> tuple[float, float]:
    """`exp(E_x KL(p(y|x) || p(y)))` over `splits` equal parts; returns (mean, std) over parts.

    Salimans et al. 2016. `p(y)` is the mean prediction within each part. Needs a classifier
    with logits; the FID TorchScript has none, so the caller supplies its own network.
    """
    z = _as_features(logits, "logits")
    if not 1 <= splits <= z.shape[0]:
        raise ValueError(f"splits must be in [1, N={z.shape[0]}], got {splits}")
    logp = torch.from_numpy(z).log_softmax(dim=1)
    scores = []
    for part in torch.tensor_split(logp, splits):
        log_py = part.exp().mean(dim=0).log()
        kl = (part.exp() * (part - log_py)).sum(dim=1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores)), float(np.std(scores))


# ------------------------------------------------------------------------------------------
# All at once, and cached reference statistics


def image_metrics(fake: FeatureStats, real: FeatureStats, k: int = 3, kid_num_subsets: int = 100,
                  kid_subset_size: int = 1000, seed: int = 0, progress: bool = False) -> dict[str, float]:
    """FID always; KID, precision and recall when both sides keep raw features."""
    out = {"fid": fid(fake, real)}
    if fake.features is not None and real.features is not None:
        out["kid"] = kid(fake.features, real.features, kid_num_subsets, kid_subset_size, seed, progress)
        out["precision"], out["recall"] = precision_recall(real.features, fake.features, k)
    return out


def reference_stats_path(dataset: str, split: str, resolution: int, extractor: FeatureExtractor,
                         num_images: int | None = None, cache_dir: str | Path | None = None) -> Path:
    """Cache file for a dataset's statistics: every input that changes them is in the name."""
    n = "all" if num_images is None else str(num_images)
    dataset, split = (re.sub(r"[^A-Za-z0-9._-]+", "_", s) for s in (dataset, split))  # a path may name a dataset
    name = f"{dataset}-{split}-{resolution}px-n{n}-{extractor.name}-{extractor.sha256[:16]}.npz"
    return Path(cache_dir or default_cache_dir()) / "refstats" / name


def reference_stats(dataset: str, split: str, resolution: int,
                    images: Images | Callable[[], Images], extractor: FeatureExtractor,
                    cache_dir: str | Path | None = None, *, num_images: int | None = None,
                    keep_features: bool = True, refresh: bool = False,
                    progress: bool = True) -> FeatureStats:
    """Statistics of a reference dataset, read from the cache or computed and cached.

    `images` is a uint8 tensor (N, C, H, W), an iterable of such batches, or a zero-argument
    callable returning either; a callable is only called on a cache miss, so the dataset need
    not be loaded when its statistics are cached. `num_images` caps (and keys) the count.
    """
    path = reference_stats_path(dataset, split, resolution, extractor, num_images, cache_dir)
    if path.is_file() and not refresh:
        stats = FeatureStats.load(path)
        if stats.meta.get("extractor_sha256") == extractor.sha256 and \
                (stats.features is not None or not keep_features):
            return stats
    if callable(images) and not isinstance(images, torch.Tensor):
        images = images()
    if isinstance(images, torch.Tensor):
        feats = extractor(images[:num_images], progress=progress)  # [:None] keeps all
    else:
        feats = extractor.extract(images, max_images=num_images, progress=progress)
    if num_images is not None and feats.shape[0] < num_images:
        raise ValueError(f"{dataset}/{split} has only {feats.shape[0]} images, asked for {num_images}")
    meta = dict(dataset=dataset, split=split, resolution=resolution, extractor=extractor.name,
                extractor_sha256=extractor.sha256)
    stats = FeatureStats.from_features(feats, keep_features=keep_features, meta=meta)
    stats.save(path)
    return stats
