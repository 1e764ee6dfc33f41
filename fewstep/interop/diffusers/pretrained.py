"""Pretrained diffusers models: folders on disk or on the Hugging Face Hub, read without pickles.

    net = load_diffusers_network("path/to/ddpm-pipeline", sigma_d=0.5)       # a TrigFlow network
    folder = resolve_pretrained("google/ddpm-cifar10-32")                    # Hub id -> local snapshot

A source is
- a diffusers pipeline folder: `model_index.json` naming a `unet` or `transformer` and a `scheduler`
  (and a `vae` for latent pipelines), each in its subfolder;
- a model folder (`config.json` with `_class_name`, `diffusion_pytorch_model.safetensors`) with a
  scheduler config beside it (`scheduler_config.json`, or `scheduler/`), or given separately;
- a Hub id `org/name`: downloaded once (config files and safetensors only) into huggingface_hub's
  cache, each weight file checked against its SHA-256; offline, a one-line error.

Weights are read from safetensors only (never a pickled `.bin`), and model and scheduler classes
are looked up among allow-listed names (`networks.diffusers_adapter.MODELS`, `noise_schedules`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

WEIGHTS = "diffusion_pytorch_model.safetensors"
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
DENOISER_KEYS = ("unet", "transformer")


class PretrainedError(ValueError):
    """A pretrained source that cannot be used: the message says why, in one line."""


def is_hub_id(spec: str) -> bool:
    return bool(HUB_ID.match(str(spec))) and not Path(spec).exists()


def resolve_pretrained(spec: str | os.PathLike) -> Path:
    """A local folder for `spec`: the folder itself, or the Hub snapshot of `org/name`."""
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if not is_hub_id(str(spec)):
        raise PretrainedError(f"{spec}: no such folder (and not a Hugging Face Hub id 'org/name')")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise PretrainedError(f"{spec}: a Hub id needs huggingface_hub: pip install huggingface_hub") from None
    try:
        folder = Path(snapshot_download(str(spec), allow_patterns=["*.json", "*.safetensors", "*.txt"]))
    except Exception as e:  # offline, unknown repo, gated repo: huggingface_hub's own message, one line
        detail = " ".join(str(e).split())[:200]
        raise PretrainedError(f"cannot fetch {spec!r} from the Hugging Face Hub ({type(e).__name__}: {detail}); "
                              f"offline, pass a local folder instead") from None
    verify_snapshot(folder)
    return folder


def verify_snapshot(folder: Path) -> None:
    """Check each safetensors file of a Hub snapshot against its SHA-256: the Hub's cache stores a
    large file as a blob named by its SHA-256, which the download must hash to."""
    for file in folder.rglob("*.safetensors"):
        blob = Path(os.path.realpath(file))
        if not re.fullmatch(r"[0-9a-f]{64}", blob.name):
            continue  # a small (git) file, named by its git hash: nothing to compare with
        digest = hashlib.sha256()
        with open(blob, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                digest.update(chunk)
        if digest.hexdigest() != blob.name:
            raise PretrainedError(f"{file}: SHA-256 mismatch with the Hub's record; delete {blob} and download again")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PretrainedError(f"{path}: cannot read JSON ({e})") from None


def load_safetensors(path: str | os.PathLike, error: type[ValueError] = PretrainedError,
                     hint: str = "copy or download it again") -> dict[str, torch.Tensor]:
    """The tensors of one safetensors file; a damaged or truncated file (an interrupted download or
    copy) is `error` naming the file, in one line, not safetensors' deep traceback."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise error(f"{path}: damaged or truncated safetensors file ({' '.join(str(e).split())[:200]}); "
                    f"{hint}") from None


def read_safetensors(folder: Path, name: str = WEIGHTS) -> dict[str, torch.Tensor]:
    """The weights of a diffusers model folder, from one safetensors file or a sharded index."""
    single, index = folder / name, folder / (name + ".index.json")
    if single.exists():
        return load_safetensors(single)
    if index.exists():
        files = sorted(set(_read_json(index)["weight_map"].values()))
        weights = {}
        for f in files:
            weights.update(load_safetensors(folder / Path(f).name))
        return weights
    pickles = [p.name for p in folder.glob("*.bin")]
    hint = f" (only {', '.join(pickles)}: fewstep reads no pickled weights; convert with save_pretrained(" \
           f"safe_serialization=True))" if pickles else ""
    raise PretrainedError(f"{folder}: no {name}{hint}")


@dataclass
class DiffusersSource:
    """What a diffusers folder holds: the denoiser's class, config and folder; the scheduler's; the
    VAE's folder (latent pipelines); and fewstep's own record (`fewstep.json`, written by export)."""

    model: str
    config: dict
    model_dir: Path
    scheduler: str | None
    scheduler_config: dict | None
    vae_dir: Path | None = None
    fewstep: dict | None = None

    @property
    def schedule(self) -> dict:
        return {"scheduler": self.scheduler, "config": self.scheduler_config}


def _scheduler_config(path: Path) -> tuple[str, dict]:
    if path.is_dir():
        for name in ("scheduler_config.json", "scheduler/scheduler_config.json"):
            if (path / name).exists():
                path = path / name
                break
        else:
            raise PretrainedError(f"{path}: no scheduler_config.json")
    cfg = _read_json(path)
    if "_class_name" not in cfg:
        raise PretrainedError(f"{path}: not a diffusers scheduler config (no _class_name)")
    return cfg["_class_name"], cfg


def is_diffusers_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a diffusers pipeline or model folder (not a fewstep run)."""
    p = Path(path)
    if (p / "model_index.json").exists():
        return True
    cfg = p / "config.json"
    return cfg.exists() and "_class_name" in cfg.read_text()[:4096] and not (p / "checkpoints").exists()


def read_diffusers_source(spec: str | os.PathLike, scheduler: str | os.PathLike | None = None) -> DiffusersSource:
    """Parse a pipeline folder, or a model folder with its scheduler (`scheduler`: a folder or a
    `scheduler_config.json`; default: found beside the model)."""
    from fewstep.interop.diffusers.network import MODELS

    root = resolve_pretrained(spec)
    vae_dir = None
    if (root / "model_index.json").exists():
        index = _read_json(root / "model_index.json")
        keys = [k for k in DENOISER_KEYS if k in index]
        if not keys:
            raise PretrainedError(f"{root}: model_index.json names no unet or transformer")
        model_dir = root / keys[0]
        if scheduler is None:
            scheduler = root / "scheduler"
        if "vae" in index and (root / "vae").exists():
            vae_dir = root / "vae"
    else:
        model_dir = root
        if scheduler is None:
            scheduler = root
    if not (model_dir / "config.json").exists():
        raise PretrainedError(f"{model_dir}: no config.json (not a diffusers model folder)")
    config = _read_json(model_dir / "config.json")
    model = config.get("_class_name")
    if model not in MODELS:
        raise PretrainedError(f"{model_dir}: model class {model!r} is not supported; supported: {', '.join(MODELS)}")
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    sched_name, sched_cfg = _scheduler_config(Path(scheduler))
    sched_cfg = {k: v for k, v in sched_cfg.items() if not k.startswith("_")}
    record = _read_json(root / "fewstep.json") if (root / "fewstep.json").exists() else None
    return DiffusersSource(model, config, model_dir, sched_name, sched_cfg, vae_dir, record)


def load_diffusers_network(spec: str | os.PathLike, sigma_d: float, scheduler=None, *, num_classes: int | None = None,
                           device: str | torch.device = "cpu"):
    """A diffusers denoiser as a TrigFlow network (`DiffusersNetwork` with its schedule), with its weights.
    Returns (network, source)."""
    from fewstep.interop.diffusers.network import DiffusersNetwork, class_count

    source = read_diffusers_source(spec, scheduler)
    try:  # the constructor builds (and so checks) the model and its allow-listed scheduler
        net = DiffusersNetwork(source.model, source.config, schedule=source.schedule, sigma_d=sigma_d,
                               num_classes=class_count(source.model, source.config) if num_classes is None else num_classes)
    except (ValueError, TypeError) as e:
        raise PretrainedError(f"{spec}: {e}") from None
    weights = read_safetensors(source.model_dir)
    try:
        net.model.load_state_dict(weights)
    except RuntimeError as e:
        raise PretrainedError(f"{source.model_dir}: the weights do not fit its config.json: "
                              f"{' '.join(str(e).split())[:300]}") from None
    return net.to(device).eval(), source
