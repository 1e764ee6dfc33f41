"""Evaluation metrics (docs/math.md#evaluation-protocol).

- Toy data (N, D): `sliced_wasserstein`, `mmd`, `energy_distance` (toy.py).
- Images: feature extractors (features.py) and FID / KID / precision-recall / Inception
  Score on their features, with cached reference statistics (fid.py).
"""

from .features import (
    INCEPTION_SHA256,
    FeatureExtractor,
    InceptionV3Features,
    RandomConvFeatures,
    default_cache_dir,
    find_inception_weights,
)
from .fid import (
    FeatureStats,
    fid,
    frechet_distance,
    image_metrics,
    inception_score,
    kid,
    kid_subsets,
    precision_recall,
    reference_stats,
    reference_stats_path,
)
from .toy import energy_distance, median_bandwidth, mmd, sliced_wasserstein

__all__ = [
    "INCEPTION_SHA256", "FeatureExtractor", "FeatureStats", "InceptionV3Features",
    "RandomConvFeatures", "default_cache_dir", "energy_distance", "fid", "find_inception_weights",
    "frechet_distance", "image_metrics", "inception_score", "kid", "kid_subsets",
    "median_bandwidth", "mmd", "precision_recall", "reference_stats", "reference_stats_path",
    "sliced_wasserstein",
]
