"""fewstep.data.loader: epoch permutations, process shares, exact resume (also through worker
processes), x-flip, and lazy image folders that read in constant memory."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fewstep.data import (DataError, EpochBatchSampler, TensorDataset, XFlip, load_dataset, loader_position,
                          make_loader, unpack_batch)


def epoch_batches(sampler: EpochBatchSampler) -> list[list[int]]:
    return list(iter(sampler))


def consume(loader, count: int) -> list[tuple[torch.Tensor, ...]]:
    """The next `count` batches, epoch after epoch, as a training loop takes them."""
    out = []
    while len(out) < count:
        for batch in loader:
            out.append(batch)
            if len(out) == count:
                break
    return out


def labeled_images(n: int = 40) -> TensorDataset:
    """Image k is the constant k (as uint8), label k % 3: every batch says which examples it holds."""
    x = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 3, 4).clone()
    return TensorDataset("ramp", x, torch.arange(n) % 3, kind="image")


def example_ids(x: torch.Tensor) -> list[int]:
    return torch.round((x[:, 0, 0, 0] + 1) * 127.5).long().tolist()


# ----------------------------------------------------------------------------------------------
# The sampler


def test_each_epoch_is_a_fresh_permutation():
    sampler = EpochBatchSampler(12, 3, seed=5)
    state = torch.get_rng_state()
    epochs = [epoch_batches(sampler) for _ in range(3)]  # each __iter__ moves on to the next epoch
    assert torch.equal(state, torch.get_rng_state())  # no global RNG
    for batches in epochs:
        assert len(batches) == len(sampler) == 4 and all(len(b) == 3 for b in batches)
        assert sorted(sum(batches, [])) == list(range(12))
    assert epochs[0] != epochs[1] != epochs[2]
    assert epoch_batches(EpochBatchSampler(12, 3, seed=5)) == epochs[0]  # same seed, same epochs
    assert epoch_batches(EpochBatchSampler(12, 3, seed=6)) != epochs[0]
    assert epoch_batches(EpochBatchSampler(12, 3, shuffle=False)) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]


def test_remainders():
    dropped = epoch_batches(EpochBatchSampler(11, 3, seed=1))  # 3 full batches; 2 examples wait
    assert len(dropped) == 3 and len(set(sum(dropped, []))) == 9
    kept = epoch_batches(EpochBatchSampler(11, 3, seed=1, drop_last=False))
    assert [len(b) for b in kept] == [3, 3, 3, 2] and sorted(sum(kept, [])) == list(range(11))


@pytest.mark.parametrize("n,world_size,drop_last", [(24, 3, True), (25, 3, True), (10, 3, False), (2, 4, False)])
def test_ranks_share_an_epoch(n, world_size, drop_last):
    batch = 2 if drop_last else 3
    shares = [sum(epoch_batches(EpochBatchSampler(n, batch, seed=2, rank=r, world_size=world_size,
                                                  drop_last=drop_last)), []) for r in range(world_size)]
    lengths = {len(EpochBatchSampler(n, batch, rank=r, world_size=world_size, drop_last=drop_last))
               for r in range(world_size)}
    assert len(lengths) == 1  # every process steps the same number of times
    union = sum(shares, [])
    if drop_last:  # truncated to a multiple of world_size, then to whole batches: disjoint
        assert len(union) == len(set(union)) == world_size * (n // world_size // batch) * batch
    else:  # padded with repeats: every example is there
        assert set(union) == set(range(n)) and len(union) == len(shares[0]) * world_size


def test_set_position_resumes_exactly():
    uninterrupted = EpochBatchSampler(20, 4, seed=3)
    full = [b for _ in range(3) for b in epoch_batches(uninterrupted)]
    per_epoch = 5
    for done in (0, 1, 4, 5, 7, 14):
        sampler = EpochBatchSampler(20, 4, seed=3)
        sampler.set_position(*loader_position(done, per_epoch))
        resumed = [b for _ in range(3) for b in epoch_batches(sampler)]
        assert resumed[:15 - done] == full[done:], done
    sampler = EpochBatchSampler(20, 4, seed=3)
    sampler.set_position(0, per_epoch)  # a finished epoch: the next one
    assert epoch_batches(sampler) == full[5:10]
    assert loader_position(17, 5) == (3, 2)


def test_sampler_errors():
    with pytest.raises(DataError, match="fewer than one batch of 8"):
        EpochBatchSampler(10, 8, world_size=2)
    with pytest.raises(DataError, match="rank"):
        EpochBatchSampler(10, 2, rank=2, world_size=2)
    with pytest.raises(DataError, match="batch"):
        EpochBatchSampler(10, 2).set_position(0, 6)
    with pytest.raises(DataError, match="batch_size"):
        make_loader(labeled_images(), 0)


# ----------------------------------------------------------------------------------------------
# Through torch's DataLoader


@pytest.mark.parametrize("spec", ["tensor", "moons"])
def test_loader_resumes_exactly_with_workers(spec):
    ds = labeled_images() if spec == "tensor" else load_dataset("moons", size=48)
    straight = consume(make_loader(ds, 4, seed=9), 27)  # 10 or 12 batches an epoch: crosses two epochs
    loader = make_loader(ds, 4, seed=9, workers=2)
    loader.batch_sampler.set_position(*loader_position(13, len(loader)))
    resumed = consume(loader, 14)
    assert len(straight[13:]) == len(resumed)
    for a, b in zip(straight[13:], resumed):
        assert len(a) == len(b) and all(torch.equal(u, v) for u, v in zip(a, b))
    if spec == "tensor":
        x, labels = unpack_batch(straight[0])
        assert x.shape == (4, 1, 3, 4) and x.dtype == torch.float32 and labels.dtype == torch.int64
        assert labels.tolist() == [k % 3 for k in example_ids(x)]
        seen = sum((example_ids(b[0]) for b in straight[:10]), [])
        assert sorted(seen) == list(range(40))  # the first epoch: every example once
    else:
        assert len(straight[0]) == 1 and straight[0][0].shape == (4, 2)
        assert not torch.equal(straight[0][0], straight[12][0])  # index-seeded: a new draw every batch


def test_a_loop_that_leaves_epochs_early_sees_the_same_stream():
    ds = labeled_images()
    straight = [example_ids(b[0]) for b in consume(make_loader(ds, 4, seed=2), 25)]
    loader, step, seen = make_loader(ds, 4, seed=2), 0, []
    while step < 25:  # the loop of loader.py's docstring, leaving every pass after at most 7 batches
        loader.batch_sampler.set_position(*loader_position(step, len(loader)))
        for batch in loader:
            seen.append(example_ids(batch[0]))
            step += 1
            if step == 25 or step % 7 == 0:
                break
    assert seen == straight


def test_loader_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    consume(make_loader(load_dataset("moons"), 8, seed=1), 3)
    assert torch.equal(state, torch.get_rng_state())


def test_zip_reads_in_forked_workers(tmp_path):
    rng = np.random.default_rng(12)
    with zipfile.ZipFile(tmp_path / "d.zip", "w") as archive:
        for i in range(12):
            path = tmp_path / f"{i}.png"
            Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).save(path)
            archive.write(path, f"img{i:02d}.png")
    ds = load_dataset(tmp_path / "d.zip")
    x, _ = ds.all()  # the parent's handle is open: children must not share its file position
    batches = consume(make_loader(ds, 3, shuffle=False, workers=2), 4)
    assert torch.equal(torch.cat([b[0] for b in batches]), x)


# ----------------------------------------------------------------------------------------------
# X-flip


def test_xflip_doubles_and_mirrors():
    base = TensorDataset("r", torch.arange(2 * 3 * 2 * 4, dtype=torch.uint8).view(2, 3, 2, 4),
                         torch.tensor([0, 1]), kind="image")
    ds = XFlip(base)
    assert (len(ds), ds.shape, ds.num_classes) == (4, (3, 2, 4), 2)
    x, y = ds.all()
    ref, ref_y = base.all()
    assert torch.equal(x[:2], ref) and torch.equal(x[2:], ref.flip(-1)) and torch.equal(y, ref_y.repeat(2))
    assert torch.equal(x[2, 0, 0], ref[0, 0, 0].flip(0))  # the row read right to left
    xb, yb = ds.__getitems__([3, 0])
    assert torch.equal(xb, x[[3, 0]]) and yb.tolist() == [1, 0]
    seen = sum((b[0].tolist() for b in consume(make_loader(XFlip(labeled_images(6)), 3, seed=4), 4)), [])
    assert len(seen) == 12  # one epoch: each image and each mirror once
    with pytest.raises(DataError, match="images"):
        XFlip(load_dataset("moons"))


# ----------------------------------------------------------------------------------------------
# Lazy folders: memory does not grow with the number of images

_PEAK_RSS = r"""
import io, os, resource, sys
if os.fork():  # measure in a fresh child: a process started from pytest inherits pytest's peak RSS
    sys.exit(os.waitstatus_to_exitcode(os.wait()[1]))
from pathlib import Path
import numpy as np
import torch
from PIL import Image
from fewstep.data import load_dataset, make_loader

def peak_mb():
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024  # bytes on macOS, KiB on Linux

def build(folder, n):  # 10 distinct noise PNGs (no compression: 12 kB each), copied round
    folder.mkdir()
    rng = np.random.default_rng(0)
    blobs = []
    for k in range(10):
        blob = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(blob, "PNG", compress_level=0)
        blobs.append(blob.getvalue())
    for i in range(n):
        (folder / f"img{i:05d}.png").write_bytes(blobs[i % 10])

def read_all(folder):
    ds = load_dataset(folder)
    count = sum(len(batch[0]) for batch in make_loader(ds, 32, workers=0, drop_last=False))
    assert count == len(ds) == len(os.listdir(folder))

root = Path(sys.argv[1])
build(root / "small", 300)
build(root / "large", 3000)
read_all(root / "small")  # warm: allocator pools, PIL plugins
before = peak_mb()
read_all(root / "large")
lazy = peak_mb() - before
held = torch.ones(3000, 3, 64, 64, dtype=torch.uint8)  # the control: the set held as uint8, 37 MB
print(lazy, peak_mb() - before - lazy)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="measures peak RSS in a forked process")
def test_lazy_folder_memory_does_not_grow_with_the_number_of_images(tmp_path):
    out = subprocess.run([sys.executable, "-c", _PEAK_RSS, str(tmp_path)], capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    lazy_mb, held_mb = map(float, out.stdout.split())
    # holding the 3000 images, even as uint8, takes 37 MB; reading them lazily takes next to nothing
    assert lazy_mb < 15, f"peak RSS grew {lazy_mb:.1f} MB from 300 to 3000 images"
    assert held_mb > 20, f"the control grew only {held_mb:.1f} MB: the measurement cannot see growth"
