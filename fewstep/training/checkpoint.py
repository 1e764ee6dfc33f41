"""Checkpoints: safetensors for tensors, JSON for everything else.

A checkpoint `ckpt-0001000` is two files, `ckpt-0001000.safetensors` (network, EMA,
optimizer tensors, RNG states) and `ckpt-0001000.json` (config, step, optimizer
hyper-parameters, counters). Each is written to a temporary file and renamed into place,
tensors first: a checkpoint counts only once its JSON exists, so a crash or an interrupt at
any moment leaves the last good checkpoint intact. Nothing is pickled, so a checkpoint does
not depend on the code that wrote it. A sharded checkpoint (`train.sharded_checkpoints`) keeps
the weights in `ckpt-0001000.shards/rank<r>.safetensors`, one file per process.

`Checkpointer` is what `fit` uses: `save(step, state)` and `load_latest(state)` over a
`TrainState`, the one place that knows these files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass, field
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
        _fsync_dir(path.parent)  # the rename itself survives a power loss only once the folder is synced
    finally:
        if tmp.exists():
            tmp.unlink()


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # a platform whose folders cannot be opened (Windows): nothing to sync
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    """Keep the newest `keep` checkpoints; delete the older ones and the shard folders that belong
    to no kept checkpoint (those of saves interrupted before their JSON was written)."""
    directory = Path(directory)
    for p in list_checkpoints(directory)[:-keep]:
        p.unlink(missing_ok=True)  # JSON first: the checkpoint stops counting at once
        p.with_suffix(".safetensors").unlink(missing_ok=True)
    kept = {p.with_suffix(".shards").name for p in list_checkpoints(directory)}
    for shards in directory.glob("ckpt-*.shards"):
        if shards.is_dir() and shards.name not in kept:
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


# ----------------------------------------------------------------------------------------------
# A run's checkpoints: what `fit` saves and resumes from


def rng_tensors(device: torch.device, rank: int = 0) -> dict[str, torch.Tensor]:
    """This process's RNG states, keyed by rank (process 0: 'rng.cpu', others 'rng.cpu.rank<r>')."""
    suffix = f".rank{rank}" if rank else ""
    out = {f"rng.cpu{suffix}": torch.get_rng_state()}
    if device.type == "cuda":
        out[f"rng.cuda{suffix}"] = torch.cuda.get_rng_state(device).cpu()
    return out


def restore_rng(tensors: dict[str, torch.Tensor], device: torch.device, rank: int = 0) -> None:
    """Restore this process's RNG states if the checkpoint has them (a run resumed on more
    processes than it was saved with keeps the fresh seeds of the new ones)."""
    suffix = f".rank{rank}" if rank else ""
    if f"rng.cpu{suffix}" in tensors:
        torch.set_rng_state(tensors[f"rng.cpu{suffix}"].cpu())
    if device.type == "cuda" and f"rng.cuda{suffix}" in tensors:
        torch.cuda.set_rng_state(tensors[f"rng.cuda{suffix}"].cpu(), device)


@dataclass
class TrainState:
    """What a checkpoint holds, as the live objects of a run. `record`: the JSON part that rebuilds
    the run elsewhere (config, network spec, method config, data info)."""

    net: torch.nn.Module
    ema: object  # fewstep.training.ema.EMA
    optimizer: torch.optim.Optimizer
    method: object
    scaler: torch.amp.GradScaler
    stream: object  # fewstep.training.fit.BatchStream
    record: dict = field(default_factory=dict)
    aux: object = None  # fewstep.training.auxiliary.Auxiliaries: networks the method trains beside net
    step: int = 0
    nonfinite_total: int = 0


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


class Checkpointer:
    """Saves and resumes a run in `directory`: full checkpoints (process 0 writes the full weights,
    gathered by `parallel`) or sharded ones (every process writes its own shards). Keeps the newest
    `keep`. Every process calls `save` and `load_latest` (they hold collectives)."""

    def __init__(self, directory: str | Path, parallel, keep: int = 2, sharded: bool = False):
        if keep < 1:
            raise ValueError(f"keep_ckpts must be >= 1, got {keep}")
        if sharded and parallel.name != "fsdp":
            raise ValueError("sharded_checkpoints needs parallel 'fsdp' (there is nothing sharded to write otherwise)")
        self.directory, self.parallel, self.keep, self.sharded = Path(directory), parallel, keep, sharded

    def list(self) -> list[Path]:
        return list_checkpoints(self.directory)

    def refuse_existing(self) -> None:
        """A fresh run (no resume) over old checkpoints would mix two runs and prune the new one's files."""
        if self.list():
            raise ValueError(f"resume is off but {self.directory} already holds checkpoints (a new run would mix "
                             f"with them and prune its own); choose another out_dir or delete them")

    def last_good(self) -> str:
        good = self.list()
        return f"the last good checkpoint is {good[-1]}" if good else "no checkpoint was written yet"

    def _agree(self, error: str | None) -> None:
        """Every process learns whether any failed (one collective), and all raise the same line."""
        errors = self.parallel.gather(error)
        failed = [(rank, e) for rank, e in enumerate(errors) if e]
        if len(errors) == 1 and failed:
            raise CheckpointError(failed[0][1])
        if failed:
            raise CheckpointError("; ".join(f"process {rank}: {e}" for rank, e in failed))

    def _own_tensors(self, state: TrainState) -> dict[str, torch.Tensor]:
        """This process's RNG states and its data stream's epoch RNG, keyed by rank."""
        rank = self.parallel.info.rank
        suffix = f".rank{rank}" if rank else ""
        out = rng_tensors(self.parallel.device, rank)
        out.update({k + suffix: v for k, v in state.stream.state()[1].items()})
        return out

    def save(self, step: int, state: TrainState) -> None:
        from fewstep.training import fsdp

        p, error, shards = self.parallel, None, None
        rngs = p.gather(self._own_tensors(state))
        target = p.method_state(state.method)  # e.g. an EMA target (CD, CT), PD's teacher
        aux_tensors, aux_meta = state.aux.state() if state.aux else ({}, None)  # full tensors, even when sharded
        if self.sharded:  # every process writes its own part; process 0 the rest, last
            local, shards = fsdp.sharded_state(state.net, state.ema.net, state.optimizer)
            shards.update(dir=f"ckpt-{step:07d}.shards", processes=p.info.world_size)
            opt_meta, weights = shards.pop("optimizer"), {}
            try:
                write_shard(self.directory / shards["dir"], p.info.rank, local)
            except CheckpointError as e:
                error = _one_line(e)
        else:  # full tensors keyed by name: the same file whatever the parallelism or process count
            weights = {**prefixed("net", p.full_state(state.net)), **prefixed("ema", p.full_state(state.ema.net))}
            opt_tensors, opt_meta = p.full_optimizer_state(state.net, state.optimizer)
            weights.update(prefixed("optim", opt_tensors))
        self._agree(error)
        if p.is_main:
            tensors = {**weights, **prefixed("target", target), **aux_tensors,
                       **{k: v for r in rngs for k, v in r.items()}}
            scaler = state.scaler.state_dict() if state.scaler.is_enabled() else None
            try:
                save_checkpoint(self.directory, step, tensors, {
                    **state.record, "optimizer": opt_meta, "optimizer_format": "fqn",
                    "nonfinite_total": state.nonfinite_total, "shards": shards, "grad_scaler": scaler,
                    "data_position": state.stream.state()[0], **({"auxiliaries": aux_meta} if aux_meta else {})})
                prune_checkpoints(self.directory, self.keep)
            except CheckpointError as e:
                error = _one_line(e)
        self._agree(error)

    def _read(self, path: Path):
        """The files of one checkpoint, checked (no state is touched): tensors, JSON, shard files."""
        from safetensors import safe_open

        from fewstep.training import fsdp

        tensors, meta = load_checkpoint(path)
        if meta.get("optimizer_format") != "fqn":
            raise CheckpointError(f"{path} was written by fewstep 0.1, which this version does not resume")
        files = None
        if meta.get("shards"):
            files = fsdp.shard_files(path.parent / meta["shards"]["dir"], meta["shards"]["processes"])
            for f in files:  # a truncated file fails here, before anything is loaded
                with safe_open(str(f), framework="pt"):
                    pass
        return tensors, meta, files

    def load_latest(self, state: TrainState) -> Path | None:
        """Load the newest checkpoint that every process can read into `state`; a damaged newer one
        (truncated, a shard missing) is skipped with a warning. Returns its path, None if none."""
        p = self.parallel
        for path in reversed(self.list()):
            error = None
            try:
                tensors, meta, files = self._read(path)
            except Exception as e:  # noqa: BLE001 - CheckpointError, a missing or unreadable shard
                error = _one_line(e)
            errors = [e for e in p.gather(error) if e]
            if errors:
                warnings.warn(f"skipping a damaged checkpoint {path}: {'; '.join(errors)}; falling back to the "
                              f"one before", stacklevel=2)
                continue
            self._apply(tensors, meta, files, state)
            return path
        return None

    def _apply(self, tensors, meta, files, state: TrainState) -> None:
        from fewstep.training import fsdp

        p, rank = self.parallel, self.parallel.info.rank
        if files:  # written shard by shard: read only the rows this process needs
            fsdp.load_sharded_state(files, {**meta["shards"], "optimizer": meta["optimizer"]}, state.net,
                                    state.ema.net, state.optimizer)
        else:
            p.load_full_state(state.net, unprefixed("net", tensors))
            p.load_full_state(state.ema.net, unprefixed("ema", tensors))
            p.load_full_optimizer_state(state.net, state.optimizer, unprefixed("optim", tensors), meta["optimizer"])
        if meta.get("grad_scaler") and state.scaler.is_enabled():
            state.scaler.load_state_dict(meta["grad_scaler"])
        p.load_method_state(state.method, state.net, unprefixed("target", tensors))
        if state.aux:
            state.aux.load(tensors, meta.get("auxiliaries"))
        restore_rng(tensors, p.device, rank)
        epoch_rng = "data.epoch_rng" + (f".rank{rank}" if rank else "")
        state.stream.load_state(meta.get("data_position"),
                                {"data.epoch_rng": tensors[epoch_rng]} if epoch_rng in tensors else {})
        state.step, state.nonfinite_total = meta["step"], meta.get("nonfinite_total", 0)
        state.record["data"] = state.record.get("data") or meta.get("data")
