"""Quality of samples of the embedded 8x8 digits, where Inception features mean little.

- `precision` / `recall`: improved precision and recall (k = 3) in pixel space against all
  1,797 real digits. Precision: the fraction of samples that lie on the real-digit manifold
  (they look like some digit); recall: the fraction of real digits the samples cover.
- `coverage`: an RBF support-vector classifier trained on the digits (~98% cross-validated
  accuracy) labels each sample; the entropy of the label histogram divided by log(10)
  (1 = all ten digits equally often, 0 = one digit only).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from fewstep.metrics.fid import precision_recall


@functools.lru_cache(maxsize=1)
def _digits():
    from sklearn.datasets import load_digits
    from sklearn.svm import SVC

    data = load_digits()
    x = data.data / 8.0 - 1.0  # fewstep's scaling of the digits: [0, 16] -> [-1, 1]
    return x, SVC(gamma=0.064, C=10.0).fit(x, data.target)


def digits_score(samples: torch.Tensor) -> dict[str, float]:
    """Scores for samples shaped (N, 1, 8, 8) (or (N, 64)) in [-1, 1]."""
    x = samples.detach().double().cpu().reshape(len(samples), -1).clamp(-1, 1).numpy()
    if x.shape[1] != 64:
        raise ValueError(f"digits_score needs 8x8 single-channel samples, got {tuple(samples.shape)}")
    real, clf = _digits()
    precision, recall = precision_recall(real, x, k=3)
    hist = np.bincount(clf.predict(x), minlength=10) / len(x)
    nz = hist[hist > 0]
    return {"precision": float(precision), "recall": float(recall),
            "coverage": float(-(nz * np.log(nz)).sum() / math.log(10))}
