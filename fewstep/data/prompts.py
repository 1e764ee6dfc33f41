"""Captioned images in the Hugging Face imagefolder layout, and the prompt table a text-to-image run
trains with.

    images/metadata.jsonl:   {"file_name": "0001.png", "text": "a handwritten digit three"}

An image folder with a `metadata.jsonl` at its root is a prompt dataset: its labels are indices into
`dataset.prompts` (the distinct captions, sorted), so batches, shuffling and resuming stay those of
class labels. The prompts are encoded once by a text encoder (`fewstep.interop.diffusers.text`) into
a `PromptTable`, which turns a batch of indices into the network contract's text conditioning
`{"text": (B, L, D), "text_mask": (B, L)}`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from fewstep.data.base import DataError

METADATA_FILE = "metadata.jsonl"


def prompts_from_metadata(text: bytes, names: set[str], where: str) -> tuple[list[str], list[str]]:
    """(file names, captions) of a `metadata.jsonl`, one row per image, sorted by file name."""
    rows = {}
    try:
        lines = text.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise DataError(f"'{where}' is not UTF-8 text") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise DataError(f"'{where}' line {n}: not a JSON object") from None
        if not (isinstance(row, dict) and isinstance(row.get("file_name"), str) and isinstance(row.get("text"), str)):
            raise DataError(f"'{where}' line {n}: expected {{\"file_name\": \"<image>\", \"text\": \"<caption>\"}}")
        name = row["file_name"].replace("\\", "/").removeprefix("./")
        if name not in names:
            raise DataError(f"'{where}' line {n}: no image {row['file_name']!r} in the folder")
        if name in rows:
            raise DataError(f"'{where}' line {n}: {row['file_name']!r} is listed twice")
        rows[name] = row["text"]
    if not rows:
        raise DataError(f"'{where}' lists no images")
    files = sorted(rows)
    return files, [rows[f] for f in files]


@dataclass
class PromptTable:
    """Encoded prompts: `text` (P, L, D) and `mask` (P, L) of `prompts`, and the empty prompt's
    `null_text` (L, D) / `null_mask` (L) that classifier-free guidance mixes against."""

    prompts: list[str]
    text: torch.Tensor
    mask: torch.Tensor
    null_text: torch.Tensor
    null_mask: torch.Tensor

    def cond(self, indices: torch.Tensor, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The text conditioning of a batch of prompt indices (B,), on their device."""
        if indices.is_floating_point() or indices.ndim != 1:
            raise ValueError(f"prompt indices must be an integer tensor (B,), got {indices.dtype} {tuple(indices.shape)}")
        idx = indices.to(self.text.device)
        return _cond(self.text[idx], self.mask[idx], indices.device, dtype)

    def null_cond(self, n: int, device=None, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The empty prompt's conditioning, `n` times."""
        return _cond(self.null_text.expand(n, *self.null_text.shape), self.null_mask.expand(n, -1), device, dtype)

    def to(self, device) -> "PromptTable":
        return PromptTable(self.prompts, *(v.to(device) for v in (self.text, self.mask, self.null_text, self.null_mask)))


def _cond(text, mask, device, dtype) -> dict[str, torch.Tensor]:
    return {"text": text.to(device, dtype or text.dtype), "text_mask": mask.to(device)}


__all__ = ["METADATA_FILE", "PromptTable", "prompts_from_metadata"]
