"""scikit-learn's bundled handwritten digits: the dataset that needs no file and no network."""

from __future__ import annotations

import torch

from fewstep.data.base import TensorDataset, image_dataset


def load_digits_dataset(resolution: int | None = None, channels: int | None = None) -> TensorDataset:
    """1,797 images 8x8, values 0..16 -> v / 8 - 1, labels 0..9.

    `resolution` other than 8 resizes with (antialiased) bilinear interpolation, e.g. 16 upsamples.
    """
    from sklearn.datasets import load_digits  # deferred: importing scikit-learn takes about a second

    digits = load_digits()
    x = torch.from_numpy(digits.images).float().div(8).sub(1).unsqueeze(1)  # exact: v / 8 is a dyadic
    labels = torch.from_numpy(digits.target).long()
    return image_dataset("digits", x, labels, resolution, channels, class_names=[str(k) for k in range(10)])
