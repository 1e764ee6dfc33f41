"""CIFAR-10 (Krizhevsky 2009), python version: `cifar-10-python.tar.gz` or its extracted folder.

The archive's `cifar-10-batches-py/` holds data_batch_1..5 (train, 50,000 images), test_batch
(10,000) and batches.meta (class names). Each is a Python pickle of a dict: b"data" a uint8 array
(N, 3072) whose rows are 3x32x32 channel-first, b"labels" a list of N class indices.

Pickles run code by design (unpickling calls whatever class or function the stream names), so they
are read with an unpickler that rebuilds numpy arrays and nothing else: any other name in the stream
is refused with a DataError before it is called.
"""

from __future__ import annotations

import codecs
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import torch

from fewstep.data.arrays import class_labels
from fewstep.data.base import DataError, TensorDataset, image_dataset, one_line

ARCHIVE_NAME = "cifar-10-python.tar.gz"
FOLDER_NAME = "cifar-10-batches-py"
_SPLITS = {"train": tuple(f"data_batch_{k}" for k in range(1, 6)), "test": ("test_batch",)}
_META = "batches.meta"

try:  # numpy >= 2 moved it; pickles name either module, whichever numpy wrote them
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """What protocol-2 pickles written by Python 3 call to rebuild bytes; only latin-1 is honoured."""
    if encoding not in ("latin1", "latin-1"):
        raise DataError(f"refusing _codecs.encode with encoding {encoding!r} in a pickle")
    return codecs.encode(text, "latin1")


_ALLOWED = {  # (module, name) in the pickle -> what it may build
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class _ArrayUnpickler(pickle.Unpickler):
    """Builds dicts, lists, strings, numbers and numpy arrays; refuses every other global."""

    def __init__(self, data: bytes, where: str):
        super().__init__(io.BytesIO(data), encoding="bytes")  # Python 2 str -> bytes, as the files hold
        self.where = where

    def find_class(self, module: str, name: str):
        allowed = _ALLOWED.get((module, name))
        if allowed is None:
            raise DataError(f"'{self.where}': refusing to load {module}.{name} from a pickle; only numpy "
                            f"arrays are accepted (the file is not CIFAR-10 or was tampered with)")
        return allowed

    def persistent_load(self, pid):
        raise DataError(f"'{self.where}': refusing a persistent id in a pickle")


def _unpickle(data: bytes, where: str) -> dict:
    try:
        out = _ArrayUnpickler(data, where).load()
    except DataError:
        raise
    except Exception as err:  # a malformed stream can raise nearly anything (UnpicklingError, TypeError...)
        raise DataError(f"cannot read '{where}': {one_line(err) or type(err).__name__}") from err
    if not isinstance(out, dict):
        raise DataError(f"'{where}': expected a pickled dict, got {type(out).__name__}")
    return out


def _get(d: dict, key: str):
    """d[b"key"] as the real files hold it (Python 2 str read as bytes), or d["key"]."""
    return d[key.encode()] if key.encode() in d else d.get(key)


def _read_members(path: Path, names: list[str]) -> dict[str, bytes]:
    """The bytes of cifar-10-batches-py/<name> for each name, from the archive or the extracted folder."""
    if path.is_dir():
        folder = path if (path / _META).is_file() else path / FOLDER_NAME
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise DataError(f"'{folder}': missing {', '.join(missing)}; expected the extracted {ARCHIVE_NAME}")
        return {n: (folder / n).read_bytes() for n in names}
    wanted = {f"{FOLDER_NAME}/{n}": n for n in names}
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:  # one pass: seeking back in a .gz stream would decompress again
                if member.name in wanted and member.isfile():
                    found[wanted[member.name]] = tar.extractfile(member).read()
    except (OSError, tarfile.TarError, EOFError) as err:
        raise DataError(f"cannot read '{path}': {one_line(err)}") from err
    missing = [n for n in names if n not in found]
    if missing:
        raise DataError(f"'{path}': no {', '.join(f'{FOLDER_NAME}/{n}' for n in missing)} in the archive")
    return found


def load_cifar10(path: str | os.PathLike, split: str = "train", *, resolution: int | None = None,
                 channels: int | None = None, name: str | None = None) -> TensorDataset:
    """CIFAR-10 from `cifar-10-python.tar.gz` or the extracted `cifar-10-batches-py` folder:
    "train" 50,000 or "test" 10,000 images (3, 32, 32) in 10 classes, kept in memory as uint8."""
    if split not in _SPLITS:
        raise DataError(f"CIFAR-10: split must be 'train' or 'test', got {split!r}")
    path = Path(path).expanduser()
    members = _read_members(path, [_META, *_SPLITS[split]])
    where = {n: f"{path}:{n}" for n in members}
    label_names = _get(_unpickle(members[_META], where[_META]), "label_names")
    if not isinstance(label_names, list) or not all(isinstance(c, (bytes, str)) for c in label_names):
        raise DataError(f"'{where[_META]}': expected label_names, a list of class names")
    class_names = [c.decode() if isinstance(c, bytes) else c for c in label_names]
    images, labels = [], []
    for member in _SPLITS[split]:
        batch = _unpickle(members.pop(member), where[member])  # pop: drop each raw pickle once read
        data, y = _get(batch, "data"), _get(batch, "labels")
        if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
                and data.shape[1] == 3 * 32 * 32):
            found = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
            raise DataError(f"'{where[member]}': expected data, a uint8 array (N, 3072), got {found}")
        if y is None:
            raise DataError(f"'{where[member]}': no labels")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(class_labels(np.asarray(y), len(data), f"'{where[member]}' labels"))
    y = torch.cat(labels)
    if int(y.max()) >= len(class_names):
        raise DataError(f"'{path}': label {int(y.max())} out of range for {len(class_names)} classes")
    pixels = torch.from_numpy(np.concatenate(images))
    return image_dataset(os.fspath(path) if name is None else name, pixels, y, resolution, channels,
                         class_names=class_names)


def is_cifar10(path: Path) -> bool:
    """The archive (by its name) or the extracted folder (by its files)."""
    if path.is_file():
        return path.name.lower().endswith(ARCHIVE_NAME)
    return (path / _META).is_file() or (path / FOLDER_NAME / _META).is_file()
