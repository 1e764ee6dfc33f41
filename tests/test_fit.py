"""`fewstep.fit` with objects that are not fewstep's: a user's network class, a torch DataLoader
with worker processes, exact resume, and the faults a long run meets (damaged checkpoints, a
full disk, non-finite losses)."""

import json
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from fewstep.training import checkpoint as ckpt
from fewstep import fit
from fewstep.apps.generate import load_model
from fewstep.methods import SCT, FlowMatching
from fewstep.networks import UnknownNetworkError, register_network
from fewstep.training.fit import NonFiniteLossError


@register_network("test-fit-mlp")
class TinyNet(torch.nn.Module):
    """A network written the way a user would: the contract F(x, t, labels=None), nothing from fewstep."""

    def __init__(self, dim: int = 2, width: int = 32, dropout: float = 0.1):
        super().__init__()
        self.inp = torch.nn.Linear(dim + 2, width)
        self.hidden = torch.nn.Linear(width, width)
        self.out = torch.nn.Linear(width, dim)
        self.dropout = dropout

    def forward(self, x, t, labels=None):
        h = torch.cat([x, torch.cos(t)[:, None], torch.sin(t)[:, None]], dim=1)
        h = F.silu(self.inp(h))
        h = F.dropout(F.silu(self.hidden(h)), self.dropout, self.training)
        return self.out(h)


def _loader(workers: int = 2):
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(0.5 * torch.randn(48, 2, generator=g))
    return DataLoader(data, batch_size=16, shuffle=True, num_workers=workers, drop_last=True)


def _fit(out, steps, **kw):
    torch.manual_seed(0)
    net = TinyNet()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    return fit(net, SCT(), kw.pop("data", None) or _loader(), out, steps=steps, optimizer=opt, progress=False,
               log_every=2, ckpt_every=kw.pop("ckpt_every", 0), **kw)


def test_user_network_through_fit_on_dataloader_resumes_bit_identically(tmp_path):
    """8 steps at once == 5 steps, stop, resume for 3 more: the DataLoader (shuffle, 2 worker
    processes) replays the same order, dropout masks and noise included."""
    _fit(tmp_path / "full", 8)
    _fit(tmp_path / "split", 5)
    _fit(tmp_path / "split", 8)
    full, _ = ckpt.load_checkpoint(tmp_path / "full")
    split, state = ckpt.load_checkpoint(tmp_path / "split")
    assert state["step"] == 8 and state["data_position"] == {"epoch": 2, "batch": 2}  # 3 batches per epoch
    assert state["network"] == {"name": "test-fit-mlp", "kwargs": {"dim": 2, "width": 32, "dropout": 0.1}}
    assert state["method"]["name"] == "sct"
    assert full.keys() == split.keys()
    for k in full:
        assert torch.equal(full[k], split[k]), k


def test_resume_would_differ_without_the_data_position(tmp_path):
    """The check above can fail: resuming on a reshuffled loader gives other weights."""
    _fit(tmp_path / "full", 8, data=_loader(0))
    _fit(tmp_path / "split", 5, data=_loader(0))
    path = ckpt.list_checkpoints(tmp_path / "split" / "checkpoints")[-1]
    state = json.loads(path.read_text())
    state["data_position"] = {"epoch": 0, "batch": 0}
    path.write_text(json.dumps(state))
    _fit(tmp_path / "split", 8, data=_loader(0))
    full, _ = ckpt.load_checkpoint(tmp_path / "full")
    split, _ = ckpt.load_checkpoint(tmp_path / "split")
    assert not torch.equal(full["net.out.weight"], split["net.out.weight"])


def test_user_network_checkpoint_loads_and_samples(tmp_path):
    _fit(tmp_path, 3, data=[torch.randn(8, 2)] * 2)
    model = load_model(tmp_path)
    assert isinstance(model.net, TinyNet) and model.sampler.consistency_fn() is not None and model.shape == (2,)
    assert model.net.dropout == 0.1 and not model.net.training


@pytest.mark.parametrize("batch", [lambda x, y: x, lambda x, y: (x,), lambda x, y: [x, y]])
def test_batch_forms(tmp_path, batch):
    x, y = torch.randn(8, 2), torch.randint(0, 3, (8,))
    summary = fit(TinyNet(), FlowMatching(), [batch(x, y)], tmp_path, steps=2, progress=False, ckpt_every=0)
    assert summary["steps"] == 2


def test_bad_batch_is_a_one_line_error(tmp_path):
    with pytest.raises(TypeError, match=r"a batch must be a tensor x0, \(x0,\) or \(x0, labels\)"):
        fit(TinyNet(), SCT(), [{"x": torch.randn(4, 2)}], tmp_path, steps=1, progress=False)
    with pytest.raises(ValueError, match="yielded no batches"):
        fit(TinyNet(), SCT(), [], tmp_path / "empty", steps=1, progress=False)


def test_unregistered_network_is_refused_without_importing(tmp_path):
    """A checkpoint names its network; an unknown name is a one-line error that says how to
    register it, and nothing is imported on the checkpoint's say-so."""
    _fit(tmp_path, 1, data=[torch.randn(8, 2)])
    path = ckpt.list_checkpoints(tmp_path / "checkpoints")[-1]
    state = json.loads(path.read_text())
    state["network"] = {"name": "json.tool", "kwargs": {}}  # a module name: must not be imported
    path.write_text(json.dumps(state))
    sys.modules.pop("json.tool", None)
    with pytest.raises(UnknownNetworkError, match=r"network 'json.tool' is not registered.*--import MODULE.*"
                                                  r"register_network\('json.tool'\)") as err:
        load_model(tmp_path)
    assert "\n" not in str(err.value)
    assert "json.tool" not in sys.modules


def test_unregistered_class_still_trains_with_a_warning(tmp_path):
    class Unregistered(TinyNet):
        pass

    with pytest.warns(UserWarning, match="not a registered network"):
        fit(Unregistered(), SCT(), [torch.randn(8, 2)], tmp_path, steps=1, progress=False)
    with pytest.raises(ValueError, match="not written by fewstep.fit|no data shape|not registered"):
        load_model(tmp_path)


def test_damaged_latest_checkpoint_falls_back_to_the_previous(tmp_path, capsys):
    _fit(tmp_path, 4, data=_loader(0), ckpt_every=2, keep_ckpts=5)
    good, latest = ckpt.list_checkpoints(tmp_path / "checkpoints")[-2:]
    blob = latest.with_suffix(".safetensors")
    blob.write_bytes(blob.read_bytes()[: blob.stat().st_size // 2])  # truncated, as by a crash or a full disk
    capsys.readouterr()
    with pytest.warns(UserWarning, match=f"skipping a damaged checkpoint.*{blob.stem}"):
        summary = _fit(tmp_path, 6, data=_loader(0), ckpt_every=2, keep_ckpts=5)
    assert f"resumed from {good} at step 2" in capsys.readouterr().out
    assert summary["steps"] == 6


def test_disk_full_is_one_line_naming_the_last_good_checkpoint(tmp_path, monkeypatch):
    import errno

    _fit(tmp_path, 2, data=_loader(0), ckpt_every=2)
    before = {p.name: p.read_bytes() for p in (tmp_path / "checkpoints").iterdir()}

    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 100)  # a partial file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", disk_full)
    with pytest.raises(ckpt.CheckpointError) as err:
        _fit(tmp_path, 4, data=_loader(0), ckpt_every=2)
    message = str(err.value)
    assert "No space left on device" in message and "ckpt-0000002.json" in message and "\n" not in message
    after = {p.name: p.read_bytes() for p in (tmp_path / "checkpoints").iterdir()}
    assert after == before  # nothing good deleted, no partial file left


def test_nonfinite_stop_says_when_no_checkpoint_exists(tmp_path):
    class NaNMethod(SCT):
        def __call__(self, net, x0, labels=None, step=0):
            loss, stats = super().__call__(net, x0, labels, step)
            return loss * float("nan"), stats

    with pytest.raises(NonFiniteLossError, match="no checkpoint was written yet"), \
            pytest.warns(UserWarning, match="not a registered method"):
        fit(TinyNet(), NaNMethod(), [torch.randn(8, 2)], tmp_path, steps=10, max_nonfinite=2, progress=False,
            ckpt_every=0)


def test_a_plain_callable_is_a_method(tmp_path):
    """Any `loss(net, x0, labels, step)` trains; the protocol's defaults fill in the rest."""
    seen = []

    def regression(net, x0, labels=None, step=0):
        seen.append(step)
        t = torch.full((x0.shape[0],), 0.5)
        return (net(x0, t) - x0).square().mean(dim=1), {}

    net = TinyNet(dropout=0.0)
    with pytest.warns(UserWarning, match="not a registered method"):
        fit(net, regression, [torch.randn(8, 2)], tmp_path, steps=3, progress=False)
    assert seen == [0, 1, 2]


def test_a_fresh_run_refuses_a_folder_with_checkpoints(tmp_path):
    """resume=False over old checkpoints would mix two runs (and prune the new one's files)."""
    _fit(tmp_path, 2, data=[torch.randn(8, 2)], ckpt_every=1)
    with pytest.raises(ValueError, match="resume is off but .* already holds checkpoints"):
        _fit(tmp_path, 2, data=[torch.randn(8, 2)], resume=False)


def test_resume_drops_log_records_past_the_checkpoint(tmp_path):
    """Records written after the checkpoint a run resumes from are written again: the old ones go."""
    _fit(tmp_path, 5, data=_loader(0), ckpt_every=2, keep_ckpts=5)  # records 2, 4, 5; checkpoints 2, 4, 5
    for p in ckpt.list_checkpoints(tmp_path / "checkpoints")[-1:]:
        p.unlink()  # lost: the run resumes from step 4
    _fit(tmp_path, 6, data=_loader(0), ckpt_every=2, keep_ckpts=5)
    steps = [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6]


def test_the_checkpoint_folder_is_synced_after_each_rename(tmp_path, monkeypatch):
    import os
    import stat

    synced, fsync = [], os.fsync

    def recording(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        return fsync(fd)

    monkeypatch.setattr(os, "fsync", recording)
    ckpt.save_checkpoint(tmp_path, 1, {"a": torch.ones(2)}, {})
    assert synced == [False, True, False, True]  # tensors, folder, JSON, folder


def test_pruning_removes_the_shard_folders_of_interrupted_saves(tmp_path):
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step, {"a": torch.ones(2)}, {})
        ckpt.write_shard(tmp_path / f"ckpt-{step:07d}.shards", 0, {"a": torch.ones(2)})
    ckpt.write_shard(tmp_path / "ckpt-0000004.shards", 1, {"a": torch.ones(2)})  # no JSON: interrupted
    ckpt.prune_checkpoints(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["ckpt-0000002.shards", "ckpt-0000003.shards"]
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["ckpt-0000002.json", "ckpt-0000003.json"]


@pytest.mark.filterwarnings("ignore:.*not a registered method")
def test_fp16_steps_whose_gradients_overflowed_skip_ema_and_after_step(tmp_path, monkeypatch):
    """The loss scaler skips a step whose scaled fp16 gradients overflowed: the EMA and the
    method's after-step hook (an EMA target, a distillation round) must skip it too."""
    from fewstep.methods.base import Method
    from fewstep.training.ema import EMA

    class Overflowing(Method):
        def __init__(self):
            self.after = []

        def __call__(self, net, x0, labels=None, step=0):
            y = net(x0, torch.full((x0.shape[0],), 0.5)).float()
            return y.sum(1) * (1e35 if step == 1 else 1e-3), {}  # finite; x 65536 (the scale) it overflows

        def after_step(self, net, step):
            self.after.append(step)
            return False

    ema_steps, update = [], EMA.update
    monkeypatch.setattr(EMA, "update", lambda self, net, step: (ema_steps.append(step), update(self, net, step)))
    method = Overflowing()
    summary = fit(TinyNet(dropout=0.0), method, [torch.randn(8, 2)], tmp_path, steps=4, precision="fp16",
                  device="cpu", progress=False, ckpt_every=0)
    assert method.after == ema_steps == [0, 2, 3]
    assert summary["nonfinite_total"] == 1
