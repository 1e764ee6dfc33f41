"""The dataset contract: a map-style torch Dataset that hands out whole batches; in-memory storage.

A batch is `dataset.__getitems__(indices)` -> `(x,)` or `(x, labels)`: x float32 (images in [-1, 1],
(B, C, H, W); vectors (B, D)), labels int64 (B,). torch's DataLoader calls `__getitems__` itself when
a dataset has it, so one call reads or decodes a whole batch (see `loader.py`).
"""

from __future__ import annotations

import abc
import hashlib
import operator
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from fewstep.core.trigflow import SIGMA_D  # the data std every dataset is scaled to

_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 grey, the weights of PIL's convert("L")
_ALL_CHUNK = 1024  # examples per read when all() gathers a dataset


class DataError(ValueError):
    """A problem with the data a user asked for; the message is one line naming the path or key."""


def one_line(err: BaseException | str) -> str:
    return " ".join(str(err).split())


def check_count(value, what: str) -> None:
    """A positive int (bool refused), else a DataError naming `what`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DataError(f"{what} must be a positive integer, got {value!r}")


def unpack_batch(batch, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A batch `x`, `(x,)` or `(x, labels)` -> `(x, labels or None)`, moved to `device` (the
    batch forms `fewstep.fit` takes from any iterable)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device), None
    if not (isinstance(batch, (tuple, list)) and len(batch) in (1, 2) and isinstance(batch[0], torch.Tensor)):
        raise TypeError(f"a batch must be a tensor x0, (x0,) or (x0, labels); got {type(batch).__name__}"
                        + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""))
    x = batch[0].to(device)
    return x, (batch[1].to(device) if len(batch) == 2 and batch[1] is not None else None)


def index_spans(n: int, batch_size: int, limit: int | None = None) -> Iterator[range]:
    """Consecutive ranges of `batch_size` indices covering the first `limit` of `n` (all when None)."""
    check_count(batch_size, "batch_size")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise DataError(f"limit must be a non-negative integer or None, got {limit!r}")
    stop = n if limit is None else min(limit, n)
    return (range(start, min(start + batch_size, stop)) for start in range(0, stop, batch_size))


def batch_generator(indices: list[int], seed: int) -> torch.Generator:
    """A CPU generator seeded by a hash of (seed, indices): data drawn from it is a function of the
    batch's indices alone, so it is the same in any worker process and after a resume."""
    key = np.asarray([seed, *indices], dtype=np.int64).tobytes()
    digest = hashlib.blake2b(key, digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)  # 63 bits: any torch accepts


# ----------------------------------------------------------------------------------------------
# The interface


class Dataset(torch.utils.data.Dataset, abc.ABC):
    """Examples by index, read a batch at a time; see the module docstring for value conventions."""

    name: str
    kind: str  # "image" or "vector"
    shape: tuple[int, ...]  # (C, H, W) or (D,)
    num_classes: int = 0  # 0 when unlabeled
    class_names: list[str] | None = None
    offset: torch.Tensor | None = None  # model space = (data - offset) * scale; None: identity
    scale: torch.Tensor | None = None

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of examples (the nominal size `TOY_SIZE` for on-the-fly datasets)."""

    @abc.abstractmethod
    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, ...]:
        """The batch of these examples: `(x,)` unlabeled, `(x, labels)` labeled."""

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        """One example: `(x,)` or `(x, label)` without the batch dimension."""
        n, i = len(self), operator.index(i)
        if not -n <= i < n:  # also ends Python's legacy iteration over __getitem__
            raise IndexError(f"index {i} out of range for {n} examples")
        return tuple(t[0] for t in self.__getitems__([i % n]))

    def sample(self, batch_size: int, device: torch.device | str | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A random batch `(x, labels or None)`, indices drawn with torch's global CPU RNG only."""
        check_count(batch_size, "batch_size")
        idx = torch.randint(len(self), (batch_size,))  # global CPU RNG: resumable via get_rng_state
        return unpack_batch(self.__getitems__(idx.tolist()), device)

    def batches(self, batch_size: int, limit: int | None = None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """`(x, labels or None)` for the first `limit` examples (all when None) in index order,
        `batch_size` at a time, each read when asked for: concatenated, they are `all()[:limit]`."""
        for span in index_spans(len(self), batch_size, limit):
            yield unpack_batch(self.__getitems__(list(span)))

    def all(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Every example as float32 in one tensor (a fixed-seed draw of len(self) for on-the-fly data)."""
        x = torch.empty((len(self), *self.shape))  # filled in place: no second copy at the end
        labels = None
        start = 0
        for xb, yb in self.batches(_ALL_CHUNK):
            x[start:start + len(xb)] = xb
            if yb is not None:
                labels = torch.empty(len(self), dtype=torch.int64) if labels is None else labels
                labels[start:start + len(yb)] = yb
            start += len(xb)
        return x, labels

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Map model-space samples back to the data's own coordinates (identity for images)."""
        if self.scale is None or self.offset is None:
            return x
        return x / self.scale.to(x) + self.offset.to(x)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, kind={self.kind!r}, shape={self.shape}, "
                f"len={len(self)}, num_classes={self.num_classes})")


# ----------------------------------------------------------------------------------------------
# Pixels: uint8 storage, resizing, channel conversion


def decode_pixels(x: torch.Tensor) -> torch.Tensor:
    """uint8 storage -> float32 in [-1, 1]; float storage is already there."""
    return x.float() / 127.5 - 1 if x.dtype == torch.uint8 else x


def resize_images(x: torch.Tensor, resolution: int, chunk: int = 1024) -> torch.Tensor:
    """Centre-crop (N, C, H, W) to a square, then antialiased bilinear to `resolution`; keeps the dtype.

    Antialiased bilinear is a triangle filter (PIL's BILINEAR): unlike LANCZOS it never overshoots,
    so images stay inside [-1, 1].
    """
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


def convert_channels(x: torch.Tensor, channels: int | None) -> torch.Tensor:
    """(N, C, H, W): grey -> RGB by copying; RGB -> grey with the ITU-R 601 weights (as PIL). Keeps the dtype."""
    if channels is None or channels == x.shape[1]:
        return x
    if x.shape[1] == 1:
        return x.repeat(1, 3, 1, 1)
    y = (x.float() * torch.tensor(_LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True)
    return y.round().clamp(0, 255).to(torch.uint8) if x.dtype == torch.uint8 else y


# ----------------------------------------------------------------------------------------------
# Examples held in memory


class TensorDataset(Dataset):
    """Stored examples: images as uint8 (decoded per batch, 4x smaller) or float32 in [-1, 1]
    (N, C, H, W), vectors as float32 (N, D)."""

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

    def __len__(self) -> int:
        return len(self._x)

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, ...]:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        x = decode_pixels(self._x[idx])
        return (x,) if self._labels is None else (x, self._labels[idx])

    def sample(self, batch_size: int, device: torch.device | str | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        check_count(batch_size, "batch_size")
        idx = torch.randint(len(self._x), (batch_size,))  # global CPU RNG: resumable via get_rng_state
        x = decode_pixels(self._x[idx].to(device))  # move uint8 before decoding: 4x less to transfer
        return x, None if self._labels is None else self._labels[idx].to(device)

    def all(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = decode_pixels(self._x)
        return (x.clone() if x is self._x else x), None if self._labels is None else self._labels.clone()


def image_dataset(name: str, pixels: torch.Tensor, labels: torch.Tensor | None, resolution: int | None,
                  channels: int | None, class_names: list[str] | None = None) -> TensorDataset:
    """Images (N, C, H, W), uint8 or float32 in [-1, 1], resized and converted as asked, kept in memory."""
    if resolution is not None:
        pixels = resize_images(pixels, resolution)
    return TensorDataset(name, convert_channels(pixels, channels), labels, kind="image", class_names=class_names)
