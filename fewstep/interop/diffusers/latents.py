"""Latent space with a diffusers `AutoencoderKL`: encode a dataset once, train in latents, decode samples.

    fewstep encode --data digits --vae path/to/vae --out latents.safetensors
    fewstep train --data latents.safetensors ...          # or: --data digits --set data.vae=path/to/vae

As in EDM2, `encode` stores the encoder's posterior, mean and std per example, and training draws a
fresh latent `mean + std * eps` from it at every load. Model space is the VAE's scaled latent,
`(latent - shift_factor) * scaling_factor`; the data std `sigma_d` of that space is measured over
the whole posterior mixture when encoding, stored, and reported (the method's `sigma_d` defaults to
it). A run records its VAE (`data.latents` in every checkpoint), so `fewstep sample`, `eval` and the
training previews decode to pixels.

The encoded file is safetensors (`mean`, `std`, `labels`) with a JSON record in its metadata: what
was encoded, with which VAE, and the measured `sigma_d`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from fewstep.data.base import DataError, Dataset, batch_generator
from fewstep.data.registry import register_file_type

RECORD_KEY = "fewstep_latents"


def load_vae(spec: str | os.PathLike, device: str | torch.device = "cpu"):
    """A diffusers `AutoencoderKL` from a folder (its own, or a pipeline's `vae/`) or a Hub id,
    from safetensors only. Frozen, in eval mode."""
    from fewstep.interop.diffusers.network import import_diffusers
    from fewstep.interop.diffusers.pretrained import PretrainedError, read_safetensors, resolve_pretrained

    root = resolve_pretrained(spec)
    folder = root / "vae" if (root / "model_index.json").exists() else root
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise PretrainedError(f"{folder}: no config.json (not a diffusers VAE folder)")
    config = json.loads(cfg_path.read_text())
    if config.get("_class_name") != "AutoencoderKL":
        raise PretrainedError(f"{folder}: data.vae must be an AutoencoderKL, got {config.get('_class_name')!r}")
    vae = import_diffusers().AutoencoderKL.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    try:
        vae.load_state_dict(read_safetensors(folder))
    except RuntimeError as e:
        raise PretrainedError(f"{folder}: the weights do not fit its config.json: {' '.join(str(e).split())[:300]}") from None
    return vae.to(device).eval().requires_grad_(False)


def vae_factors(vae) -> tuple[float, float]:
    """(scaling_factor, shift_factor) of a VAE's config (SD: 0.18215 and 0; SD3/Flux: with a shift)."""
    return float(vae.config.scaling_factor), float(getattr(vae.config, "shift_factor", None) or 0.0)


def channel_factor(value) -> float | torch.Tensor:
    """A factor of `LatentDataset`'s samples: one number, or one per channel as float32 (C, 1, 1)."""
    if isinstance(value, (list, tuple)):
        return torch.tensor(value, dtype=torch.float32).view(-1, 1, 1)
    return float(value)


class VAECodec:
    """Pixels in [-1, 1] <-> model-space latents, through the run's VAE (loaded once, on `device`):
    `codec(x)` decodes; `codec.encode(pixels)` takes the posterior mean."""

    def __init__(self, info: dict, device: str | torch.device = "cpu"):
        self.vae = load_vae(info["vae"], device)
        # numbers, or one per channel (EDM2's latent normalization, read from its snapshots)
        self.scaling_factor, self.shift_factor = _factor(info["scaling_factor"]), _factor(info["shift_factor"])
        self.pixel_shape = tuple(info["pixel_shape"])

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(next(self.vae.parameters()).dtype)
        z = x / _on(self.scaling_factor, x) + _on(self.shift_factor, x)
        return self.vae.decode(z, return_dict=False)[0].float()

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        posterior = self.vae.encode(pixels.to(next(self.vae.parameters()).dtype), return_dict=False)[0]
        mean = posterior.mean
        return ((mean - _on(self.shift_factor, mean)) * _on(self.scaling_factor, mean)).float()


def _factor(value):
    if isinstance(value, (list, tuple)):
        return torch.tensor(value, dtype=torch.float64).reshape(1, -1, 1, 1)
    return float(value)


def _on(factor, x: torch.Tensor):
    return factor.to(x.device, x.dtype) if isinstance(factor, torch.Tensor) else factor


@torch.no_grad()
def encode_dataset(dataset: Dataset, vae_spec: str, out: str | os.PathLike, *, batch_size: int = 64,
                   device: str | torch.device = "cpu", progress: bool = True, source: dict | None = None) -> Path:
    """Encode every image of `dataset` with the VAE `vae_spec` into the safetensors file `out`
    (written atomically). `source`: how to load the dataset again (recorded, for `fewstep eval`)."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    if dataset.kind != "image":
        raise DataError(f"only images can be encoded with a VAE; {dataset.name!r} holds {dataset.kind}s")
    vae = load_vae(vae_spec, device)
    if vae.config.in_channels != dataset.shape[0]:
        raise DataError(f"the VAE takes {vae.config.in_channels}-channel images, {dataset.name!r} has "
                        f"{dataset.shape[0]} (set data.channels)")
    sf, shift = vae_factors(vae)
    means, stds, labels = [], [], []
    bar = tqdm(total=len(dataset), desc="encode", unit="img", disable=not progress)
    for x, y in dataset.batches(batch_size):
        posterior = vae.encode(x.to(device), return_dict=False)[0]
        means.append(posterior.mean.float().cpu())
        stds.append(posterior.std.float().cpu())
        if y is not None:
            labels.append(y)
        bar.update(len(x))
    bar.close()
    mean, std = torch.cat(means), torch.cat(stds)
    # The std of model-space latents over the posterior mixture: E over examples of (m^2 + s^2).
    m = (mean.double() - shift) * sf
    second = (m.square() + (std.double() * sf).square()).mean()
    sigma_d = float((second - m.mean().square()).sqrt())
    record = {"vae": str(vae_spec), "scaling_factor": sf, "shift_factor": shift, "pixel_shape": list(dataset.shape),
              "latent_shape": list(mean.shape[1:]), "count": len(mean), "sigma_d": sigma_d,
              "source": source or {"name": dataset.name}, "class_names": dataset.class_names,
              "num_classes": dataset.num_classes, "prompts": getattr(dataset, "prompts", None)}
    tensors = {"mean": mean.contiguous(), "std": std.contiguous()}
    if labels:
        tensors["labels"] = torch.cat(labels).to(torch.int64)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(tensors, str(tmp), metadata={RECORD_KEY: json.dumps(record)})
    os.replace(tmp, out)
    return out


def read_record(path: str | os.PathLike) -> dict | None:
    """The latents record of a safetensors file, or None when it is a safetensors file of something
    else. A file safetensors cannot open (damaged, truncated, not safetensors) is a DataError."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise DataError(f"'{path}': damaged or truncated safetensors file ({' '.join(str(e).split())[:200]}); "
                        f"encode it again with `fewstep encode`") from None
    return json.loads(meta[RECORD_KEY]) if RECORD_KEY in meta else None


class LatentDataset(Dataset):
    """Encoded images: each read draws a latent from the stored posterior, `mean + std * eps`, with
    noise from a generator seeded by the batch's indices (so a resumed run reads the same latents)."""

    kind = "image"

    def __init__(self, path: str | os.PathLike, name: str | None = None, seed: int = 0):
        from fewstep.interop.diffusers.pretrained import load_safetensors

        record = read_record(path)
        if record is None:
            raise DataError(f"'{path}' is not a fewstep latents file (make one with `fewstep encode`)")
        tensors = load_safetensors(path, error=DataError, hint="encode it again with `fewstep encode`")
        self.name = name or str(path)
        self.record = record
        self._mean, self._std = tensors["mean"], tensors["std"]
        self._labels = tensors.get("labels")
        self.shape = tuple(self._mean.shape[1:])
        self.class_names = record.get("class_names")
        self.num_classes = int(record.get("num_classes") or 0) if self._labels is not None else 0
        self.prompts = record.get("prompts")  # a prompt dataset's captions: labels index them
        self.scaling_factor, self.shift_factor = record["scaling_factor"], record["shift_factor"]
        self.seed = seed

    @property
    def sigma_d(self) -> float:
        return float(self.record["sigma_d"])

    def normalize(self, mean: list[float], std: list[float], final_std: float = 0.5) -> None:
        """EDM2's latent normalization instead of the VAE's one scaling factor: model space is
        `(latent - mean) / std * final_std` per channel (`mean`, `std` in the VAE's raw latent units;
        EDM2's final std 0.5 is sigma_d). The recorded sigma_d is measured again in the new space."""
        channels = self.shape[0]
        if len(mean) != channels or len(std) != channels:
            raise DataError(f"latent normalization needs {channels} means and stds (one per latent channel), "
                            f"got {len(mean)} and {len(std)}")
        if not all(v > 0 for v in std):
            raise DataError(f"latent stds must be > 0, got {list(std)}")
        scale = [final_std / v for v in std]
        self.shift_factor, self.scaling_factor = channel_factor(list(mean)), channel_factor(scale)
        m = (self._mean.double() - self.shift_factor.double()) * self.scaling_factor.double()
        second = (m.square() + (self._std.double() * self.scaling_factor.double()).square()).mean()
        self.record = {**self.record, "shift_factor": [float(v) for v in mean], "scaling_factor": scale,
                       "sigma_d": float((second - m.mean().square()).sqrt())}

    @property
    def latents(self) -> dict:
        """What decoding needs (stored in every checkpoint as `data.latents`)."""
        keys = ("vae", "scaling_factor", "shift_factor", "pixel_shape", "sigma_d", "source")
        return {k: self.record[k] for k in keys}

    def __len__(self) -> int:
        return len(self._mean)

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, ...]:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        eps = torch.randn(self._mean[idx].shape, generator=batch_generator(list(indices), self.seed))
        x = (self._mean[idx] + self._std[idx] * eps - self.shift_factor) * self.scaling_factor
        return (x,) if self._labels is None else (x, self._labels[idx])


# `load_dataset("x.safetensors")` and `fewstep train --data x.safetensors` read latents once this module is
# imported (`fewstep.training.build` does): the data layer itself knows no VAE.
register_file_type(".safetensors", LatentDataset, "a .safetensors file of latents (fewstep encode)")
