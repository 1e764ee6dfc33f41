"""Checkpoints: safetensors for tensors, JSON for everything else.

A checkpoint `ckpt-0001000` is two files, `ckpt-0001000.safetensors` (network, EMA,
optimizer tensors, RNG states) and `ckpt-0001000.json` (config, step, optimizer
hyper-parameters, counters). Each is written to a temporary file and renamed into place,
tensors first: a checkpoint counts only once its JSON exists, so a crash or an interrupt at
any moment leaves the last good checkpoint intact. Nothing is pickled, so a checkpoint does
not depend on the code that wrote it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1
_NAME = re.compile(r"^ckpt-(\d+)\.json$")


class CheckpointError(ValueError):
    """A missing or unreadable checkpoint."""


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_checkpoint(directory: str | Path, step: int, tensors: dict[str, torch.Tensor], state: dict) -> Path:
    """Write `ckpt-{step}` atomically; returns the JSON path. A failed write (a full disk, say)
    raises `CheckpointError` naming the last good checkpoint, and leaves every older one intact."""
    directory = Path(directory)
    stem = f"ckpt-{step:07d}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
        state = {"format_version": FORMAT_VERSION, "step": step, "tensors": f"{stem}.safetensors", **state}
        text = json.dumps(state, indent=1)
        json_path = directory / f"{stem}.json"
        _atomic_write(directory / f"{stem}.safetensors", lambda p: save_file(flat, str(p)))
        _atomic_write(json_path, lambda p: p.write_text(text))
    except Exception as e:  # noqa: BLE001 - OSError (disk full), safetensors' own errors: one clear line
        good = list_checkpoints(directory)
        last = f"the last good checkpoint is {good[-1]}" if good else "no checkpoint was written before"
        raise CheckpointError(f"could not write checkpoint {directory / stem} ({' '.join(str(e).split())}); "
                              f"{last}") from None
    return json_path


def load_latest_good(directory: str | Path, device="cpu") -> tuple[Path, dict[str, torch.Tensor], dict] | None:
    """The newest checkpoint in `directory` that reads back, as (path, tensors, state); a damaged
    newer one (truncated, say) is skipped with a warning naming the file. None when there is none."""
    for path in reversed(list_checkpoints(directory)):
        try:
            tensors, state = load_checkpoint(path, device=device)
            return path, tensors, state
        except CheckpointError as e:
            warnings.warn(f"skipping a damaged checkpoint: {e}; falling back to the one before", stacklevel=2)
    return None


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints (JSON and tensors both present), oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = _NAME.match(p.name)
        if m and p.with_suffix(".safetensors").is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def prune_checkpoints(directory: str | Path, keep: int) -> None:
    for p in list_checkpoints(directory)[:-keep]:
        p.unlink(missing_ok=True)  # JSON first: the checkpoint stops counting at once
        p.with_suffix(".safetensors").unlink(missing_ok=True)
        shards = p.with_suffix(".shards")
        if shards.is_dir():
            shutil.rmtree(shards, ignore_errors=True)


def write_shard(directory: str | Path, rank: int, tensors: dict[str, torch.Tensor]) -> Path:
    """One process's part of a sharded checkpoint, `<directory>/rank<r>.safetensors`, atomically.
    The checkpoint counts only once process 0 has written its JSON, after every shard."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"rank{rank:05d}.safetensors"
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    try:
        _atomic_write(path, lambda p: save_file(flat, str(p)))
    except Exception as e:  # noqa: BLE001 - disk full and the like: one line
        raise CheckpointError(f"could not write {path} ({' '.join(str(e).split())})") from None
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint JSON from a path to it, to its .safetensors, to a checkpoint folder, or to
    a run folder (its `checkpoints/`): the latest one found."""
    path = Path(path)
    if path.suffix in (".json", ".safetensors"):
        json_path = path.with_suffix(".json")
        if not json_path.is_file() or not json_path.with_suffix(".safetensors").is_file():
            raise CheckpointError(f"checkpoint not found: {path} (need both .json and .safetensors)")
        return json_path
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    for folder in (path / "checkpoints", path):
        found = list_checkpoints(folder)
        if found:
            return found[-1]
    raise CheckpointError(f"no checkpoint (ckpt-*.json + .safetensors) in {path}")


def load_checkpoint(path: str | Path, device="cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """Load (tensors, state) of a checkpoint; `path` as in `resolve_checkpoint`."""
    json_path = resolve_checkpoint(path)
    try:
        state = json.loads(json_path.read_text())
        tensors = load_file(str(json_path.with_suffix(".safetensors")), device=str(device))
    except Exception as e:  # noqa: BLE001 - a corrupt file becomes one clear line
        raise CheckpointError(f"cannot read checkpoint {json_path}: {e}") from None
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{json_path}: unsupported checkpoint format {state.get('format_version')}")
    return tensors, state


def prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in tensors.items()}


def unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    n = len(prefix) + 1
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors (for safetensors) and the rest (for JSON)."""
    sd = optimizer.state_dict()
    tensors, extra = {}, {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value
            else:
                extra.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "extra": extra}


def optimizer_from_flat(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    for idx, entry in meta.get("extra", {}).items():
        state.setdefault(int(idx), {}).update(entry)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
