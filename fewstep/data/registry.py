"""`load_dataset(spec)`: a registered name, else a path whose kind is told from its name and contents."""

from __future__ import annotations

import functools
import inspect
import math
import numbers
import os
from pathlib import Path
from typing import Callable, TypeVar

from fewstep.data.arrays import load_array_file
from fewstep.data.base import DataError, Dataset
from fewstep.data.cifar import ARCHIVE_NAME, is_cifar10, load_cifar10
from fewstep.data.digits import load_digits_dataset
from fewstep.data.folders import ImageFolderDataset
from fewstep.data.idx import is_idx_images, load_fashion_mnist, load_idx, load_mnist
from fewstep.data.toys import Checkerboard, EightGaussians, GaussianDataset, Moons, SwissRoll
from fewstep.data.zipdata import ZipImageDataset

Factory = TypeVar("Factory", bound=Callable[..., Dataset])

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

# File types other layers add (`register_file_type`): suffix -> (loader, what it is). The latents of
# `fewstep encode` are read by `fewstep.interop.diffusers.latents`, which registers ".safetensors".
FILE_TYPES: dict[str, tuple[Callable[..., Dataset], str]] = {}


def _path_kinds() -> str:
    kinds = ["a folder of images", "a .zip of images", "a .npy/.npz file", "a folder of MNIST IDX files",
             ARCHIVE_NAME, *(what for _, what in FILE_TYPES.values())]
    return ", ".join(kinds[:-1]) + ", or " + kinds[-1]


def register_dataset(name: str) -> Callable[[Factory], Factory]:
    """Decorator: make `load_dataset(name, **options)` (and `--data name`) call the decorated factory.

        @register_dataset("faces")
        def faces(resolution=None, channels=None, split="train"):
            return ImageFolderDataset(f"/data/faces/{split}", "faces", resolution=resolution, channels=channels)

    The factory returns a `Dataset`; an option it does not take is refused with a DataError naming it.
    """
    if not isinstance(name, str) or not name or "/" in name or os.sep in name:
        raise DataError(f"a dataset name is a non-empty string without '/', got {name!r}")

    def register(factory: Factory) -> Factory:
        if DATASETS.get(name, factory) is not factory:
            raise DataError(f"dataset name {name!r} is already registered to {DATASETS[name]!r}")
        DATASETS[name] = factory
        return factory

    return register


def register_file_type(suffix: str, loader: Callable[..., Dataset], what: str) -> None:
    """Make `load_dataset(path)` read files ending in `suffix` (e.g. ".safetensors") with
    `loader(path, name=..., **options)`; `what` describes them in error messages."""
    if not suffix.startswith(".") or suffix.lower() in (".npy", ".npz", ".zip"):  # those are read before FILE_TYPES
        raise DataError(f"a file type is a new suffix such as '.h5', got {suffix!r}")
    known = FILE_TYPES.get(suffix.lower())
    if known is not None and known[0] is not loader:
        raise DataError(f"file type {suffix!r} is already registered to {known[0]!r}")
    FILE_TYPES[suffix.lower()] = (loader, what)


def _call_with_options(factory: Callable[..., Dataset], options: dict, what: str) -> Dataset:
    """Call `factory(**options)`, turning an option it does not take into a DataError naming the key."""
    accepted = [p for p in inspect.signature(factory).parameters if p not in ("path", "name")]
    for key in options:
        if key not in accepted:
            raise DataError(f"option {key!r} does not apply to {what}; "
                            f"its options: {', '.join(accepted) or 'none'}")
    return factory(**options)


def _path_loader(path: Path) -> Callable[..., Dataset]:
    """The loader for a path, from its name and contents; called as loader(path, name=..., **options)."""
    if is_cifar10(path):
        return load_cifar10
    if path.is_dir():
        return load_idx if any(is_idx_images(p) for p in path.iterdir()) else ImageFolderDataset
    suffix = path.suffix.lower()
    if suffix in (".npy", ".npz"):
        return load_array_file
    if suffix == ".zip":
        return ZipImageDataset
    if suffix in FILE_TYPES:
        return FILE_TYPES[suffix][0]
    if is_idx_images(path):
        return load_idx
    raise DataError(f"'{path}': unsupported file type; expected {_path_kinds()}")


def load_dataset(spec: str | os.PathLike, *, resolution: int | None = None, channels: int | None = None,
                 **kw) -> Dataset:
    """A registered name (see `DATASETS`; names win over same-named paths, write ./digits for a folder)
    or a path: a folder of images (read lazily; EDM's dataset_tool layout with dataset.json, or class
    subfolders), a .zip of such a folder (lazily), a `.npy`/`.npz` file, a folder (or file) of MNIST IDX
    files, CIFAR-10's `cifar-10-python.tar.gz` (or its extracted folder), or a file type another module
    registered (`register_file_type`: `fewstep.interop.diffusers.latents` reads `.safetensors` latents).

    `resolution` centre-crops and resizes images to a square; `channels` (1 or 3) converts grey/RGB.
    Other options: `split` (IDX, CIFAR-10, fashion-mnist, mnist: "train" or "test"), `root` / `download`
    (fashion-mnist, mnist: where the files are; fetch them when missing), `normalize` (vector arrays:
    rescale each dimension to mean 0, std 0.5, default True; `denormalize` maps back), `value_range`
    (arrays: the pixel range to map onto [-1, 1]), `key` / `labels_key` (npz), `dim` / `std` / `mean`
    (gaussian), `size` / `seed` (toys, gaussian). Every problem raises DataError with a one-line message.
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
                            f"to {_path_kinds()}")
        raise DataError(f"path not found: '{path}'")
    loader = _path_loader(path)
    return _call_with_options(functools.partial(loader, path, name=text), options, f"'{path}'")
