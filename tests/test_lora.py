"""LoRA students (fewstep.networks.lora), offline with tiny random models: only the adapter trains,
the tangent is exact (float64 finite differences), resume is exact, the exported adapter loads with
diffusers' own loader and reproduces fewstep's 1-step samples, and bad settings are one-line errors."""

import json
import math
import shutil

import pytest
import torch

from fewstep.apps.generate import load_model
from fewstep.cli import main
from fewstep.jvp import check_tangent, jvp
from fewstep.networks import DiT, MLP, UNet, build_registered, lora_network, network_spec
from fewstep.training.checkpoint import load_checkpoint, unprefixed

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

WEIGHTS = "pytorch_lora_weights.safetensors"


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))


def tiny_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(16, 32), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
                                 attention_head_dim=8)


def train_args(teacher, out, *extra):
    return ["train", "--method", "scd", "--teacher", str(teacher), "--out", str(out), "--steps", "4",
            "--set", "train.batch_size=4", "--set", "train.sample_every=0", "--set", "train.num_samples=4",
            "--set", "train.ckpt_every=2", "--set", "train.progress=false", "--set", "optim.lr=0.01",
            "--set", "network.lora_rank=4", "--set", "network.lora_alpha=8", "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny DDPM teacher and its LoRA sCD student, 4 steps through `fewstep train`."""
    root = tmp_path_factory.mktemp("lora")
    diffusers.DDPMPipeline(unet=tiny_unet(), scheduler=diffusers.DDPMScheduler(num_train_timesteps=1000)
                           ).save_pretrained(root / "ddpm")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        assert main(train_args(root / "ddpm", root / "run")) == 0
    return root


def _final(run_dir):
    return load_checkpoint(run_dir / "checkpoints")


def test_only_the_adapter_trains(run):
    """The checkpoint's base weights (raw and EMA) are the teacher's, bit for bit; the adapter moved."""
    tensors, state = _final(run / "run")
    assert state["step"] == 4 and state["network"]["name"] == "lora"
    spec = state["network"]["kwargs"]
    assert spec["base"]["name"] == "diffusers" and spec["rank"] == 4 and spec["alpha"] == 8
    teacher = diffusers.UNet2DModel.from_pretrained(run / "ddpm" / "unet").state_dict()
    for prefix in ("net", "ema"):
        weights = unprefixed(prefix, tensors)
        base = {k: v for k, v in weights.items() if "lora_" not in k}
        assert len(base) == len(teacher)
        for key, value in base.items():
            name = key.removeprefix("base.model.").replace(".base_layer.", ".")
            assert torch.equal(value, teacher[name]), (prefix, key)
        lora_b = [v for k, v in weights.items() if "lora_B" in k]
        assert lora_b and any(v.abs().max() > 0 for v in lora_b)  # B starts at zero: it trained
    model = load_model(run / "run")
    trainable = [n for n, p in model.net.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_resume_is_exact(run, tmp_path):
    """Stopped after its step-2 checkpoint and resumed, the run ends where the uninterrupted one did."""
    copy = tmp_path / "run"
    shutil.copytree(run / "run", copy)
    for f in (copy / "checkpoints").glob("ckpt-*4.*"):
        f.unlink()
    assert _final(copy)[1]["step"] == 2
    assert main(train_args(run / "ddpm", copy)) == 0
    (a, _), (b, sb) = _final(run / "run"), _final(copy)
    assert sb["step"] == 4 and a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_exported_adapter_loads_in_diffusers_and_reproduces_samples(run, tmp_path):
    """diffusers' own loader puts the adapter on a fresh copy of the teacher's UNet2DModel; with the
    exported LCMScheduler, diffusers' 1- and 2-step samples are fewstep's."""
    from diffusers.loaders.peft import PeftAdapterMixin

    out = tmp_path / "adapter"
    assert main(["export", str(run / "run"), "--out", str(out)]) == 0
    record = json.loads((out / "fewstep.json").read_text())
    assert record["lora"]["rank"] == 4 and record["method"]["name"] == "scd"

    class UNet2DModelWithLoRA(diffusers.UNet2DModel, PeftAdapterMixin):  # UNet2DModel lacks the mixin
        pass

    unet = UNet2DModelWithLoRA.from_pretrained(run / "ddpm" / "unet")
    unet.load_lora_adapter(str(out), prefix="unet", weight_name=WEIGHTS)
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.LCMScheduler.from_pretrained(out))
    ours = load_model(run / "run")
    sched = ours.net.base.schedule
    for steps in (1, 2):
        images = pipe(batch_size=4, generator=torch.Generator().manual_seed(7), num_inference_steps=steps,
                      output_type="pt").images
        gen = torch.Generator().manual_seed(7)
        noise = torch.randn((4, 1, 8, 8), generator=gen)
        pipe.scheduler.set_timesteps(steps)
        times = [math.pi / 2] + [float(sched.trigflow_time(k)) for k in pipe.scheduler.timesteps[1:]]
        with torch.no_grad():
            x = ours.sampler.sample(noise, ours.sampler.schedule(times=times), generator=gen)
        assert torch.allclose(images, (x / 2 + 0.5).clamp(0, 1), atol=2e-5), steps
    # The adapter is the difference: the teacher alone samples something else.
    teacher = diffusers.DDPMPipeline(unet=diffusers.UNet2DModel.from_pretrained(run / "ddpm" / "unet"),
                                     scheduler=diffusers.LCMScheduler.from_pretrained(out))
    plain = teacher(batch_size=4, generator=torch.Generator().manual_seed(7), num_inference_steps=1,
                    output_type="pt").images
    assert not torch.allclose(plain, images, atol=1e-3)


def _trained(net):
    """`net` with random weights everywhere (a stand-in for a trained teacher: fewstep zero-inits its output)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return net


@pytest.mark.parametrize("make, shape", [
    (lambda: UNet(1, 8, model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,)), (2, 1, 8, 8)),
    (lambda: DiT(1, 8, patch_size=2, hidden_size=16, depth=1, heads=2), (2, 1, 8, 8)),
    (lambda: MLP(3, width=16, depth=2), (2, 3)),
])
def test_tangent_is_exact(make, shape):
    """LoRA layers are linears and convolutions: the engine's JVP equals float64 central differences."""
    net = lora_network(_trained(make()), rank=2, alpha=3)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name:  # a trained adapter, not the zero one
                p.normal_()
    net = net.double()
    x, t = torch.randn(shape, dtype=torch.float64), torch.tensor([0.4, 1.3], dtype=torch.float64)
    report = check_tangent(net, (x, t))
    assert report["rel_err_fd"] < 1e-7 and report["first_bad_op"] is None, report
    tx, tt = torch.randn_like(x), torch.ones_like(t)
    _, out_dot = jvp(net, (x, t), (tx, tt), mode="tangent")
    eps = 1e-6
    with torch.no_grad():
        fd = (net(x + eps * tx, t + eps * tt) - net(x - eps * tx, t - eps * tt)) / (2 * eps)
    assert torch.allclose(out_dot, fd, rtol=1e-6, atol=1e-7)


def test_a_lora_network_rebuilds_from_its_spec():
    net = lora_network(_trained(MLP(3, width=16, depth=2)), rank=2)
    spec = network_spec(net)
    assert spec["kwargs"]["targets"] == ["linear"] and spec["kwargs"]["base"]["name"] == "mlp"
    again = build_registered(json.loads(json.dumps(spec)))
    again.load_state_dict(net.state_dict())
    x, t = torch.randn(4, 3), torch.rand(4)
    with torch.no_grad():
        assert torch.equal(again(x, t), net(x, t))
    # Only the adapter and the loss's adaptive-weight head train; the head is never adapted.
    whole = {n.split(".")[1] for n, p in net.named_parameters() if p.requires_grad and "lora_" not in n}
    assert whole == {"weight_head"}


def test_bad_settings_are_one_line_errors(run, tmp_path, capsys, monkeypatch):
    cases = [(["--set", "network.lora_rank=0"], "lora_rank must be an integer >= 1"),
             (["--set", 'network.lora_targets=["no_such_layer"]'], "match no Linear/Conv layer"),
             (["--set", "network.lora_rank=null", "--set", "network.lora_alpha=8"], "give network.lora_rank")]
    for extra, message in cases:
        assert main(train_args(run / "ddpm", tmp_path / "r", *extra)) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    # LoRA freezes a teacher's weights: without one there is nothing to freeze.
    assert main(["train", "--preset", "8gaussians", "--steps", "1", "--set", "network.lora_rank=4",
                 "--device", "cpu", "--out", str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train.teacher" in err, err

    from fewstep.networks import register_network

    @register_network("test-lora-plain")
    class Plain(torch.nn.Module):
        def __init__(self, dim: int = 2):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(dim))

    with pytest.raises(ValueError, match="no default LoRA targets for Plain") as e:
        lora_network(Plain(), rank=2)
    assert len(str(e.value).splitlines()) == 1
    monkeypatch.setitem(__import__("sys").modules, "peft", None)
    with pytest.raises(ImportError, match=r"pip install 'fewstep\[lora\]'"):
        lora_network(_trained(MLP(3, width=8, depth=1)), rank=2)


def test_a_lora_student_of_a_fewstep_teacher(tmp_path, capsys):
    """fewstep's own networks take the same settings: an MLP flow teacher, its LoRA sCD student."""
    small = ["--steps", "2", "--set", "train.batch_size=16", "--set", "train.sample_every=0", "--set",
             "train.num_samples=4", "--set", "train.progress=false", "--set", "network.width=16", "--device", "cpu"]
    assert main(["train", "--preset", "8gaussians", "--method", "flow", "--out", str(tmp_path / "flow"), *small]) == 0
    assert main(["train", "--preset", "8gaussians", "--method", "scd", "--teacher", str(tmp_path / "flow"),
                 "--set", "network.lora_rank=2", "--out", str(tmp_path / "scd"), *small]) == 0
    assert "LoRA student: rank 2" in capsys.readouterr().out
    tensors, state = load_checkpoint(tmp_path / "scd" / "checkpoints")
    assert state["network"]["kwargs"]["base"]["name"] == "mlp" and state["network"]["kwargs"]["targets"] == ["linear"]
    teacher, _ = load_checkpoint(tmp_path / "flow" / "checkpoints")
    for key, value in unprefixed("net", tensors).items():
        if "lora_" not in key and not key.startswith("base.weight_head."):
            assert torch.equal(value, teacher["ema." + key.removeprefix("base.").replace(".base_layer.", ".")]), key
    assert main(["export", str(tmp_path / "scd"), "--out", str(tmp_path / "x")]) == 2  # not a diffusers model
    assert "diffusers model" in capsys.readouterr().err
