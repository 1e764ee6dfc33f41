"""Datasets: the embedded digits, 2-D toys drawn on the fly, and user images, arrays and IDX files.

Every dataset hands out random batches with `sample(batch_size, device)`, drawn from torch's global
CPU RNG only, so saving and restoring `torch.get_rng_state()` makes a run exactly reproducible and
resumable. Images come out as float32 in [-1, 1] shaped (B, C, H, W); vectors as float32 (B, D) with
per-dimension std about 0.5, the `sigma_d` that TrigFlow assumes (SPEC 1.1).

    ds = load_dataset("digits")                       # 1,797 images (1, 8, 8), labels 0..9
    ds = load_dataset("8gaussians")                   # 2-D toy, drawn on the fly
    ds = load_dataset("~/faces", resolution=32)       # folder of images, centre-cropped and resized
    ds = load_dataset("mnist/", split="test")         # MNIST-format IDX files (t10k-*)
    ds = load_dataset("fashion-mnist", split="test")  # 10,000 images (1, 28, 28); see load_fashion_mnist
    x, labels = ds.sample(64, device="cuda")          # labels is None for unlabeled data

Pixel conventions (arrays and IDX files):
  * uint8 (and other integer dtypes with values in 0..255): v -> v / 127.5 - 1.
  * float: kept when already in [-1, 1] with some negative value, mapped by 2v - 1 when in [0, 1]
    (a float array with no negative value is taken to be [0, 1]); anything else is an error unless
    `value_range=(lo, hi)` names the range to map linearly onto [-1, 1]. bool: False/True -> -1/1.
  * Layouts (N, H, W), (N, H, W, C) and (N, C, H, W) with C in {1, 3}. When both C positions hold
    1 or 3, the layout whose two spatial sizes are equal wins, and channels-first on a tie.
Resizing (`resolution`) centre-crops to a square, then filters with antialiased bilinear (a triangle
filter, as PIL's BILINEAR): unlike LANCZOS it never overshoots, so images stay inside [-1, 1].
8-bit sources stay uint8 in memory (4x smaller) and are decoded per batch.
"""

from __future__ import annotations

import abc
import functools
import gzip
import inspect
import math
import numbers
import os
import re
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["DATASETS", "DataError", "Dataset", "TensorDataset", "ToyDataset", "EightGaussians",
           "Checkerboard", "Moons", "SwissRoll", "GaussianDataset", "load_dataset", "load_digits_dataset",
           "read_idx", "load_fashion_mnist", "load_mnist", "IMAGE_EXTENSIONS", "SIGMA_D", "TOY_SIZE"]

SIGMA_D = 0.5  # per-dimension data std that TrigFlow's parameterization assumes (SPEC 1.1)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
TOY_SIZE = 10_000  # nominal len() of the on-the-fly datasets; all() draws exactly this many
_MOMENT_DRAWS = 1 << 20  # fixed-seed draw that sets a toy's shift and scale: ~0.1% error on the std
_MOMENT_SEED = 1234
_REFERENCE_SEED = 0  # seed of the draw all() returns for the on-the-fly datasets
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 grey, the weights of PIL's convert("L")
_X_KEYS = ("x", "images", "data")
_Y_KEYS = ("y", "labels")
_FLOAT_SLACK = 1e-4  # float images may overshoot their range by this much (rounding), then are clamped


class DataError(ValueError):
    """A problem with the data a user asked for; the message is one line naming the path or key."""


def _one_line(err: BaseException | str) -> str:
    return " ".join(str(err).split())


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size must be a positive integer, got {batch_size!r}")


# ----------------------------------------------------------------------------------------------
# The interface


class Dataset(abc.ABC):
    """A source of training batches; see the module docstring for value conventions."""

    name: str
    kind: str  # "image" or "vector"
    shape: tuple[int, ...]  # (C, H, W) or (D,)
    num_classes: int = 0  # 0 when unlabeled
    class_names: list[str] | None = None
    offset: torch.Tensor | None = None  # model space = (data - offset) * scale; None: identity
    scale: torch.Tensor | None = None

    @abc.abstractmethod
    def sample(self, batch_size: int, device: torch.device | str | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A random batch `(x, labels)`, drawn with torch's global CPU RNG only, then moved to `device`."""

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of stored examples (the nominal size `TOY_SIZE` for on-the-fly datasets)."""

    @abc.abstractmethod
    def all(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Every stored example as float32 (a fixed-seed draw of len(self) for on-the-fly datasets)."""

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Map model-space samples back to the data's own coordinates (identity for images)."""
        if self.scale is None or self.offset is None:
            return x
        return x / self.scale.to(x) + self.offset.to(x)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, kind={self.kind!r}, shape={self.shape}, "
                f"len={len(self)}, num_classes={self.num_classes})")


def _decode(x: torch.Tensor) -> torch.Tensor:
    """uint8 storage -> float32 in [-1, 1]; float storage is already there."""
    return x.float() / 127.5 - 1 if x.dtype == torch.uint8 else x


class TensorDataset(Dataset):
    """Stored examples: images as uint8 or float32 in [-1, 1] (N, C, H, W), vectors as float32 (N, D)."""

    def __init__(self, name: str, x: torch.Tensor, labels: torch.Tensor | None = None, *, kind: str,
                 class_names: list[str] | None = None, offset: torch.Tensor | None = None,
                 scale: torch.Tensor | None = None):
        if len(x) == 0:
            raise DataError(f"{name!r} holds no examples")
        if labels is not None and tuple(labels.shape) != (len(x),):
            raise DataError(f"{name!r}: {tuple(labels.shape)} labels for {len(x)} examples")
        self.name, self.kind, self.shape = name, kind, tuple(x.shape[1:])
        self._x = x.contiguous()
        self._labels = None if labels is None else labels.to(torch.int64)
        self.class_names = class_names
        self.num_classes = 0 if self._labels is None else (
            len(class_names) if class_names else int(self._labels.max()) + 1)
        self.offset, self.scale = offset, scale

    def sample(self, batch_size: int, device: torch.device | str | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        _check_batch_size(batch_size)
        idx = torch.randint(len(self._x), (batch_size,))  # global CPU RNG: resumable via get_rng_state
        x = _decode(self._x[idx].to(device))  # move uint8 before decoding: 4x less to transfer
        return x, None if self._labels is None else self._labels[idx].to(device)

    def __len__(self) -> int:
        return len(self._x)

    def all(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = _decode(self._x)
        return (x.clone() if x is self._x else x), None if self._labels is None else self._labels.clone()


# ----------------------------------------------------------------------------------------------
# 2-D toys, drawn on the fly, and the isotropic Gaussian


class ToyDataset(Dataset):
    """A 2-D distribution drawn on the fly, then shifted and scaled per dimension to mean 0, std 0.5.

    The shift (`offset`) and scale are constants estimated once from a fixed-seed draw of 2^20 raw
    points with a local generator (the global RNG is untouched); `denormalize` maps samples back
    to the raw coordinates that each subclass's docstring describes.
    """

    kind = "vector"
    shape = (2,)
    num_classes = 0

    def __init__(self, size: int = TOY_SIZE):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise DataError(f"size must be a positive integer, got {size!r}")
        self.size = size
        self.offset, self.scale = _toy_moments(type(self))
        self._reference: torch.Tensor | None = None

    @classmethod
    @abc.abstractmethod
    def draw(cls, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """`n` raw points (n, 2) in float32, before the shift and scale; generator None = global RNG."""

    def _standardize(self, raw: torch.Tensor) -> torch.Tensor:
        return (raw - self.offset) * self.scale

    def sample(self, batch_size: int, device: torch.device | str | None = None) -> tuple[torch.Tensor, None]:
        _check_batch_size(batch_size)
        return self._standardize(self.draw(batch_size)).to(device), None

    def __len__(self) -> int:
        return self.size

    def all(self) -> tuple[torch.Tensor, None]:
        if self._reference is None:
            generator = torch.Generator().manual_seed(_REFERENCE_SEED)  # fixed set, global RNG untouched
            self._reference = self._standardize(self.draw(self.size, generator))
        return self._reference.clone(), None


@functools.cache
def _toy_moments(cls: type[ToyDataset]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension (mean, sigma_d / std) of a toy, from a fixed-seed draw with a local generator."""
    raw = cls.draw(_MOMENT_DRAWS, torch.Generator().manual_seed(_MOMENT_SEED)).double()
    return raw.mean(0).float(), (SIGMA_D / raw.std(0)).float()


class EightGaussians(ToyDataset):
    """Eight equally likely Gaussians (std 0.1) centred on the unit circle at angles k pi / 4."""

    name = "8gaussians"
    NOISE = 0.1

    @classmethod
    def draw(cls, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        angle = torch.randint(8, (n,), generator=generator) * (math.pi / 4)
        centres = torch.stack([torch.cos(angle), torch.sin(angle)], dim=1).float()
        return centres + cls.NOISE * torch.randn(n, 2, generator=generator)


class Checkerboard(ToyDataset):
    """Uniform on the 8 squares of a 4x4 board on [-2, 2]^2 where floor(x) + floor(y) is even."""

    name = "checkerboard"

    @classmethod
    def draw(cls, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        x = torch.rand(n, generator=generator) * 4 - 2
        # a unit-high cell in row 0 or -2, lifted by one row in odd columns (so the parity is even)
        row = -2 * torch.randint(2, (n,), generator=generator) + torch.floor(x) % 2
        y = torch.rand(n, generator=generator) + row
        return torch.stack([x, y], dim=1)


class Moons(ToyDataset):
    """Two interleaved half circles as in scikit-learn's make_moons, plus Gaussian noise (std 0.1).

    Upper moon (cos a, sin a), lower moon (1 - cos a, 0.5 - sin a), a uniform in [0, pi], each moon
    equally likely.
    """

    name = "moons"
    NOISE = 0.1

    @classmethod
    def draw(cls, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        a = torch.rand(n, generator=generator) * math.pi
        upper = torch.rand(n, 1, generator=generator) < 0.5
        outer = torch.stack([torch.cos(a), torch.sin(a)], dim=1)
        inner = torch.stack([1 - torch.cos(a), 0.5 - torch.sin(a)], dim=1)
        return torch.where(upper, outer, inner) + cls.NOISE * torch.randn(n, 2, generator=generator)


class SwissRoll(ToyDataset):
    """A 2-D Swiss roll (s cos s, s sin s), s uniform in [1.5 pi, 4.5 pi], plus Gaussian noise (std 0.5)."""

    name = "swissroll"
    NOISE = 0.5
    T_MIN, T_MAX = 1.5 * math.pi, 4.5 * math.pi

    @classmethod
    def draw(cls, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        s = cls.T_MIN + (cls.T_MAX - cls.T_MIN) * torch.rand(n, generator=generator)
        roll = torch.stack([s * torch.cos(s), s * torch.sin(s)], dim=1)
        return roll + cls.NOISE * torch.randn(n, 2, generator=generator)


class GaussianDataset(Dataset):
    """Exactly N(mean, std^2 I) in `dim` dimensions, deliberately not rescaled: its TrigFlow velocity
    and consistency function are known in closed form (tests compare against them)."""

    name = "gaussian"
    kind = "vector"
    num_classes = 0

    def __init__(self, dim: int = 2, std: float = 0.5, mean: float | Sequence[float] = 0.0,
                 size: int = TOY_SIZE):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise DataError(f"dim must be a positive integer, got {dim!r}")
        if isinstance(std, bool) or not (isinstance(std, numbers.Real) and math.isfinite(std) and std > 0):
            raise DataError(f"std must be a positive number, got {std!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise DataError(f"size must be a positive integer, got {size!r}")
        m = torch.as_tensor(mean, dtype=torch.float32)
        if m.ndim > 1 or (m.ndim == 1 and len(m) != dim) or not torch.isfinite(m).all():
            raise DataError(f"mean must be a finite number or {dim} numbers, got {mean!r}")
        self.dim, self.std, self.size, self.shape = dim, float(std), size, (dim,)
        self.mean = m.expand(dim).clone()

    def _draw(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.mean + self.std * torch.randn(n, self.dim, generator=generator)

    def sample(self, batch_size: int, device: torch.device | str | None = None) -> tuple[torch.Tensor, None]:
        _check_batch_size(batch_size)
        return self._draw(batch_size).to(device), None

    def __len__(self) -> int:
        return self.size

    def all(self) -> tuple[torch.Tensor, None]:
        return self._draw(self.size, torch.Generator().manual_seed(_REFERENCE_SEED)), None


# ----------------------------------------------------------------------------------------------
# Image helpers shared by every image source


def _resize(x: torch.Tensor, resolution: int, chunk: int = 1024) -> torch.Tensor:
    """Centre-crop (N, C, H, W) to a square, then antialiased bilinear to `resolution`; keeps the dtype."""
    h, w = x.shape[-2:]
    s = min(h, w)
    x = x[..., (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    if s == resolution:
        return x.contiguous()
    out = []
    for part in x.split(chunk):  # bounded float32 working memory for large arrays
        y = F.interpolate(part.float(), size=(resolution, resolution), mode="bilinear",
                          align_corners=False, antialias=True)
        out.append(y.round().clamp(0, 255).to(torch.uint8) if x.dtype == torch.uint8 else y)
    return torch.cat(out)


def _convert_channels(x: torch.Tensor, channels: int | None) -> torch.Tensor:
    """Grey -> RGB by copying; RGB -> grey with the ITU-R 601 weights (as PIL). Keeps the dtype."""
    if channels is None or channels == x.shape[1]:
        return x
    if x.shape[1] == 1:
        return x.repeat(1, 3, 1, 1)
    y = (x.float() * torch.tensor(_LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True)
    return y.round().clamp(0, 255).to(torch.uint8) if x.dtype == torch.uint8 else y


def _image_dataset(name: str, pixels: torch.Tensor, labels: torch.Tensor | None, resolution: int | None,
                   channels: int | None, class_names: list[str] | None = None) -> TensorDataset:
    if resolution is not None:
        pixels = _resize(pixels, resolution)
    return TensorDataset(name, _convert_channels(pixels, channels), labels, kind="image", class_names=class_names)


# ----------------------------------------------------------------------------------------------
# The embedded digits


def load_digits_dataset(resolution: int | None = None, channels: int | None = None) -> TensorDataset:
    """scikit-learn's bundled handwritten digits: 1,797 images 8x8, values 0..16 -> v / 8 - 1, labels 0..9.

    `resolution` other than 8 resizes with (antialiased) bilinear interpolation, e.g. 16 upsamples.
    """
    from sklearn.datasets import load_digits  # deferred: importing scikit-learn takes about a second

    digits = load_digits()
    x = torch.from_numpy(digits.images).float().div(8).sub(1).unsqueeze(1)  # exact: v / 8 is a dyadic
    labels = torch.from_numpy(digits.target).long()
    return _image_dataset("digits", x, labels, resolution, channels, class_names=[str(k) for k in range(10)])


# ----------------------------------------------------------------------------------------------
# User arrays: .npy / .npz and the arrays read from IDX files


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


def _check_finite(x: np.ndarray, where: str) -> None:
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise DataError(f"{where}: contains NaN or Inf values")


def _check_numeric(x: np.ndarray, where: str) -> None:
    if x.dtype.kind not in "biuf":
        raise DataError(f"{where}: dtype {x.dtype} is not numeric")


def _pixels(x: np.ndarray, where: str, value_range: tuple[float, float] | None) -> torch.Tensor:
    """Image values -> uint8 (kept 8-bit) or float32 in [-1, 1]; see the module docstring."""
    _check_numeric(x, where)
    _check_finite(x, where)
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
    _check_numeric(x, where)
    _check_finite(x, where)
    if not normalize:
        return torch.from_numpy(x.astype(np.float32)), None, None
    x64 = x.astype(np.float64)
    mean, std = x64.mean(axis=0), x64.std(axis=0)
    scale = SIGMA_D / np.where(std > 0, std, SIGMA_D)  # a constant column keeps scale 1
    data = torch.from_numpy(((x64 - mean) * scale).astype(np.float32))
    return data, torch.from_numpy(mean.astype(np.float32)), torch.from_numpy(scale.astype(np.float32))


def _labels(y: np.ndarray, n: int, where: str) -> torch.Tensor:
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


def _from_arrays(name: str, x: np.ndarray, y: np.ndarray | None, *, where: str,
                 labels_where: str | None = None, resolution: int | None = None, channels: int | None = None,
                 normalize: bool = True, value_range: tuple[float, float] | None = None) -> TensorDataset:
    """Arrays -> dataset: (N, D) becomes vectors, 3-D / 4-D arrays become images."""
    x = np.asarray(x)
    if x.ndim not in (2, 3, 4):
        _images_nchw(x, where)  # raises the layout error
    if x.shape[0] == 0 or x.size == 0:
        raise DataError(f"{where}: holds no examples (shape {x.shape})")
    labels = None if y is None else _labels(y, len(x), labels_where or where)
    if x.ndim == 2:
        for key, value in (("resolution", resolution), ("channels", channels), ("value_range", value_range)):
            if value is not None:
                raise DataError(f"{where}: {key} applies to images, but this holds vectors of shape {x.shape}")
        data, offset, scale = _vectors(x, where, normalize)
        return TensorDataset(name, data, labels, kind="vector", offset=offset, scale=scale)
    return _image_dataset(name, _pixels(_images_nchw(x, where), where, value_range), labels, resolution, channels)


def _load_array_file(path: Path, name: str, *, resolution: int | None = None, channels: int | None = None,
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
            return _from_arrays(name, loaded, None, where=f"'{path}'", **opts)
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
            return _from_arrays(name, loaded[key], y, where=f"'{path}' key {key!r}",
                                labels_where=f"'{path}' key {labels_key!r}", **opts)
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:  # not an array file, or pickled objects
        raise DataError(f"cannot read '{path}': {_one_line(err)}") from err


# ----------------------------------------------------------------------------------------------
# MNIST-format IDX files

# type code of the magic number's third byte -> big-endian dtype (http://yann.lecun.com/exdb/mnist/)
_IDX_TYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzip-compressed or raw, told apart by content): magic 0x0000TTNN (T type,
    N number of dims), N big-endian uint32 sizes, then the big-endian data. Native byte order out."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"IDX file not found: '{path}'")
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":  # the gzip magic
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as err:
            raise DataError(f"cannot decompress '{path}': {_one_line(err)}") from err
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES or data[3] == 0:
        raise DataError(f"'{path}': bad IDX magic number 0x{data[:4].hex() or '(empty)'}; expected 0x0000TTNN "
                        f"with type TT in 08, 09, 0B, 0C, 0D, 0E and NN >= 1 dimensions")
    dtype, ndim = _IDX_TYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"'{path}': IDX header truncated ({len(data)} bytes for {ndim} dimensions)")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = math.prod(dims) * dtype.itemsize
    if len(data) - header != expected:
        raise DataError(f"'{path}': IDX dims {dims} need {expected} data bytes, "
                        f"the file has {len(data) - header}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _idx_split(p: Path) -> str:
    return "test" if re.search(r"t10k|test", p.name.lower()) else "train"


def _is_idx_images(p: Path) -> bool:
    return p.is_file() and "idx3" in p.name.lower()


def _paired_labels(images: Path) -> Path | None:
    """train-images-idx3-ubyte[.gz] -> train-labels-idx1-ubyte[.gz], whichever exists."""
    stem = images.name.lower().removesuffix(".gz")
    base = images.name[:len(stem)].replace("images", "labels").replace("idx3", "idx1")
    return next((c for c in (images.with_name(base), images.with_name(base + ".gz")) if c.is_file()), None)


def _load_idx(path: Path, name: str, *, split: str = "train", resolution: int | None = None,
              channels: int | None = None, value_range: tuple[float, float] | None = None) -> TensorDataset:
    """A directory with MNIST-format files (`split` train: train-*, test: t10k-*), or one images file;
    labels come from the matching *-labels-idx1-ubyte[.gz] when it exists."""
    if path.is_file():
        images = path
    else:
        if split not in ("train", "test", "t10k"):
            raise DataError(f"split must be 'train' or 'test', got {split!r}")
        want = "test" if split in ("test", "t10k") else "train"
        found = sorted(p for p in path.iterdir() if _is_idx_images(p) and _idx_split(p) == want)
        plain = {p.name.lower() for p in found}
        # both x and x.gz (a download next to its extracted copy): read x
        found = [p for p in found if p.name.lower().removesuffix(".gz") not in plain - {p.name.lower()}]
        if len(found) != 1:
            listing = ", ".join(p.name for p in found) or "none"
            raise DataError(f"'{path}': expected one {want} images file (*-images-idx3-ubyte[.gz]), "
                            f"found {listing}")
        images = found[0]
    labels = _paired_labels(images)
    y = None if labels is None else read_idx(labels)
    return _from_arrays(name, read_idx(images), y, where=f"'{images}'", labels_where=f"'{labels}'",
                        resolution=resolution, channels=channels, value_range=value_range)


# ----------------------------------------------------------------------------------------------
# Fashion-MNIST and MNIST: IDX files from a local folder, or downloaded when asked

_IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
DATA_SEARCH_DIR = Path("/usr/share/datasets")  # where Debian's dataset-* packages install


class _NamedIDX:
    """A published IDX dataset: where to look for it, and where to download it from."""

    def __init__(self, name: str, title: str, mirrors: tuple[str, ...], md5: dict[str, str],
                 class_names: list[str], apt: str | None):
        self.name, self.title, self.mirrors, self.md5 = name, title, mirrors, md5
        self.class_names, self.apt = class_names, apt

    def folders(self, root: str | os.PathLike | None) -> list[Path]:
        """Where the files may be, in search order: `root` (or root/<name>) only when given; else
        `$FEWSTEP_DATA/<name>`, /usr/share/datasets/<name>, then the download cache."""
        if root is not None:
            root = Path(root).expanduser()
            return [root, root / self.name]
        env = os.environ.get("FEWSTEP_DATA")
        return ([Path(env).expanduser() / self.name] if env else []) + [DATA_SEARCH_DIR / self.name,
                                                                       self.cache_dir()]

    def cache_dir(self) -> Path:
        base = os.environ.get("FEWSTEP_CACHE") or Path.home() / ".cache" / "fewstep"
        return Path(base).expanduser() / self.name

    def find(self, folder: Path, split: str) -> tuple[Path, Path] | None:
        """(images, labels) of `split` in `folder`, each raw or .gz; None unless both are there."""
        found = []
        for stem in _IDX_FILES[split]:
            path = next((p for p in (folder / stem, folder / f"{stem}.gz") if p.is_file()), None)
            if path is None:
                return None
            found.append(path)
        return found[0], found[1]

    def download(self, split: str, dest: Path) -> tuple[Path, Path]:
        """Fetch the split's two .gz files into `dest`, each checked against its published MD5."""
        import hashlib
        import sys
        import urllib.request

        dest.mkdir(parents=True, exist_ok=True)
        out = []
        for stem in _IDX_FILES[split]:
            file = f"{stem}.gz"
            target = dest / file
            if not target.is_file():
                errors = []
                for mirror in self.mirrors:
                    url = mirror + file
                    print(f"fewstep: downloading {self.title} {file} from {url} to {dest}", file=sys.stderr)
                    try:
                        with urllib.request.urlopen(url, timeout=60) as resp:
                            payload = resp.read()
                    except OSError as err:
                        errors.append(f"{url}: {_one_line(err)}")
                        continue
                    digest = hashlib.md5(payload, usedforsecurity=False).hexdigest()
                    if digest != self.md5[file]:
                        errors.append(f"{url}: MD5 {digest}, expected {self.md5[file]}")
                        continue
                    tmp = target.with_name(f".{file}.part{os.getpid()}")
                    tmp.write_bytes(payload)
                    os.replace(tmp, target)  # only a verified file ever takes the final name
                    break
                else:
                    raise DataError(f"could not download {self.title} {file}: {'; '.join(errors)}")
            out.append(target)
        return out[0], out[1]

    def load(self, split: str = "train", root: str | os.PathLike | None = None, download: bool = False,
             resolution: int | None = None, channels: int | None = None) -> TensorDataset:
        if split not in _IDX_FILES:
            raise DataError(f"{self.name}: split must be 'train' or 'test', got {split!r}")
        folders = self.folders(root)
        files = next((f for f in map(lambda d: self.find(d, split), folders) if f is not None), None)
        if files is None:
            if download or os.environ.get("FEWSTEP_DOWNLOAD") == "1":
                files = self.download(split, folders[0] if root is not None else self.cache_dir())
            else:
                images, labels = _IDX_FILES[split]
                where = ", ".join(f"'{d}'" for d in folders)
                how = f"install them with `apt-get install {self.apt}` (offline, Debian/Ubuntu), " if self.apt else ""
                raise DataError(
                    f"{self.title} {split} files ({images}[.gz], {labels}[.gz]) not found in {where}; {how}"
                    f"put them in '{self.cache_dir()}' or $FEWSTEP_DATA/{self.name}, pass root=<folder>, or "
                    f"download them once (needs internet) with download=True, `--download` or FEWSTEP_DOWNLOAD=1")
        images, labels = files
        x, y = read_idx(images), read_idx(labels)
        if x.ndim != 3:
            raise DataError(f"'{images}': expected images (N, H, W), got shape {x.shape}")
        y = _labels(y, len(x), f"'{labels}'")
        if int(y.max()) >= len(self.class_names):
            raise DataError(f"'{labels}': label {int(y.max())} out of range for {len(self.class_names)} classes")
        pixels = _pixels(x[:, None], f"'{images}'", None)
        return _image_dataset(self.name, pixels, y, resolution, channels, class_names=list(self.class_names))


_FASHION_MNIST = _NamedIDX(
    "fashion-mnist", "Fashion-MNIST",
    ("https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
     "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"),
    {"train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
     "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
     "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
     "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310"},
    ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
    apt="dataset-fashion-mnist")

_MNIST = _NamedIDX(
    "mnist", "MNIST",
    ("https://ossci-datasets.s3.amazonaws.com/mnist/", "https://storage.googleapis.com/cvdf-datasets/mnist/"),
    {"train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
     "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
     "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
     "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"},
    [str(k) for k in range(10)], apt=None)


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None, download: bool = False,
                       resolution: int | None = None, channels: int | None = None) -> TensorDataset:
    """Fashion-MNIST (Xiao et al. 2017): 60,000 train / 10,000 test images (1, 28, 28), 10 classes.

    Looked for in `root` (or root/fashion-mnist) when given, else `$FEWSTEP_DATA/fashion-mnist`,
    /usr/share/datasets/fashion-mnist (Debian's `dataset-fashion-mnist`), `~/.cache/fewstep/fashion-mnist`
    (`$FEWSTEP_CACHE`). `download=True` (or the environment variable FEWSTEP_DOWNLOAD=1) fetches missing files
    into `root` or that cache, each checked against its published MD5.
    """
    return _FASHION_MNIST.load(split, root, download, resolution, channels)


def load_mnist(split: str = "train", root: str | os.PathLike | None = None, download: bool = False,
               resolution: int | None = None, channels: int | None = None) -> TensorDataset:
    """MNIST (LeCun et al. 1998): 60,000 train / 10,000 test images (1, 28, 28), digits 0..9.

    Looked for in `root` (or root/mnist) when given, else `$FEWSTEP_DATA/mnist`, /usr/share/datasets/mnist,
    `~/.cache/fewstep/mnist` (`$FEWSTEP_CACHE`); `download=True` (or FEWSTEP_DOWNLOAD=1) fetches missing files
    into `root` or that cache, each checked against its published MD5.
    """
    return _MNIST.load(split, root, download, resolution, channels)


# ----------------------------------------------------------------------------------------------
# Folders of images


def _read_image(path: Path) -> torch.Tensor:
    """One image file -> uint8 (C, H, W), C = 1 for grey modes, 3 otherwise (alpha dropped)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()  # decode now, so that a truncated file fails here and is named
            if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):  # 16-bit grey -> 8-bit
                arr = (np.asarray(im, dtype=np.float64) / 257).round().clip(0, 255).astype(np.uint8)
            elif im.mode in ("1", "L", "LA", "La", "F"):
                arr = np.asarray(im.convert("L"))
            else:
                arr = np.asarray((im.convert("RGBA") if im.mode == "P" else im).convert("RGB"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot read image '{path}': {_one_line(err)}") from err
    t = torch.from_numpy(np.array(arr, copy=True))
    return t[None] if t.ndim == 2 else t.permute(2, 0, 1).contiguous()


def _load_folder(path: Path, name: str, *, resolution: int | None = None,
                 channels: int | None = None) -> TensorDataset:
    """Every image under `path` (recursively, hidden entries skipped). When more than one top-level
    subfolder holds images, each such subfolder is a class (sorted names -> labels 0, 1, ...)."""
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise DataError(f"no images ({', '.join(e[1:] for e in IMAGE_EXTENSIONS)}) found under '{path}'")
    tops = [p.relative_to(path).parts[0] if len(p.relative_to(path).parts) > 1 else None for p in files]
    classes = sorted({t for t in tops if t is not None})
    labeled = len(classes) > 1
    if labeled and None in tops:
        loose = files[tops.index(None)]
        raise DataError(f"'{path}' has class subfolders ({', '.join(classes)}) and loose images such as "
                        f"'{loose.name}'; move them into a subfolder")
    images: list[torch.Tensor] = []
    for f in files:
        img = _read_image(f)
        if resolution is not None:
            img = _resize(img[None], resolution)[0]
        elif images and img.shape[1:] != images[0].shape[1:]:
            (h0, w0), (h, w) = images[0].shape[1:], img.shape[1:]
            raise DataError(f"'{f}' is {w}x{h} but '{files[0]}' is {w0}x{h0}; pass resolution= to resize "
                            f"all images to one square size")
        images.append(img)
    c = max(img.shape[0] for img in images)  # one colour image makes the whole set RGB
    pixels = torch.stack([img.expand(c, -1, -1) for img in images])
    labels = torch.tensor([classes.index(t) for t in tops]) if labeled else None
    return _image_dataset(name, pixels, labels, None, channels, class_names=classes if labeled else None)


# ----------------------------------------------------------------------------------------------
# Entry point


DATASETS: dict[str, Callable[..., Dataset]] = {
    "digits": load_digits_dataset,
    "8gaussians": EightGaussians,
    "checkerboard": Checkerboard,
    "moons": Moons,
    "swissroll": SwissRoll,
    "gaussian": GaussianDataset,
    "fashion-mnist": load_fashion_mnist,
    "mnist": load_mnist,
}


def _call_with_options(factory: Callable[..., Dataset], options: dict, what: str) -> Dataset:
    """Call `factory(**options)`, turning an option it does not take into a DataError naming the key."""
    accepted = [p for p in inspect.signature(factory).parameters if p not in ("path", "name")]
    for key in options:
        if key not in accepted:
            raise DataError(f"option {key!r} does not apply to {what}; "
                            f"its options: {', '.join(accepted) or 'none'}")
    return factory(**options)


def load_dataset(spec: str | os.PathLike, *, resolution: int | None = None, channels: int | None = None,
                 **kw) -> Dataset:
    """A registered name (see `DATASETS`; names win over same-named paths, write ./digits for a folder)
    or a path: a folder of images, a `.npy`/`.npz` file, or a folder (or file) of MNIST IDX files.

    `resolution` centre-crops and resizes images to a square; `channels` (1 or 3) converts grey/RGB.
    Other options: `split` (IDX, fashion-mnist, mnist: "train" or "test"), `root` / `download` (fashion-mnist,
    mnist: where the files are; fetch them when missing), `normalize` (vector arrays: rescale each dimension
    to mean 0, std 0.5, default True; `denormalize` maps back), `value_range` (arrays: the pixel range
    to map onto [-1, 1]), `key` / `labels_key` (npz), `dim` / `std` / `mean` (gaussian), `size` (toys).
    Every problem raises DataError with a one-line message.
    """
    if resolution is not None and (isinstance(resolution, bool) or not isinstance(resolution, int)
                                   or resolution < 1):
        raise DataError(f"resolution must be a positive integer, got {resolution!r}")
    if channels is not None and channels not in (1, 3):
        raise DataError(f"channels must be 1 or 3, got {channels!r}")
    if kw.get("value_range") is not None:
        vr = kw["value_range"]
        if not (isinstance(vr, (tuple, list)) and len(vr) == 2 and all(isinstance(v, numbers.Real) for v in vr)
                and math.isfinite(vr[0]) and math.isfinite(vr[1]) and vr[0] < vr[1]):
            raise DataError(f"value_range must be (low, high) with low < high, got {vr!r}")
        kw["value_range"] = (float(vr[0]), float(vr[1]))
    options = {k: v for k, v in (("resolution", resolution), ("channels", channels)) if v is not None} | kw
    if isinstance(spec, str) and spec in DATASETS:
        return _call_with_options(DATASETS[spec], options, f"dataset {spec!r}")
    text = os.fspath(spec)
    path = Path(text).expanduser()
    if not path.exists():
        if isinstance(spec, str) and "/" not in text and os.sep not in text and not path.suffix:
            raise DataError(f"unknown dataset {text!r}: known names are {', '.join(DATASETS)}; or pass a path "
                            f"to a folder of images, a .npy/.npz file, or a folder of MNIST IDX files")
        raise DataError(f"path not found: '{path}'")
    if path.is_dir():
        loader = _load_idx if any(_is_idx_images(p) for p in path.iterdir()) else _load_folder
    elif path.suffix.lower() in (".npy", ".npz"):
        loader = _load_array_file
    elif _is_idx_images(path):
        loader = _load_idx
    else:
        raise DataError(f"'{path}': unsupported file type; expected a folder of images, a .npy/.npz file, "
                        f"or MNIST IDX files")
    return _call_with_options(functools.partial(loader, path, text), options, f"'{path}'")
