"""Zero-shot editing (docs/math.md#zero-shot-editing): the transforms are orthogonal, what is kept comes back exactly,
and with the exact consistency function of Gaussian data the edits do what they should."""

import math

import pytest
import torch
import torch.nn.functional as F

from fewstep.core.editing import (LUMA, colorize, colour_matrix, denoise, edit, inpaint, inpaint_mask, interpolate,
                             luminance, patch_matrix, sdedit, slerp, super_resolve)
from helpers import exact_f

SD = 0.5
DT = torch.float64


def smooth_gaussian(h: int = 4, w: int = 4, c: int = 1, length: float = 1.5):
    """N(mu, cov) over images with a squared-exponential pixel correlation (a correlated 'image')."""
    yy, xx = torch.meshgrid(torch.arange(h, dtype=DT), torch.arange(w, dtype=DT), indexing="ij")
    pos = torch.stack([yy.flatten(), xx.flatten()], 1)
    k = 0.16 * torch.exp(-torch.cdist(pos, pos) ** 2 / (2 * length ** 2))
    cov = torch.block_diag(*[k] * c) + 1e-4 * torch.eye(h * w * c, dtype=DT)
    mu = 0.1 * torch.ones(c, h, w, dtype=DT)
    return mu, cov


def draw(mu, cov, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    L = torch.linalg.cholesky(cov)
    return mu + (torch.randn(n, cov.shape[0], generator=g, dtype=DT) @ L.T).reshape(n, *mu.shape)


def any_fn(x, t):
    """A consistency-function stand-in that is not the identity (for the exact-keep checks)."""
    return torch.tanh(2 * x) + 0.3 * t.reshape(-1, *([1] * (x.ndim - 1)))


# ---------------------------------------------------------------------------------------------
# Transforms


def test_colour_matrix_is_orthogonal_with_luminance_first():
    q = colour_matrix()
    torch.testing.assert_close(q @ q.T, torch.eye(3, dtype=DT))
    luma = torch.tensor(LUMA, dtype=DT)
    torch.testing.assert_close(q[0], luma / luma.norm())


@pytest.mark.parametrize("patch", [2, 4])
def test_patch_matrix_is_orthogonal_with_the_mean_first(patch):
    q = patch_matrix(patch)
    torch.testing.assert_close(q @ q.T, torch.eye(patch * patch, dtype=DT))
    torch.testing.assert_close(q[0], torch.full((patch * patch,), 1.0 / patch, dtype=DT))


def test_inpaint_keeps_the_known_pixels_exactly():
    y = torch.randn(3, 1, 8, 8, dtype=DT)
    mask = inpaint_mask(y.shape, "center", 0.25)
    assert mask.sum() == 16
    x = inpaint(any_fn, y, mask, [math.pi / 2, 1.0, 0.5], SD, torch.Generator().manual_seed(0))
    assert torch.equal(x[..., mask[0, 0] == 0], y[..., mask[0, 0] == 0])
    assert (x[..., mask[0, 0] == 1] - y[..., mask[0, 0] == 1]).abs().max() > 0.1
    for kind in ("left", "top", "random"):
        m = inpaint_mask((8, 8), kind, 0.5)
        assert m.shape == (1, 1, 8, 8) and 20 <= m.sum() <= 44
    with pytest.raises(ValueError, match="mask kind"):
        inpaint_mask((8, 8), "ring")


def test_colorize_keeps_the_luminance_exactly():
    y = torch.rand(2, 3, 6, 6, dtype=DT) * 2 - 1
    x = colorize(any_fn, y, [math.pi / 2, 0.8], SD, torch.Generator().manual_seed(0))
    torch.testing.assert_close(luminance(x), luminance(y), rtol=1e-12, atol=1e-12)
    assert (x - y).abs().max() > 0.1  # the colour did change
    with pytest.raises(ValueError, match="RGB"):
        colorize(any_fn, torch.zeros(1, 1, 4, 4), [1.0])


@pytest.mark.parametrize("patch", [2, 4])
def test_super_resolution_output_pools_to_the_low_res_input(patch):
    low = torch.randn(2, 3, 2, 2, dtype=DT)
    x = super_resolve(any_fn, low, patch, [math.pi / 2, 0.9], SD, torch.Generator().manual_seed(0))
    assert x.shape == (2, 3, 2 * patch, 2 * patch)
    torch.testing.assert_close(F.avg_pool2d(x, patch), low, rtol=1e-12, atol=1e-12)
    assert (x - F.interpolate(low, scale_factor=patch)).abs().max() > 0.1  # detail was generated


# ---------------------------------------------------------------------------------------------
# With the exact consistency function of correlated Gaussian "images"


def test_inpainting_a_correlated_gaussian_follows_the_known_pixels():
    """Fill the right half of 4x4 images whose pixels are correlated: the filled pixels must track
    the kept ones. Score: correlation, over 4,000 images, between the mean of the filled pixels
    and its exact conditional mean E[x_fill | x_kept]. Exact conditional sampling scores 0.725
    (the conditional spread caps it). Measured: 1 step 0.01 (an unconditional sample), 4 steps
    0.21, 8 steps 0.37, 16 steps 0.50 (times pi/2, then 1.2 down to 0.3): Algorithm 4 needs
    several steps to pull the generated pixels towards the kept ones."""
    mu, cov = smooth_gaussian()
    f = exact_f(mu, cov=cov)
    y = draw(mu, cov, 4000, seed=1)
    mask = torch.zeros(1, 1, 4, 4, dtype=DT)
    mask[..., 2:] = 1
    fill, kept = mask.flatten().bool(), ~mask.flatten().bool()
    gain = cov[fill][:, kept] @ torch.linalg.inv(cov[kept][:, kept])
    want = (mu.flatten()[fill] + (y.flatten(1)[:, kept] - mu.flatten()[kept]) @ gain.T).mean(1)
    corr = {}
    for steps in (1, 8, 16):
        times = [math.pi / 2] + [float(t) for t in torch.linspace(1.2, 0.3, steps - 1)]
        x = inpaint(f, y, mask, times, SD, torch.Generator().manual_seed(0))
        got = x.flatten(1)[:, fill].mean(1)
        corr[steps] = torch.corrcoef(torch.stack([got, want]))[0, 1].item()
        assert torch.equal(x.flatten(1)[:, kept], y.flatten(1)[:, kept])
    print("inpainting: correlation with the exact conditional mean", {k: round(v, 3) for k, v in corr.items()})
    assert abs(corr[1]) < 0.1 and corr[8] > 0.25 and corr[16] > 0.4 and corr[16] < 0.8


def test_denoise_with_the_exact_function_returns_data_distributed_samples():
    """`f(x_t, t)` of data noised to t is distributed as the data: mean and covariance of the
    denoised samples match N(mu, cov)."""
    mu, cov = smooth_gaussian(2, 2)
    f = exact_f(mu, cov=cov)
    x0 = draw(mu, cov, 20000, seed=2)
    sigma = 0.3
    noisy = x0 + sigma * torch.randn(x0.shape, generator=torch.Generator().manual_seed(3), dtype=DT)
    out = denoise(f, noisy, sigma, SD).flatten(1)
    torch.testing.assert_close(out.mean(0), mu.flatten(), atol=0.01, rtol=0)
    torch.testing.assert_close(torch.cov(out.T), cov, atol=0.01, rtol=0)
    assert (out - x0.flatten(1)).square().mean() < noisy.flatten(1).sub(x0.flatten(1)).square().mean()
    with pytest.raises(ValueError, match="sigma"):
        denoise(f, noisy, 0.0)


def test_sdedit_keeps_a_lightly_noised_input_and_forgets_a_heavily_noised_one():
    mu, cov = smooth_gaussian(2, 2)
    f = exact_f(mu, cov=cov)
    strokes = torch.full((500, 1, 2, 2), 0.5, dtype=DT)  # a flat "stroke" image, off the data mean
    gen = torch.Generator().manual_seed(0)
    light = sdedit(f, strokes, [0.05], SD, gen)
    heavy = sdedit(f, strokes, [1.5], SD, gen)
    assert (light - strokes).abs().mean() < 0.05
    assert (heavy.mean() - mu.mean()).abs() < (strokes.mean() - mu.mean()).abs() / 5


def test_interpolation_endpoints_and_slerp():
    g = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(4, 1, 8, 8, generator=g, dtype=DT), torch.randn(4, 1, 8, 8, generator=g, dtype=DT)
    torch.testing.assert_close(slerp(z0, z1, 0.0), z0)
    torch.testing.assert_close(slerp(z0, z1, 1.0), z1)
    mid = slerp(z0 / z0.flatten(1).norm(dim=1)[:, None, None, None], z1 / z1.flatten(1).norm(dim=1)[:, None, None, None], 0.5)
    torch.testing.assert_close(mid.flatten(1).norm(dim=1), torch.ones(4, dtype=DT))  # stays on the sphere
    path = interpolate(any_fn, z0, z1, [0.0, 0.5, 1.0], SD)
    t = torch.full((4,), math.pi / 2, dtype=DT)
    assert path.shape == (3, 4, 1, 8, 8)
    torch.testing.assert_close(path[0], any_fn(SD * z0, t))
    torch.testing.assert_close(path[2], any_fn(SD * z1, t))


def test_edit_checks_times():
    with pytest.raises(ValueError, match="decreasing"):
        edit(any_fn, torch.zeros(1, 1, 2, 2), torch.ones(1), [0.5, 1.0])
    with pytest.raises(ValueError, match="pi/2"):
        edit(any_fn, torch.zeros(1, 1, 2, 2), torch.ones(1), [2.0])


# ---------------------------------------------------------------------------------------------
# fewstep edit


@pytest.fixture(scope="module")
def tiny_digits_run(tmp_path_factory):
    from fewstep.cli import main

    out = tmp_path_factory.mktemp("digits")
    assert main(["train", "--steps", "2", "--batch-size", "8", "--no-progress", "--out", str(out),
                 "--set", "network.model_channels=8", "--set", "network.channel_mult=[1]",
                 "--set", "network.attn_resolutions=[]", "--set", "train.sample_every=0"]) == 0
    return out


@pytest.mark.parametrize("task", ["inpaint", "superres", "denoise", "sdedit", "interpolate"])
def test_edit_command_writes_a_grid(tiny_digits_run, tmp_path, task, capsys):
    from PIL import Image

    from fewstep.cli import main

    out = tmp_path / f"{task}.png"
    assert main(["edit", str(tiny_digits_run), "--task", task, "--num", "3", "--frames", "4", "--device", "cpu",
                 "--out", str(out)]) == 0
    rows = 4 if task == "interpolate" else 3
    w, h = Image.open(out).size
    assert w > h * 0.5 and h >= rows * 8 and f"NFE {1 if task in ('denoise', 'interpolate') else 4}" in \
        capsys.readouterr().out


def test_edit_command_errors(tiny_digits_run, tmp_path, capsys):
    from fewstep.cli import main

    assert main(["edit", str(tiny_digits_run), "--task", "colorize", "--out", str(tmp_path / "c.png")]) == 2
    assert "RGB" in capsys.readouterr().err
    assert main(["edit", str(tiny_digits_run), "--task", "superres", "--factor", "3"]) == 2
    assert "divide the image size" in capsys.readouterr().err
    assert main(["edit", str(tiny_digits_run), "--task", "inpaint", "--input", "moons"]) == 2
    assert "images shaped like" in capsys.readouterr().err
