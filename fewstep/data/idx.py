"""MNIST-format IDX files: the reader, folders of them, and Fashion-MNIST / MNIST found locally or
downloaded when asked (each file checked against its published MD5)."""

from __future__ import annotations

import gzip
import math
import os
import re
import struct
import zlib
from pathlib import Path

import numpy as np

from fewstep.data.arrays import array_pixels, class_labels, dataset_from_arrays
from fewstep.data.base import DataError, TensorDataset, image_dataset, one_line

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
            raise DataError(f"cannot decompress '{path}': {one_line(err)}") from err
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


def is_idx_images(p: Path) -> bool:
    return p.is_file() and "idx3" in p.name.lower()


def _paired_labels(images: Path) -> Path | None:
    """train-images-idx3-ubyte[.gz] -> train-labels-idx1-ubyte[.gz], whichever exists."""
    stem = images.name.lower().removesuffix(".gz")
    base = images.name[:len(stem)].replace("images", "labels").replace("idx3", "idx1")
    return next((c for c in (images.with_name(base), images.with_name(base + ".gz")) if c.is_file()), None)


def load_idx(path: Path, name: str, *, split: str = "train", resolution: int | None = None,
              channels: int | None = None, value_range: tuple[float, float] | None = None) -> TensorDataset:
    """A directory with MNIST-format files (`split` train: train-*, test: t10k-*), or one images file;
    labels come from the matching *-labels-idx1-ubyte[.gz] when it exists."""
    if path.is_file():
        images = path
    else:
        if split not in ("train", "test", "t10k"):
            raise DataError(f"split must be 'train' or 'test', got {split!r}")
        want = "test" if split in ("test", "t10k") else "train"
        found = sorted(p for p in path.iterdir() if is_idx_images(p) and _idx_split(p) == want)
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
    return dataset_from_arrays(name, read_idx(images), y, where=f"'{images}'", labels_where=f"'{labels}'",
                        resolution=resolution, channels=channels, value_range=value_range)


# ----------------------------------------------------------------------------------------------
# Fashion-MNIST and MNIST: IDX files from a local folder, or downloaded when asked

_IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
DATA_SEARCH_DIR = Path("/usr/share/datasets")  # where Debian's dataset-* packages install


def _search_dir() -> Path:
    """DATA_SEARCH_DIR as the package `fewstep.data` holds it now: setting `fewstep.data.DATA_SEARCH_DIR`
    (tests do, to hide an installed dataset) takes effect here."""
    import fewstep.data

    return fewstep.data.DATA_SEARCH_DIR


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
        return ([Path(env).expanduser() / self.name] if env else []) + [_search_dir() / self.name,
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
                        errors.append(f"{url}: {one_line(err)}")
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
        y = class_labels(y, len(x), f"'{labels}'")
        if int(y.max()) >= len(self.class_names):
            raise DataError(f"'{labels}': label {int(y.max())} out of range for {len(self.class_names)} classes")
        pixels = array_pixels(x[:, None], f"'{images}'", None)
        return image_dataset(self.name, pixels, y, resolution, channels, class_names=list(self.class_names))


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
