"""A trained network and its method, read back from a run's checkpoint or a diffusers model: what
`build` needs of a teacher (`train.teacher`) or a starting point (`train.init_from`), and nothing of
sampling. `fewstep.apps.generate.load_model` wraps it for `fewstep sample`, `eval` and `edit`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from fewstep.core.trigflow import SIGMA_D
from fewstep.networks.contract import network_info


@dataclass
class Restored:
    """A network rebuilt from a checkpoint (EMA weights by default), its method (rebuilt from the
    record, without its teacher), and the data it was trained on."""

    net: torch.nn.Module
    method: object
    kind: str  # "image" or "vector"
    shape: tuple[int, ...]
    num_classes: int
    config: dict  # the run's config, as a dict
    checkpoint: Path | None = None
    step: int = 0
    weights: str = "ema"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    latents: dict | None = None  # latent data: the VAE that decodes samples (`fewstep.interop.diffusers.latents`)

    @property
    def method_name(self) -> str:
        return self.method.name

    @property
    def sigma_d(self) -> float:
        return float(self.method.sigma_d)

    @property
    def sampler(self):
        """How this network samples (`fewstep.core.samplers`), as of its training step."""
        return self.method.sampler(self.net, self.step)


def restore(checkpoint: str | Path, device: str | torch.device = "cpu", ema: bool = True) -> Restored:
    """Rebuild the network and method of a checkpoint (a run folder, its checkpoints/ folder, or a
    ckpt-*.json), of an EDM / EDM2 / ECT snapshot (`.pkl`), or of a diffusers model folder or Hub id. The network class must be registered
    (`fewstep.networks.register_network`); nothing is imported on the checkpoint's say-so."""
    from fewstep.config import ConfigError
    from fewstep.interop.diffusers.pretrained import is_diffusers_folder, is_hub_id
    from fewstep.networks import build_registered
    from fewstep.training.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint, unprefixed
    from fewstep.training.registries import build_method

    from fewstep.interop.edm_snapshot import is_snapshot

    device = torch.device(device)
    if is_snapshot(checkpoint):  # an EDM / EDM2 / ECT .pkl, read without running its code
        return restore_snapshot(checkpoint, device)
    if is_diffusers_folder(checkpoint) or is_hub_id(str(checkpoint)):
        return restore_diffusers(checkpoint, device)
    json_path = resolve_checkpoint(checkpoint)
    tensors, state = load_checkpoint(json_path, device=device)
    config = state.get("config") or {}
    info = state.get("data")
    method_cfg = state.get("method") or config.get("method")
    if not info or not method_cfg:
        raise CheckpointError(f"{json_path} records no data shape or method; it was not written by fewstep.fit")
    try:
        method = build_method(method_cfg)
    except ConfigError as e:
        raise CheckpointError(f"{json_path}: {e}; a user's method must be registered "
                              f"(@fewstep.methods.register_method) and imported (--import MODULE)") from None
    if not state.get("network"):
        raise CheckpointError(f"{json_path} names no network: its class was not registered when it was trained "
                              f"(decorate it with @fewstep.networks.register_network('some-name')), or it was "
                              f"written by fewstep 0.1, which this version does not read")
    net = build_registered(state["network"])
    if state.get("step") and getattr(method, "total_steps", None) == 0:
        method.setup(net, int(config.get("train", {}).get("steps", state["step"])))
    prefix = "ema" if ema else "net"
    if state.get("shards"):  # a sharded (fsdp) checkpoint: the full weights from every process's file
        from fewstep.training.fsdp import read_full, shard_files

        shards = state["shards"]
        weights = read_full(shard_files(json_path.parent / shards["dir"], shards["processes"]), shards["layout"],
                            prefix)
    else:
        weights = unprefixed(prefix, tensors)
        if not weights and prefix == "net":  # a converted snapshot holds its EMA only
            prefix, weights = "ema", unprefixed("ema", tensors)
    try:
        net.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(f"{json_path}: the weights do not fit network {type(net).__name__}: "
                              f"{' '.join(str(e).split())[:300]}") from None
    return Restored(net.to(device).eval(), method, info["kind"], tuple(info["shape"]),
                    network_info(net).num_classes, config, json_path, int(state["step"]), prefix, device,
                    info.get("latents"))


def restore_diffusers(source, device: str | torch.device = "cpu", sigma_d: float | None = None,
                      scheduler=None) -> Restored:
    """A diffusers pipeline or model folder (or Hub id) as a fewstep network and method. A folder that
    fewstep exported (`fewstep.json` beside it) is the consistency model it was trained as; any other
    is a diffusion model, through the exact TrigFlow conversion (`fewstep.interop.diffusers.schedules`)."""
    from fewstep.interop.diffusers.pretrained import load_diffusers_network, read_diffusers_source
    from fewstep.training.registries import build_method

    record = read_diffusers_source(source, scheduler).fewstep or {}
    if sigma_d is None:
        sigma_d = float(record.get("method", {}).get("sigma_d", SIGMA_D))
    net, src = load_diffusers_network(source, sigma_d, scheduler, device=device)
    method = build_method(record.get("method") or {"name": "flow", "sigma_d": sigma_d})
    size = src.config.get("sample_size")
    size = (size, size) if isinstance(size, int) else tuple(size)
    shape = (int(src.config.get("in_channels", 3)), *size)
    config = {k: record[k] for k in ("data", "network") if k in record}
    latents = (record.get("data") or {}).get("latents")  # an exported latent pipeline decodes with its own VAE
    return Restored(net, method, "image", shape, int(net.num_classes), config, Path(source),
                    int(record.get("step", 0)), "ema", torch.device(device), latents)


def _snapshot_record(snap) -> tuple[dict, dict]:
    """(method config, run-like config) of a snapshot (`fewstep.interop.edm_snapshot.Snapshot`)."""
    kwargs = {k: v for k, v in snap.spec["kwargs"].items() if k not in ("img_channels", "img_resolution")}
    data = {"kind": "image", "shape": list(snap.shape), "latents": snap.latents}
    return snap.method, {"network": {"arch": snap.spec["name"], **kwargs}, "method": snap.method, "data_info": data,
                         "snapshot": {"file": str(snap.source), "class": snap.class_name}}


def restore_snapshot(path, device: str | torch.device = "cpu") -> Restored:
    """An EDM / EDM2 / ECT snapshot (`.pkl`) as a fewstep network and method: the paper's network in
    fewstep's reimplementation, its preconditioning converted exactly to TrigFlow; sampled as a
    diffusion model ('flow'), or, for ECT's consistency models, as 'ect'."""
    from fewstep.interop.edm_snapshot import read_snapshot
    from fewstep.training.registries import build_method

    snap = read_snapshot(path)
    method_cfg, config = _snapshot_record(snap)
    config.pop("data_info")
    return Restored(snap.net.to(device), build_method(method_cfg), "image", snap.shape, snap.num_classes, config,
                    Path(path), 0, "ema", torch.device(device), snap.latents)


def convert_snapshot(path, out) -> Path:
    """Read a snapshot once and write it as a fewstep checkpoint folder (`out/checkpoints/ckpt-0000000`:
    safetensors + JSON) that `restore`, `fewstep sample`, `eval` and `train --teacher` read. Returns
    the JSON path. The weights are stored as the EMA (the snapshot's `ema`)."""
    from fewstep.interop.edm_snapshot import read_snapshot
    from fewstep.training.checkpoint import prefixed, save_checkpoint

    snap = read_snapshot(path)
    method_cfg, config = _snapshot_record(snap)
    data = config.pop("data_info")
    state = {"config": config, "data": data, "method": method_cfg, "network": snap.spec}
    return save_checkpoint(Path(out) / "checkpoints", 0, prefixed("ema", snap.net.state_dict()), state)
