"""EDM / EDM2 / ECT snapshots (fewstep.interop.edm_snapshot): pickles written here in the papers'
stream layout (`torch_utils.persistence._reconstruct_persistent_obj(meta)`, torch ModuleDicts,
`_rebuild_parameter` / `_rebuild_tensor_v2` / `_load_from_bytes` tensors, numpy scalars, EDM2's
EasyDict and ndarrays) are read back into the networks they came from; anything else is refused."""

import collections
import pickle
import sys
import types

import numpy as np
import pytest
import torch

from fewstep.cli import main
from fewstep.interop.edm_snapshot import SnapshotError, read_snapshot
from fewstep.networks import network_class
from fewstep.networks.blocks import BlockDict
from fewstep.training.restore import restore

# The paper classes' names for fewstep's reimplementations (the same names: the module trees match).
EDM_CLASSES = {"SongUNet", "DhariwalUNet", "UNetBlock", "Conv2d", "Linear", "GroupNorm", "PositionalEmbedding",
               "FourierEmbedding", "UNet", "Block", "MPConv", "MPFourier"}
SOURCE = "raise SystemExit('a snapshot reader ran the module source stored in the file')"


@pytest.fixture
def persistence(monkeypatch):
    """Stand-ins for the modules the papers' pickles name, so that pickle writes the same globals."""
    pkg, mod, dnnlib, util = (types.ModuleType(n) for n in ("torch_utils", "torch_utils.persistence", "dnnlib",
                                                              "dnnlib.util"))

    def _reconstruct_persistent_obj(meta):
        raise AssertionError("only used when writing")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    mod._reconstruct_persistent_obj = _reconstruct_persistent_obj
    pkg.persistence = mod
    easy = type("EasyDict", (dict,), {"__module__": "dnnlib.util"})
    util.EasyDict, dnnlib.util = easy, util
    for name, m in (("torch_utils", pkg), ("torch_utils.persistence", mod), ("dnnlib", dnnlib),
                    ("dnnlib.util", util)):
        monkeypatch.setitem(sys.modules, name, m)
    return types.SimpleNamespace(reconstruct=_reconstruct_persistent_obj, EasyDict=easy)


class Persistent:
    """Pickles as `torch_utils.persistence` does: `_reconstruct_persistent_obj(meta)`."""

    def __init__(self, persistence, class_name, state):
        self.persistence, self.class_name, self.state = persistence, class_name, state

    def __reduce__(self):
        meta = dict(type="class", version=6, module_src=SOURCE, class_name=self.class_name, state=self.state)
        return self.persistence.reconstruct, (meta,)


def as_persistent(p, module, class_name=None, init_kwargs=None, dtype=None):
    """The persistent tree of a fewstep module: parameters, buffers (None ones too), submodules;
    EDM's `enc` / `dec` are plain torch ModuleDicts."""
    children = collections.OrderedDict(
        (n, as_persistent(p, c, dtype=dtype)) for n, c in module._modules.items())
    if isinstance(module, BlockDict):
        md = torch.nn.ModuleDict()
        object.__setattr__(md, "_modules", children)
        return md
    def cast(v):  # EDM2's gains are scalars in its snapshots (1-vectors in fewstep's network)
        v = None if v is None else (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
        return v.reshape(()) if v is not None and v.shape == (1,) and type(module).__name__ in ("Block", "UNet") else v

    params = collections.OrderedDict((n, None if v is None else torch.nn.Parameter(cast(v.detach()), False))
                                     for n, v in module._parameters.items())
    state = {"training": False, "_parameters": params,
             "_buffers": collections.OrderedDict((n, cast(v)) for n, v in module._buffers.items()),
             "_non_persistent_buffers_set": set(), "_modules": children, "_init_args": (),
             "_init_kwargs": init_kwargs or {}, "_forward_hooks": collections.OrderedDict()}
    name = class_name or type(module).__name__
    assert class_name or name in EDM_CLASSES, name
    return Persistent(p, name, state)


TINY = dict(img_resolution=8, img_channels=2, model_channels=8, channel_mult=[1, 2], num_blocks=1,
            attn_resolutions=[4], dropout=0.0)
SONG = {"ddpmpp": dict(embedding_type="positional", encoder_type="standard", decoder_type="standard",
                       channel_mult_noise=1, resample_filter=[1, 1]),
        "ncsnpp": dict(embedding_type="fourier", encoder_type="residual", decoder_type="standard",
                       channel_mult_noise=2, resample_filter=[1, 3, 3, 1])}
PRECONDS = {"VPPrecond": "vp", "VEPrecond": "ve", "EDMPrecond": "edm", "ECMPrecond": "edm"}


def edm_snapshot(p, path, class_name, name, label_dim=0, edit=None, channels=2):
    """An EDM snapshot of a random fewstep network; returns that network (the reference)."""
    tiny = dict(TINY, model_channels=64, channel_mult=[1, 1]) if name == "adm" else TINY  # EDM's 64 per head
    tiny = dict(tiny, img_channels=channels)
    net = network_class(name)(**tiny, label_dim=label_dim, precond=PRECONDS[class_name]).eval()
    with torch.no_grad():
        for q in net.parameters():
            q.normal_(0, 0.2)
    model_kwargs = dict(tiny, model_type="SongUNet" if name != "adm" else "DhariwalUNet", **SONG.get(name, {}))
    model_kwargs.update(label_dim=label_dim, use_fp16=False, augment_dim=0)
    model = as_persistent(p, net.model)
    state = {"training": False, "_parameters": collections.OrderedDict(), "_buffers": collections.OrderedDict(),
             "_modules": collections.OrderedDict(model=model), "_init_args": (), "_init_kwargs": model_kwargs,
             "sigma_min": np.float64(0.002), "label_dim": label_dim}
    if edit:
        edit(state)
    top = {"ema": Persistent(p, class_name, state),
           "loss_fn": Persistent(p, "EDMLoss", {"P_mean": np.float32(-1.2), "P_std": 1.2, "sigma_data": 0.5}),
           "augment_pipe": None,
           "dataset_kwargs": {"class_name": "training.dataset.ImageFolderDataset", "path": "cifar10.zip",
                              "resolution": np.int64(8), "dtype": np.dtype("float32")}}
    path.write_bytes(pickle.dumps(top, protocol=4))
    return net


def _same(a, b, x, t, labels=None, atol=0.0):
    with torch.no_grad():
        torch.testing.assert_close(a(x, t, labels), b(x, t, labels), rtol=0, atol=atol)


@pytest.mark.parametrize("class_name,name", [("VPPrecond", "ddpmpp"), ("VEPrecond", "ncsnpp"),
                                             ("EDMPrecond", "adm"), ("ECMPrecond", "ddpmpp")])
def test_an_edm_snapshot_reads_into_its_network(persistence, tmp_path, class_name, name):
    path = tmp_path / "snap.pkl"
    ref = edm_snapshot(persistence, path, class_name, name, label_dim=3)
    snap = read_snapshot(path)
    assert snap.spec["name"] == name and snap.precond == PRECONDS[class_name] and snap.class_name == class_name
    assert snap.dataset["resolution"] == 8 and snap.num_classes == 3
    x, t = torch.randn(3, 2, 8, 8), torch.tensor([0.1, 0.9, 1.4])
    _same(snap.net, ref, x, t, torch.tensor([0, 1, 3]))
    assert snap.method["name"] == ("ect" if class_name == "ECMPrecond" else "flow")


def test_an_edm2_snapshot_reads_its_fp16_ema_and_latent_settings(persistence, tmp_path):
    cfg = dict(img_channels=2, img_resolution=8, label_dim=3, model_channels=8, channel_mult=[1, 2], num_blocks=1,
               attn_resolutions=[4], channels_per_head=8)
    ref = network_class("edm2")(**cfg).eval()
    with torch.no_grad():
        for q in ref.parameters():
            q.normal_(0, 0.5)
    ema = as_persistent(persistence, ref, "Precond", dict(cfg, use_fp16=True, dropout=0.0), dtype=torch.float16)
    encoder = Persistent(persistence, "StabilityVAEEncoder", {
        "_init_kwargs": {"vae_name": "stabilityai/sd-vae-ft-mse", "raw_mean": [5.81, 3.25, 0.12, -2.15],
                         "raw_std": [4.17, 4.62, 3.71, 3.28], "final_mean": 0, "final_std": 0.5},
        "scale": np.float32(0.5) / np.array([4.17, 4.62, 3.71, 3.28], dtype=np.float32)})
    top = persistence.EasyDict(encoder=encoder, dataset_kwargs={"path": "img512-sd.zip"}, loss_fn=None, ema=ema)
    path = tmp_path / "edm2.pkl"
    path.write_bytes(pickle.dumps(top, protocol=4))
    snap = read_snapshot(path)
    assert snap.spec["name"] == "edm2" and next(snap.net.parameters()).dtype == torch.float32
    ref16 = network_class("edm2")(**cfg).eval()
    with torch.no_grad():
        for a, b in zip(ref16.state_dict().values(), ref.state_dict().values()):
            a.copy_(b.half().float())  # what the fp16 EMA holds
    x, t = torch.randn(2, 2, 8, 8), torch.tensor([0.3, 1.2])
    _same(snap.net, ref16, x, t, torch.tensor([2, 3]))
    lat = snap.latents  # decoding: z = x / scaling_factor + shift_factor recovers EDM2's raw latents
    z = np.array([1.0, -2.0, 0.5, 3.0])
    x_model = (z - np.array([5.81, 3.25, 0.12, -2.15])) * 0.5 / np.array([4.17, 4.62, 3.71, 3.28])
    np.testing.assert_allclose(x_model / np.array(lat["scaling_factor"]) + np.array(lat["shift_factor"]), z)
    assert lat["vae"] == "stabilityai/sd-vae-ft-mse" and lat["pixel_shape"] == [3, 64, 64]


CANARY_CODE = "open({path!r}, 'w').write('ran')"


def _payloads(canary):
    """Pickles that would run code if unpickled normally: raw GLOBAL opcodes, and a __reduce__."""
    cmd = f"touch {canary}"

    class Evil:
        def __reduce__(self):
            import os
            return os.system, (cmd,)

    return {
        "os.system": b"cos\nsystem\n(V" + cmd.encode() + b"\ntR.",
        "builtins.exec": b"cbuiltins\nexec\n(V" + CANARY_CODE.format(path=str(canary)).encode() + b"\ntR.",
        "subprocess.Popen": b"csubprocess\nPopen\n((Vtouch\nV" + str(canary).encode() + b"\nltR.",
        "system": pickle.dumps({"ema": Evil(), "dataset_kwargs": {}}, protocol=4),  # posix.system (nt.system)
    }


@pytest.mark.parametrize("global_name", ["os.system", "builtins.exec", "subprocess.Popen", "system"])
def test_a_pickle_that_names_any_other_global_is_refused_and_nothing_runs(tmp_path, global_name):
    canary = tmp_path / "canary"
    path = tmp_path / "evil.pkl"
    path.write_bytes(_payloads(canary)[global_name])
    with pytest.raises(SnapshotError) as err:
        read_snapshot(path)
    message = str(err.value)
    assert "\n" not in message and "refused" in message and global_name in message, message
    assert not canary.exists()
    # the command line too: one line, exit code 2
    assert main(["sample", str(path), "--out", str(tmp_path / "s.png")]) == 2
    assert not canary.exists()


def test_a_truncated_snapshot_and_wrong_tensors_are_one_line_refusals(persistence, tmp_path):
    path = tmp_path / "snap.pkl"
    edm_snapshot(persistence, path, "EDMPrecond", "ddpmpp")
    data = path.read_bytes()
    (tmp_path / "cut.pkl").write_bytes(data[: len(data) // 2])
    with pytest.raises(SnapshotError, match="truncated") as err:
        read_snapshot(tmp_path / "cut.pkl")
    assert "\n" not in str(err.value)

    def drop(state):
        del state["_modules"]["model"].state["_modules"]["map_layer0"].state["_parameters"]["bias"]

    edm_snapshot(persistence, path, "EDMPrecond", "ddpmpp", edit=drop)
    with pytest.raises(SnapshotError, match="lacks tensor 'model.map_layer0.bias'"):
        read_snapshot(path)

    def add(state):
        state["_modules"]["model"].state["_buffers"]["extra"] = torch.zeros(2)

    edm_snapshot(persistence, path, "EDMPrecond", "ddpmpp", edit=add)
    with pytest.raises(SnapshotError, match="has tensor 'model.extra'"):
        read_snapshot(path)

    edm_snapshot(persistence, path, "VPPrecond", "ddpmpp", edit=lambda s: s["_init_kwargs"].update(beta_d=10.0))
    with pytest.raises(SnapshotError, match="beta_d=10.0 is not supported"):
        read_snapshot(path)


def test_sample_eval_teacher_and_convert_accept_a_snapshot(persistence, tmp_path):
    path = tmp_path / "edm-vp.pkl"
    ref = edm_snapshot(persistence, path, "VPPrecond", "ddpmpp")
    restored = restore(path)
    assert restored.method_name == "flow" and restored.shape == (2, 8, 8)
    assert restored.config["network"]["arch"] == "ddpmpp" and restored.config["network"]["precond"] == "vp"
    x, t = torch.randn(2, 2, 8, 8), torch.tensor([0.5, 1.0])
    _same(restored.net, ref, x, t)
    assert main(["convert", str(path), "--out", str(tmp_path / "conv")]) == 0
    converted = restore(tmp_path / "conv")
    assert converted.method_name == "flow" and converted.shape == (2, 8, 8)
    _same(converted.net, ref, x, t)
    _same(restore(tmp_path / "conv", ema=False).net, ref, x, t)
    out = tmp_path / "s.png"
    assert main(["sample", str(path), "--steps", "2", "--num", "4", "--out", str(out)]) == 0
    assert out.exists()


def test_train_takes_a_snapshot_as_teacher(persistence, tmp_path):
    """ECT from an EDM snapshot, as ECT's 1-hour recipe starts (here on 8x8 digits, 2 steps)."""
    path = tmp_path / "edm-vp.pkl"
    edm_snapshot(persistence, path, "VPPrecond", "ddpmpp", channels=1)
    common = ["--data", "digits", "--batch-size", "8", "--no-progress", "--set", "train.sample_every=0",
              "--steps", "2"]
    assert main(["train", *common, "--method", "ect", "--teacher", str(path), "--out", str(tmp_path / "ect")]) == 0
    assert restore(tmp_path / "ect").config["network"]["arch"] == "ddpmpp"


def test_per_channel_latent_factors_decode_as_edm2(tmp_path):
    """EDM2's normalization is per channel: the codec decodes z = x / scaling_factor + shift_factor per channel."""
    diffusers = pytest.importorskip("diffusers")
    from fewstep.interop.diffusers.latents import VAECodec

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
                                  norm_num_groups=4, down_block_types=("DownEncoderBlock2D",),
                                  up_block_types=("UpDecoderBlock2D",), sample_size=8)
    vae.save_pretrained(tmp_path / "vae", safe_serialization=True)
    sf, shift = [0.12, 0.11, 0.13, 0.15], [5.81, 3.25, 0.12, -2.15]
    codec = VAECodec({"vae": str(tmp_path / "vae"), "scaling_factor": sf, "shift_factor": shift,
                      "pixel_shape": [3, 8, 8]})
    x = torch.randn(2, 4, 8, 8)
    z = x / torch.tensor(sf).reshape(1, 4, 1, 1) + torch.tensor(shift).reshape(1, 4, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(codec(x), codec.vae.decode(z, return_dict=False)[0])
        pixels = torch.rand(2, 3, 8, 8) * 2 - 1
        mean = codec.vae.encode(pixels, return_dict=False)[0].mean
        torch.testing.assert_close(codec.encode(pixels) / torch.tensor(sf).reshape(1, 4, 1, 1)
                                   + torch.tensor(shift).reshape(1, 4, 1, 1), mean, rtol=1e-5, atol=1e-5)
