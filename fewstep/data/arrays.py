"""Arrays -> datasets: `.npy` / `.npz` files, and the conversion every array source shares.

Pixel conventions:
  * uint8 (and other integer dtypes with values in 0..255): v -> v / 127.5 - 1.
  * float: kept when already in [-1, 1] with some negative value, mapped by 2v - 1 when in [0, 1]
    (a float array with no negative value is taken to be [0, 1]); anything else is an error unless
    `value_range=(lo, hi)` names the range to map linearly onto [-1, 1]. bool: False/True -> -1/1.
  * Layouts (N, H, W), (N, H, W, C) and (N, C, H, W) with C in {1, 3}. When both C positions hold
    1 or 3, the layout whose two spatial sizes are equal wins, and channels-first on a tie.
8-bit sources stay uint8 in memory (4x smaller) and are decoded per batch. Vectors (N, D) are
rescaled per dimension to mean 0, std 0.5 unless `normalize=False`; `denormalize` maps back.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from fewstep.data.base import SIGMA_D, DataError, TensorDataset, image_dataset, one_line

_X_KEYS = ("x", "images", "data")
_Y_KEYS = ("y", "labels")
_FLOAT_SLACK = 1e-4  # float images may overshoot their range by this much (rounding), then are clamped


def _images_nchw(x: np.ndarray, where: str) -> np.ndarray:
    """(N, H, W), (N, H, W, C) or (N, C, H, W) with C in {1, 3} -> (N, C, H, W)."""
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4:
        first, last = x.shape[1] in (1, 3), x.shape[3] in (1, 3)
        if first and last:  # ambiguous: the layout with square spatial dims wins, channels-first on a tie
            last = x.shape[1] == x.shape[2] and x.shape[2] != x.shape[3]
            first = not last
        if first:
            return x
        if last:
            return x.transpose(0, 3, 1, 2)
    raise DataError(f"{where}: array of shape {x.shape} is not accepted; expected vectors (N, D) or images "
                    f"(N, H, W), (N, H, W, C) or (N, C, H, W) with C in {{1, 3}}")


def _check_numeric_finite(x: np.ndarray, where: str) -> None:
    if x.dtype.kind not in "biuf":
        raise DataError(f"{where}: dtype {x.dtype} is not numeric")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise DataError(f"{where}: contains NaN or Inf values")


def array_pixels(x: np.ndarray, where: str, value_range: tuple[float, float] | None) -> torch.Tensor:
    """Image values -> uint8 (kept 8-bit) or float32 in [-1, 1]; see the module docstring."""
    _check_numeric_finite(x, where)
    if value_range is not None:
        lo, hi = value_range
        y = (x.astype(np.float32) - lo) * (2 / (hi - lo)) - 1
        if y.min() < -1 - _FLOAT_SLACK or y.max() > 1 + _FLOAT_SLACK:
            raise DataError(f"{where}: values span [{x.min()}, {x.max()}], outside value_range=({lo}, {hi})")
        return torch.from_numpy(np.ascontiguousarray(y.clip(-1, 1)))
    if x.dtype == np.uint8:
        return torch.from_numpy(np.array(x, copy=True))  # contiguous and writable
    if x.dtype.kind == "b":
        return torch.from_numpy(x.astype(np.float32) * 2 - 1)
    lo, hi = x.min(), x.max()
    if x.dtype.kind in "iu":
        if lo < 0 or hi > 255:
            raise DataError(f"{where}: integer images must lie in 0..255, got {lo}..{hi}; "
                            f"pass value_range=(low, high) to map another range onto [-1, 1]")
        return torch.from_numpy(x.astype(np.uint8))
    if lo >= -_FLOAT_SLACK and hi <= 1 + _FLOAT_SLACK:  # [0, 1]
        return torch.from_numpy((x.astype(np.float32) * 2 - 1).clip(-1, 1))
    if lo >= -1 - _FLOAT_SLACK and hi <= 1 + _FLOAT_SLACK:  # already [-1, 1]
        return torch.from_numpy(x.astype(np.float32).clip(-1, 1))
    raise DataError(f"{where}: float images must lie in [0, 1] or [-1, 1], got [{lo:g}, {hi:g}]; "
                    f"pass value_range=(low, high) to map another range onto [-1, 1]")


def _vectors(x: np.ndarray, where: str, normalize: bool
             ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(N, D) -> float32, optionally shifted and scaled per dimension to mean 0, std sigma_d."""
    _check_numeric_finite(x, where)
    if not normalize:
        return torch.from_numpy(x.astype(np.float32)), None, None
    x64 = x.astype(np.float64)
    mean, std = x64.mean(axis=0), x64.std(axis=0)
    scale = SIGMA_D / np.where(std > 0, std, SIGMA_D)  # a constant column keeps scale 1
    data = torch.from_numpy(((x64 - mean) * scale).astype(np.float32))
    return data, torch.from_numpy(mean.astype(np.float32)), torch.from_numpy(scale.astype(np.float32))


def class_labels(y: np.ndarray, n: int, where: str) -> torch.Tensor:
    """Class indices: 1-D (or (N, 1)), non-negative integers (integral floats accepted), one per example."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DataError(f"{where}: labels must be a 1-D array of class indices, got shape {y.shape}")
    if len(y) != n:
        raise DataError(f"{where}: {len(y)} labels for {n} examples")
    integral = y.dtype.kind in "iu" or (y.dtype.kind == "f" and np.isfinite(y).all() and (y == np.round(y)).all())
    if not integral:
        raise DataError(f"{where}: labels must be integer class indices, got dtype {y.dtype}")
    if y.min() < 0:
        raise DataError(f"{where}: labels must be non-negative class indices, got {y.min()}")
    return torch.from_numpy(y.astype(np.int64))


def dataset_from_arrays(name: str, x: np.ndarray, y: np.ndarray | None, *, where: str,
                        labels_where: str | None = None, resolution: int | None = None,
                        channels: int | None = None, normalize: bool = True,
                        value_range: tuple[float, float] | None = None) -> TensorDataset:
    """Arrays -> dataset: (N, D) becomes vectors, 3-D / 4-D arrays become images."""
    x = np.asarray(x)
    if x.ndim not in (2, 3, 4):
        _images_nchw(x, where)  # raises the layout error
    if x.shape[0] == 0 or x.size == 0:
        raise DataError(f"{where}: holds no examples (shape {x.shape})")
    labels = None if y is None else class_labels(y, len(x), labels_where or where)
    if x.ndim == 2:
        for key, value in (("resolution", resolution), ("channels", channels), ("value_range", value_range)):
            if value is not None:
                raise DataError(f"{where}: {key} applies to images, but this holds vectors of shape {x.shape}")
        data, offset, scale = _vectors(x, where, normalize)
        return TensorDataset(name, data, labels, kind="vector", offset=offset, scale=scale)
    return image_dataset(name, array_pixels(_images_nchw(x, where), where, value_range), labels, resolution,
                         channels)


def load_array_file(path: Path, name: str, *, resolution: int | None = None, channels: int | None = None,
                    normalize: bool = True, value_range: tuple[float, float] | None = None,
                    key: str | None = None, labels_key: str | None = None) -> TensorDataset:
    """A `.npy` array, or a `.npz` archive: data under `key` or x / images / data / the only array,
    labels under `labels_key` or y / labels when present. `normalize` (vectors only): mean 0, std 0.5."""
    opts = dict(resolution=resolution, channels=channels, normalize=normalize, value_range=value_range)
    try:
        loaded = np.load(path, allow_pickle=False)  # no pickles: loading data must never run code
        if not hasattr(loaded, "files"):  # a plain .npy array
            if key is not None or labels_key is not None:
                raise DataError(f"'{path}': key / labels_key apply to .npz archives, this is a .npy array")
            return dataset_from_arrays(name, loaded, None, where=f"'{path}'", **opts)
        with loaded:
            keys = list(loaded.files)
            for option, k in (("key", key), ("labels_key", labels_key)):
                if k is not None and k not in keys:
                    raise DataError(f"'{path}': {option} {k!r} not found; keys: {', '.join(keys) or 'none'}")
            if key is None:
                found = [k for k in _X_KEYS if k in keys]
                rest = [k for k in keys if k not in _Y_KEYS]
                if not found and len(rest) != 1:
                    raise DataError(f"'{path}': cannot tell which array holds the data among keys "
                                    f"[{', '.join(keys)}]; name it x, images or data, or pass key=")
                key = found[0] if found else rest[0]
            if labels_key is None:
                labels_key = next((k for k in _Y_KEYS if k in keys), None)
            y = None if labels_key is None else loaded[labels_key]
            return dataset_from_arrays(name, loaded[key], y, where=f"'{path}' key {key!r}",
                                       labels_where=f"'{path}' key {labels_key!r}", **opts)
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:  # not an array file, or pickled objects
        raise DataError(f"cannot read '{path}': {one_line(err)}") from err
