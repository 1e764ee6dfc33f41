"""EDM, EDM2 and ECT snapshots (`.pkl`) read without running any of their code.

    snap = read_snapshot("edm-cifar10-32x32-uncond-vp.pkl")
    snap.net          # fewstep's `ddpmpp` with precond="vp": F(x_t / sigma_d, t), exactly EDM's denoiser
    snap.spec         # {"name": "ddpmpp", "kwargs": {...}}: what a fewstep checkpoint records

The papers' snapshots are pickles in `torch_utils.persistence`'s format: each network is
`_reconstruct_persistent_obj(meta)`, and unpickling it normally runs `exec(meta["module_src"])`,
the Python source stored in the file. This reader unpickles with a closed list of globals:
`_reconstruct_persistent_obj`, `torch.nn.ModuleDict` and `dnnlib.util.EasyDict` become inert
records (a class name and a state dict); `OrderedDict`, numpy's dtype / scalar / ndarray and torch's
tensor rebuilders are the real ones; a tensor's storage is the file's `torch.save` stream, read
with `torch.load(weights_only=True)`. Any other global is refused with one line naming it, before
anything is called. The class names then map to fewstep's reimplementations
(`fewstep.networks.song_unet`, `adm`, `edm2`), built from the recorded constructor kwargs, and
the tensors must match the network's exactly (a missing or extra tensor is refused, by name).

Preconditioning (docs/math.md#paper-preconditioning): EDMPrecond and EDM2's Precond -> "edm",
VPPrecond -> "vp", VEPrecond -> "ve"; ECT's ECMPrecond -> "edm", the form it trains with (its
sampler's boundary shift at sigma_min = 0.002 is left out, as in fewstep's `ect`). EDM2's EMA is
stored in float16 and read as float32; its VAE encoder's settings become the run's latents record.
"""

from __future__ import annotations

import collections
import io
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

__all__ = ["Snapshot", "SnapshotError", "is_snapshot", "read_snapshot", "snapshot_state"]


class SnapshotError(ValueError):
    """A snapshot that cannot be read safely or does not describe a supported network."""


def is_snapshot(path) -> bool:
    """A `.pkl` file: an EDM/EDM2/ECT snapshot (the only pickles fewstep reads)."""
    return str(path).endswith(".pkl") and Path(path).is_file()


# ---------------------------------------------------------------------------------------------
# The restricted unpickler

class Persistent:
    """An inert `_reconstruct_persistent_obj(meta)`: the class name and its state, no code."""

    def __init__(self, meta):
        if not isinstance(meta, dict) or not isinstance(meta.get("class_name"), str):
            raise SnapshotError("a persistent object without a class name")
        self.class_name = meta["class_name"]
        self.state = meta.get("state") or {}


class InertModule:
    """An inert `torch.nn.ModuleDict` (or another plain module the allow-list names): its state only."""

    class_name = "ModuleDict"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.state = {}
        return obj

    def __setstate__(self, state):
        self.state = state if isinstance(state, dict) else {}


class EasyDict(dict):
    """dnnlib's EasyDict, as a plain dict."""

    def __setstate__(self, state):
        if isinstance(state, dict):
            self.update(state)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *state):
    return data


def _load_from_bytes(b):
    if not isinstance(b, (bytes, bytearray)):
        raise SnapshotError("a tensor storage that is not a byte string")
    try:
        return torch.load(io.BytesIO(b), weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - any failure of the storage stream is one line
        raise SnapshotError(f"a tensor storage could not be read ({type(e).__name__}: "
                            f"{' '.join(str(e).split())[:150]})") from None


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    if not isinstance(storage, (torch.UntypedStorage, torch.TypedStorage)):
        raise SnapshotError(f"a tensor whose storage is a {type(storage).__name__}")
    return torch._utils._rebuild_tensor_v2(storage, offset, tuple(size), tuple(stride), False,
                                           collections.OrderedDict())


def _numpy_core():
    return getattr(np, "_core", None) or np.core


# (module, name) -> what it unpickles to. Nothing else is ever looked up.
ALLOWED = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): Persistent,
    ("torch.nn.modules.container", "ModuleDict"): InertModule,
    ("dnnlib.util", "EasyDict"): EasyDict,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch.storage", "_load_from_bytes"): _load_from_bytes,
    ("numpy", "dtype"): np.dtype,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy.core.multiarray", "scalar"): _numpy_core().multiarray.scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_core().multiarray.scalar,
    ("numpy.core.multiarray", "_reconstruct"): _numpy_core().multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_core().multiarray._reconstruct,
}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        found = ALLOWED.get((module, name))
        if found is None:
            raise SnapshotError(f"it names the global {module}.{name}, which a snapshot reader does not load "
                                f"(only tensors, numbers and the networks' constructor arguments are read)")
        return found

    def persistent_load(self, pid):
        raise SnapshotError("it holds a persistent id, which EDM's snapshots do not")


def load_pickle(path) -> object:
    """The snapshot's top-level object, unpickled with the allow-list (module docstring)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return _Unpickler(f).load()
    except SnapshotError as e:
        raise SnapshotError(f"{path}: refused: {e}") from None
    except (EOFError, pickle.UnpicklingError) as e:
        raise SnapshotError(f"{path}: truncated or not a pickle ({type(e).__name__}: "
                            f"{' '.join(str(e).split())[:120] or 'ran out of input'})") from None
    except OSError as e:
        raise SnapshotError(f"{path}: cannot be read ({e.strerror or e})") from None
    except Exception as e:  # noqa: BLE001 - a malformed stream fails in many ways; each is one line
        raise SnapshotError(f"{path}: malformed snapshot ({type(e).__name__}: "
                            f"{' '.join(str(e).split())[:150]})") from None


# ---------------------------------------------------------------------------------------------
# From the inert objects to a fewstep network

def snapshot_state(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    """The flat state dict (`model.enc.32x32_conv.weight` -> tensor) of an inert module tree."""
    state = obj.state if isinstance(obj, (Persistent, InertModule)) else None
    if not isinstance(state, dict):
        raise SnapshotError(f"{prefix or 'the network'} is a {type(obj).__name__}, not a module")
    out = {}
    skip = set(state.get("_non_persistent_buffers_set") or ())
    for group in ("_parameters", "_buffers"):
        for name, value in (state.get(group) or {}).items():
            if value is None or name in skip:
                continue
            if not isinstance(value, torch.Tensor):
                raise SnapshotError(f"{prefix}{name} is a {type(value).__name__}, not a tensor")
            out[prefix + name] = value
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            out.update(snapshot_state(child, f"{prefix}{name}."))
    return out


def _kwargs(obj: Persistent) -> dict:
    kwargs = dict(obj.state.get("_init_kwargs") or {})
    args = list(obj.state.get("_init_args") or ())
    for name, value in zip(("img_resolution", "img_channels", "label_dim"), args):
        kwargs.setdefault(name, value)
    return {k: _plain(v) for k, v in kwargs.items()}


def _plain(v):
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    return v


def _expect(kwargs: dict, defaults: dict, where: str) -> None:
    """Settings fewstep's reimplementation fixes: refuse a snapshot that changed them."""
    for key, default in defaults.items():
        value = kwargs.get(key, default)
        if (list(value) if isinstance(value, (list, tuple)) else value) != \
                (list(default) if isinstance(default, (list, tuple)) else default):
            raise SnapshotError(f"{where}: {key}={value!r} is not supported (fewstep's network has {default!r})")


SONG = {"ddpmpp": dict(embedding_type="positional", encoder_type="standard", channel_mult_noise=1,
                       resample_filter=[1, 1]),
        "ncsnpp": dict(embedding_type="fourier", encoder_type="residual", channel_mult_noise=2,
                       resample_filter=[1, 3, 3, 1])}
EDM_PRECONDS = {"EDMPrecond": "edm", "VPPrecond": "vp", "VEPrecond": "ve", "ECMPrecond": "edm"}
# Keys of the model's kwargs that fewstep takes as they are, and those that only act in training.
COMMON_KEYS = ("label_dim", "augment_dim", "model_channels", "channel_mult", "channel_mult_emb", "num_blocks",
               "attn_resolutions", "dropout")
TRAINING_ONLY = ("label_dropout", "use_fp16", "sigma_min", "sigma_max", "epsilon_t")


def network_spec_of(class_name: str, kwargs: dict, where: str) -> tuple[dict, str]:
    """`({"name", "kwargs"}, precond)` of fewstep's network for a snapshot's top-level class."""
    if class_name in EDM_PRECONDS:
        precond = EDM_PRECONDS[class_name]
        model_type = kwargs.get("model_type", "DhariwalUNet" if class_name in ("EDMPrecond", "ECMPrecond")
                                else "SongUNet")
        if class_name == "VPPrecond":
            _expect(kwargs, dict(beta_d=19.9, beta_min=0.1, M=1000), where)
        _expect(kwargs, dict(sigma_data=0.5), where)
        base = dict(img_channels=kwargs["img_channels"], img_resolution=kwargs["img_resolution"], precond=precond)
        base.update({k: kwargs[k] for k in COMMON_KEYS if k in kwargs})
        if model_type == "SongUNet":
            _expect(kwargs, dict(decoder_type="standard"), where)
            song = dict(SONG["ddpmpp"], **{k: kwargs[k] for k in SONG["ddpmpp"] if k in kwargs})
            name = next((n for n, fixed in SONG.items() if _matches(song, fixed)), None)
            if name is None:
                raise SnapshotError(f"{where}: a SongUNet with {song} is neither DDPM++ nor NCSN++")
            known = set(COMMON_KEYS) | set(SONG[name]) | {"decoder_type"}
        elif model_type == "DhariwalUNet":
            name, known = "adm", set(COMMON_KEYS)
        else:
            raise SnapshotError(f"{where}: model_type {model_type!r} is not supported (SongUNet, DhariwalUNet)")
        known |= {"img_channels", "img_resolution", "model_type", "beta_d", "beta_min", "M", "sigma_data",
                  *TRAINING_ONLY}
    elif class_name == "Precond":  # EDM2
        precond, name = "edm", "edm2"
        _expect(kwargs, dict(channel_mult_noise=None, channel_mult_emb=None, label_balance=0.5, concat_balance=0.5,
                             res_balance=0.3, attn_balance=0.3, clip_act=256,
                             resample_filter=[1, 1], sigma_data=0.5), where)
        base = dict(img_channels=kwargs["img_channels"], img_resolution=kwargs["img_resolution"],
                    label_dim=kwargs.get("label_dim", 0), precond=precond)
        base.update({k: kwargs[k] for k in ("model_channels", "channel_mult", "num_blocks", "attn_resolutions",
                                            "dropout", "logvar_channels", "channels_per_head") if k in kwargs})
        known = set(base) | {"channel_mult_noise", "channel_mult_emb", "label_balance", "concat_balance",
                             "res_balance", "attn_balance", "clip_act", "resample_filter",
                             "sigma_data", *TRAINING_ONLY}
    else:
        raise SnapshotError(f"{where}: class {class_name!r} is not one fewstep reads "
                            f"(EDMPrecond, VPPrecond, VEPrecond, ECMPrecond, EDM2's Precond)")
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise SnapshotError(f"{where}: constructor argument {unknown[0]!r} of {class_name} is not supported")
    for key in ("img_channels", "img_resolution"):
        if not isinstance(base.get(key), int):
            raise SnapshotError(f"{where}: {class_name} records no integer {key}")
    return {"name": name, "kwargs": base}, precond


def _matches(song: dict, fixed: dict) -> bool:
    return all((list(song[k]) if isinstance(song[k], (list, tuple)) else song[k]) == v for k, v in fixed.items())


def _latents(encoder, res: int) -> dict | None:
    """fewstep's latents record from EDM2's `StabilityVAEEncoder` kwargs. EDM2 maps raw VAE latents
    z to `(z - raw_mean) final_std / raw_std + final_mean`; fewstep decodes with
    `z = x / scaling_factor + shift_factor`, per channel here."""
    if encoder is None:
        return None
    if not isinstance(encoder, Persistent) or encoder.class_name != "StabilityVAEEncoder":
        return None
    kw = _kwargs(encoder)
    raw_mean = np.asarray(kw.get("raw_mean", [5.81, 3.25, 0.12, -2.15]), dtype=np.float64)
    raw_std = np.asarray(kw.get("raw_std", [4.17, 4.62, 3.71, 3.28]), dtype=np.float64)
    final_mean, final_std = float(kw.get("final_mean", 0.0)), float(kw.get("final_std", 0.5))
    scale = final_std / raw_std
    return {"vae": kw.get("vae_name", "stabilityai/sd-vae-ft-mse"), "scaling_factor": scale.tolist(),
            "shift_factor": (raw_mean - final_mean / scale).tolist(), "pixel_shape": [3, 8 * res, 8 * res],
            "sigma_d": final_std, "source": {"name": "edm2 snapshot"}}


@dataclass
class Snapshot:
    """A snapshot read into fewstep's reimplementation of its network."""

    net: torch.nn.Module
    spec: dict  # {"name", "kwargs"} of the registered network
    class_name: str  # the snapshot's class (EDMPrecond, VPPrecond, Precond, ...)
    precond: str
    source: Path
    latents: dict | None = None  # EDM2: the VAE and the latent normalization
    dataset: dict = field(default_factory=dict)  # the snapshot's dataset_kwargs, plain values

    @property
    def shape(self) -> tuple[int, int, int]:
        k = self.spec["kwargs"]
        return (k["img_channels"], k["img_resolution"], k["img_resolution"])

    @property
    def num_classes(self) -> int:
        return int(getattr(self.net, "num_classes", 0))

    @property
    def method(self) -> dict:
        """The method a snapshot samples with: ECT's consistency models as `ect`, the rest as diffusion ('flow')."""
        return {"name": "ect" if self.class_name == "ECMPrecond" else "flow", "sigma_d": 0.5}


def read_snapshot(path, key: str = "ema") -> Snapshot:
    """Read the network `key` ('ema') of an EDM / EDM2 / ECT snapshot into fewstep's network."""
    from fewstep.networks import build_registered

    path = Path(path)
    if not path.is_file():
        raise SnapshotError(f"{path}: no such snapshot file")
    top = load_pickle(path)
    if not isinstance(top, dict) or key not in top:
        keys = sorted(map(str, top)) if isinstance(top, dict) else type(top).__name__
        raise SnapshotError(f"{path}: no {key!r} network in the snapshot (it holds {keys})")
    obj = top[key]
    if not isinstance(obj, Persistent):
        raise SnapshotError(f"{path}: {key!r} is a {type(obj).__name__}, not an EDM network")
    where = f"{path} ({obj.class_name})"
    kwargs = _kwargs(obj)
    spec, precond = network_spec_of(obj.class_name, kwargs, where)
    tensors = {k: v.float() if v.is_floating_point() else v for k, v in snapshot_state(obj).items()}
    try:
        with torch.device("meta"):  # no random init of weights about to be replaced
            net = build_registered(spec)
    except ValueError as e:
        raise SnapshotError(f"{where}: {e}") from None
    expected = net.state_dict()
    missing = [k for k in expected if k not in tensors]
    extra = [k for k in tensors if k not in expected]
    if missing:
        raise SnapshotError(f"{where}: the snapshot lacks tensor {missing[0]!r} of network {spec['name']!r} "
                            f"({len(missing)} missing)")
    if extra:
        raise SnapshotError(f"{where}: the snapshot has tensor {extra[0]!r}, which network {spec['name']!r} does not "
                            f"({len(extra)} extra)")
    for k, v in expected.items():
        if tensors[k].numel() == v.numel() == 1:  # EDM2's scalar gains are 1-vectors in fewstep's network
            tensors[k] = tensors[k].reshape(v.shape)
        if tuple(v.shape) != tuple(tensors[k].shape):
            raise SnapshotError(f"{where}: tensor {k!r} has shape {tuple(tensors[k].shape)}, network "
                                f"{spec['name']!r} expects {tuple(v.shape)}")
    net.load_state_dict(tensors, assign=True)
    if any(t.is_meta for t in (*net.parameters(), *net.buffers())):  # a non-persistent buffer: build for real
        real = build_registered(spec)
        real.load_state_dict(tensors)
        net = real
    dataset = _plain(top.get("dataset_kwargs") or {}) if isinstance(top.get("dataset_kwargs"), dict) else {}
    latents = _latents(top.get("encoder"), spec["kwargs"]["img_resolution"])
    return Snapshot(net.eval(), spec, obj.class_name, precond, path, latents, dataset)

