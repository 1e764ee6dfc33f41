"""Folders of image files, read lazily (EDM's dataset_tool layout or class subfolders).

Only the sorted list of relative file names (and the labels) is kept; each image is decoded,
converted to the dataset's channel count (grey -> RGB by copying, RGB -> grey with ITU-R 601) and
resized (centre crop + antialiased bilinear) when a batch asks for it, so memory does not grow with
the number of images. The FIRST image fixes the channel count and, without `resolution`, the size:
an image of another size is an error when it is read.

Labels: `dataset.json` at the root wins (EDM: `{"labels": [["00000/img00000000.png", 6], ...]}`,
or `{"labels": null}` for none); otherwise, when more than one top-level subfolder holds images,
each such subfolder is a class (sorted names -> labels 0, 1, ...). A `metadata.jsonl` at the root
(Hugging Face imagefolder captions) makes a prompt dataset instead (`fewstep.data.prompts`).
"""

from __future__ import annotations

import abc
import json
import operator
import os
from pathlib import Path
from collections.abc import Iterable, Sequence
from typing import BinaryIO

import numpy as np
import torch

from fewstep.data.base import DataError, Dataset, convert_channels, decode_pixels, one_line, resize_images
from fewstep.data.prompts import METADATA_FILE, prompts_from_metadata

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
LABELS_FILE = "dataset.json"


def is_image_name(name: str) -> bool:
    """A '/'-separated relative name with an image extension, hidden in no part."""
    return (os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
            and not any(part.startswith(".") for part in name.split("/")))


def read_image(source: str | os.PathLike | BinaryIO, where: str) -> torch.Tensor:
    """One image file (a path or an open binary file) -> uint8 (C, H, W), C = 1 for grey modes,
    3 otherwise (alpha dropped). `where` names the file in errors."""
    from PIL import Image

    try:
        with Image.open(source) as im:
            im.load()  # decode now, so that a truncated file fails here and is named
            if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):  # 16-bit grey -> 8-bit
                arr = (np.asarray(im, dtype=np.float64) / 257).round().clip(0, 255).astype(np.uint8)
            elif im.mode in ("1", "L", "LA", "La", "F"):
                arr = np.asarray(im.convert("L"))
            else:
                arr = np.asarray((im.convert("RGBA") if im.mode == "P" else im).convert("RGB"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot read image '{where}': {one_line(err)}") from err
    t = torch.from_numpy(np.array(arr, copy=True))
    return t[None] if t.ndim == 2 else t.permute(2, 0, 1).contiguous()


class NameList(Sequence[str]):
    """Strings packed in one bytes buffer with an array of end offsets.

    Why not a list: a million Python str cost ~60 bytes of header each, and DataLoader workers forked
    from the main process copy every memory page whose reference counts they touch (PyTorch issue
    13246), so a list is copied once per worker; two flat buffers are small and only ever read.
    """

    def __init__(self, names: Iterable[str]):
        encoded = [n.encode("utf-8", "surrogateescape") for n in names]  # any file name round-trips
        self._ends = np.cumsum([len(b) for b in encoded], dtype=np.int64)
        self._buffer = b"".join(encoded)

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, i: int) -> str:
        i = operator.index(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"name index {i} out of range for {len(self)} names")
        i %= len(self)
        start = int(self._ends[i - 1]) if i > 0 else 0
        return self._buffer[start:int(self._ends[i])].decode("utf-8", "surrogateescape")


def labels_from_json(text: bytes, names: Sequence[str], where: str) -> torch.Tensor | None:
    """Labels in `names` order from EDM's dataset.json; None for `"labels": null`."""
    expected = 'expected {"labels": [["<file>", <class index >= 0>], ...]} or {"labels": null}'
    try:
        meta = json.loads(text)
    except ValueError as err:  # also a file that is not UTF-8
        raise DataError(f"'{where}': not valid JSON ({one_line(err)}); {expected}") from err
    if not isinstance(meta, dict) or "labels" not in meta:
        raise DataError(f"'{where}': no \"labels\" key; {expected}")
    table = meta["labels"]
    if table is None:
        return None
    if not isinstance(table, list):
        raise DataError(f"'{where}': \"labels\" is a {type(table).__name__}; {expected}")
    for entry in table:
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
                and isinstance(entry[1], int) and not isinstance(entry[1], bool) and entry[1] >= 0):
            raise DataError(f"'{where}': bad entry {json.dumps(entry)[:80]}; {expected}")
    lookup = {file.replace("\\", "/"): label for file, label in table}
    try:
        return torch.tensor([lookup[n] for n in names], dtype=torch.int64)
    except KeyError as err:
        raise DataError(f"'{where}': no label for '{err.args[0]}'") from None


def labels_from_subfolders(names: Sequence[str], where: str) -> tuple[torch.Tensor | None, list[str] | None]:
    """(labels, class names) when more than one top-level subfolder holds images, else (None, None)."""
    tops = [n.split("/", 1)[0] if "/" in n else None for n in names]
    classes = sorted({t for t in tops if t is not None})
    if len(classes) <= 1:
        return None, None
    if None in tops:
        loose = names[tops.index(None)]
        raise DataError(f"'{where}' has class subfolders ({', '.join(classes)}) and loose images such as "
                        f"'{loose}'; move them into a subfolder")
    index = {c: k for k, c in enumerate(classes)}
    return torch.tensor([index[t] for t in tops], dtype=torch.int64), classes


class ImageFilesDataset(Dataset):
    """Image files read when a batch asks for them; subclasses say how to open one and how to name it.

    `names`: sorted '/'-separated names relative to the dataset's root; `labels_json`: the bytes of
    its dataset.json, None when there is none.
    """

    kind = "image"

    def __init__(self, name: str, names: list[str], labels_json: bytes | None, labels_where: str, *,
                 resolution: int | None = None, channels: int | None = None):
        self.name, self._resolution = name, resolution
        self._names = NameList(names)
        if labels_json is not None:
            self._labels, self.class_names = labels_from_json(labels_json, names, labels_where), None
        else:
            self._labels, self.class_names = labels_from_subfolders(names, labels_where)
        self.num_classes = 0 if self._labels is None else (
            len(self.class_names) if self.class_names else int(self._labels.max()) + 1)
        first = read_image(self.open_image(0), self.where(0))
        self._first_size = tuple(first.shape[1:])
        self._channels = channels or first.shape[0]
        self.shape = (self._channels, *((resolution, resolution) if resolution else self._first_size))

    @abc.abstractmethod
    def open_image(self, i: int) -> str | BinaryIO:
        """Image i as something PIL can open: a path or a binary file."""

    @abc.abstractmethod
    def where(self, i: int) -> str:
        """Image i's name for error messages."""

    def __len__(self) -> int:
        return len(self._names)

    def read(self, i: int) -> torch.Tensor:
        """Image i as uint8 in the dataset's shape (C, H, W)."""
        img = read_image(self.open_image(i), self.where(i))
        if self._resolution is not None:
            img = resize_images(img[None], self._resolution)[0]
        elif tuple(img.shape[1:]) != self._first_size:
            (h0, w0), (h, w) = self._first_size, img.shape[1:]
            raise DataError(f"'{self.where(i)}' is {w}x{h} but '{self.where(0)}' is {w0}x{h0}; pass resolution= "
                            f"to resize all images to one square size")
        return convert_channels(img[None], self._channels)[0]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, ...]:
        x = decode_pixels(torch.stack([self.read(i) for i in indices]))
        if self._labels is None:
            return (x,)
        return x, self._labels[torch.as_tensor(indices, dtype=torch.int64)]


def list_image_files(root: str) -> list[str]:
    """Sorted '/'-separated paths, relative to `root`, of the image files under it; hidden files and
    folders are skipped, symbolic links to folders are not followed. os.scandir: no stat per file."""
    found, pending = [], [""]
    while pending:
        rel = pending.pop()
        with os.scandir(os.path.join(root, rel)) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                name = f"{rel}/{entry.name}" if rel else entry.name
                if entry.is_dir(follow_symlinks=False):
                    pending.append(name)
                elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS and entry.is_file():
                    found.append(name)
    found.sort()
    return found


class ImageFolderDataset(ImageFilesDataset):
    """Every image under a folder (recursively), read lazily; see the module docstring."""

    def __init__(self, path: str | os.PathLike, name: str | None = None, *, resolution: int | None = None,
                 channels: int | None = None):
        self.root = os.fspath(Path(path).expanduser())
        names = list_image_files(self.root)
        if not names:
            raise DataError(f"no images ({', '.join(e[1:] for e in IMAGE_EXTENSIONS)}) found under '{self.root}'")
        labels_file = os.path.join(self.root, LABELS_FILE)
        labels_json = Path(labels_file).read_bytes() if os.path.isfile(labels_file) else None
        captions = None
        metadata = os.path.join(self.root, METADATA_FILE)
        if os.path.isfile(metadata):  # Hugging Face imagefolder captions: a prompt dataset (fewstep.data.prompts)
            names, captions = prompts_from_metadata(Path(metadata).read_bytes(), set(names), metadata)
            labels_json = None
        super().__init__(os.fspath(path) if name is None else name, names, labels_json,
                         labels_file if labels_json is not None else self.root,
                         resolution=resolution, channels=channels)
        self.prompts = None  # the distinct captions; labels index them
        if captions is not None:
            self.prompts = sorted(set(captions))
            index = {p: i for i, p in enumerate(self.prompts)}
            self._labels = torch.tensor([index[c] for c in captions], dtype=torch.int64)
            self.class_names, self.num_classes = None, 0

    def open_image(self, i: int) -> str:
        return self.where(i)

    def where(self, i: int) -> str:
        return os.path.join(self.root, self._names[i])
