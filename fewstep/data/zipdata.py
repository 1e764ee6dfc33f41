"""Zip archives of images (EDM's dataset_tool output), read lazily.

The same layout and rules as a folder (`folders.py`): members are the files, `dataset.json` inside
the archive holds the labels. An archive whose images all sit under one top folder (`zip -r a.zip a/`)
is read as that folder.

What is kept: the member names and, per member, where its bytes start and how they are compressed,
in flat arrays. Python's ZipFile keeps a ZipInfo object per member (~0.5 kB each, in every worker
process), so it is used only to list the archive once; a member is then read by seeking to its
local header. The file is opened lazily and again in each process (tracked by os.getpid()), because
a handle inherited through fork shares its file position with the parent; pickling drops the handle,
so the dataset also goes to spawned worker processes.
"""

from __future__ import annotations

import bz2
import io
import os
import struct
import zipfile
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from fewstep.data.base import DataError, one_line
from fewstep.data.folders import IMAGE_EXTENSIONS, LABELS_FILE, ImageFilesDataset, is_image_name

_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # APPNOTE 4.3.7: signature ... name length, extra length
_LOCAL_MAGIC = b"PK\x03\x04"
_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate", zipfile.ZIP_BZIP2: "bzip2"}


def _single_top_folder(names: list[str]) -> str:
    """'top/' when every name lies under the one folder `top`, else ''."""
    top = names[0].split("/", 1)[0] + "/" if "/" in names[0] else ""
    return top if top and all(n.startswith(top) for n in names) else ""


class ZipImageDataset(ImageFilesDataset):
    """Every image member of a zip archive, read lazily; see the module docstring."""

    def __init__(self, path: str | os.PathLike, name: str | None = None, *, resolution: int | None = None,
                 channels: int | None = None):
        self.path = os.fspath(Path(path).expanduser())
        self._handle: BinaryIO | None = None
        self._pid: int | None = None
        try:
            with zipfile.ZipFile(self.path) as archive:
                members = {i.filename: i for i in archive.infolist() if not i.is_dir()}
                images = sorted(n for n in members if is_image_name(n))
                if not images:
                    raise DataError(f"no images ({', '.join(e[1:] for e in IMAGE_EXTENSIONS)}) found in "
                                    f"'{self.path}'")
                top = "" if LABELS_FILE in members else _single_top_folder(images)
                labels_json = archive.read(top + LABELS_FILE) if top + LABELS_FILE in members else None
        except (OSError, zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, RuntimeError) as err:
            raise DataError(f"cannot read zip archive '{self.path}': {one_line(err)}") from err
        infos = [members[n] for n in images]
        for info in infos:
            if info.compress_type not in _METHODS or info.flag_bits & 0x1:
                how = "encrypted" if info.flag_bits & 0x1 else f"compressed with method {info.compress_type}"
                raise DataError(f"'{self.path}': member '{info.filename}' is {how}; this reader takes "
                                f"{', '.join(_METHODS.values())} (re-zip it, e.g. `zip -r -0`)")
        self._offsets = np.array([i.header_offset for i in infos], dtype=np.int64)
        self._packed_sizes = np.array([i.compress_size for i in infos], dtype=np.int64)
        self._sizes = np.array([i.file_size for i in infos], dtype=np.int64)
        self._crcs = np.array([i.CRC for i in infos], dtype=np.int64)
        self._methods = np.array([i.compress_type for i in infos], dtype=np.int64)
        self._top = top
        del members, infos  # the ZipInfo objects: the memory this class exists to give back
        super().__init__(os.fspath(path) if name is None else name, [n[len(top):] for n in images],
                         labels_json, f"{self.path}:{top}{LABELS_FILE}" if labels_json is not None else self.path,
                         resolution=resolution, channels=channels)

    def where(self, i: int) -> str:
        return f"{self.path}:{self._top}{self._names[i]}"

    def _file(self) -> BinaryIO:
        if self._handle is None or self._pid != os.getpid():  # first use in this process
            self._handle, self._pid = open(self.path, "rb"), os.getpid()
        return self._handle

    def open_image(self, i: int) -> BinaryIO:
        """Member i's bytes: seek to its local header, skip the header, read, inflate, check the CRC."""
        f = self._file()
        f.seek(int(self._offsets[i]))
        header = f.read(_LOCAL_HEADER.size)
        if len(header) != _LOCAL_HEADER.size or header[:4] != _LOCAL_MAGIC:
            raise DataError(f"cannot read image '{self.where(i)}': no local file header at its offset; "
                            f"the archive changed or is damaged")
        *_, name_length, extra_length = _LOCAL_HEADER.unpack(header)
        f.seek(name_length + extra_length, os.SEEK_CUR)
        data = f.read(int(self._packed_sizes[i]))
        try:
            if self._methods[i] == zipfile.ZIP_DEFLATED:
                data = zlib.decompress(data, -15)  # raw deflate stream, no zlib header
            elif self._methods[i] == zipfile.ZIP_BZIP2:
                data = bz2.decompress(data)
        except (zlib.error, OSError, ValueError) as err:
            raise DataError(f"cannot read image '{self.where(i)}': {one_line(err)}") from err
        if len(data) != self._sizes[i] or zlib.crc32(data) != self._crcs[i]:
            raise DataError(f"cannot read image '{self.where(i)}': size or CRC mismatch; the archive is damaged")
        return io.BytesIO(data)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handle"] = state["_pid"] = None  # an open file does not pickle; reopened on first read
        return state

    def close(self) -> None:
        """Close this process's handle (reopened if the dataset is read again)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None
