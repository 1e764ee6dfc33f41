"""Zero-shot editing with a consistency model (CM paper, Algorithm 4; docs/math.md#zero-shot-editing), in TrigFlow.

Every task is the same loop over decreasing times `t_1 > ... > t_N`, with an invertible linear
transform `A` (here always orthogonal) and a mask `Omega` in A's space (1 = generate, 0 = keep
from the reference `y`):

    keep = (A y) * (1 - Omega)
    x = f(cos(t_1) A^-1[keep] + sin(t_1) sigma_d z, t_1)
    x = A^-1[keep + (A x) * Omega]
    for t in t_2 .. t_N:  x = f(cos(t) x + sin(t) sigma_d z, t);  x = A^-1[keep + (A x) * Omega]

so what is kept comes back exactly. `consistency_fn(x_t, t) -> x0` is the sampler callable of
`fewstep.core.samplers` (e.g. `trigflow_sampler_fn(net, sigma_d)`); `t` is a per-sample (B,) tensor.

- `inpaint`: A = identity, Omega = the pixels to fill.
- `colorize`: A = an orthogonal colour transform whose first channel is luminance; the output's
  luminance is the input's.
- `super_resolve`: A = an orthogonal transform of each p x p patch whose first component is the
  patch mean; the output, average-pooled, is the low-resolution input.
- `sdedit` (stroke-guided editing): noise a rough image to `times[0]` and sample from there.
- `denoise`: one evaluation at the noise level of the input.
- `interpolate`: spherical interpolation between two noises, then one step.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from fewstep.core.trigflow import SIGMA_D, expand_to, trigflow_noise

ConsistencyFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# Luminance weights (ITU-R BT.601), the first axis of the colour transform.
LUMA = (0.299, 0.587, 0.114)


def _times(times) -> list[float]:
    times = [float(t) for t in times]
    if not times or any(not 0 < t <= math.pi / 2 + 1e-6 for t in times):
        raise ValueError(f"times must be a non-empty list in (0, pi/2], got {times}")
    if any(b >= a for a, b in zip(times, times[1:])):
        raise ValueError(f"times must be strictly decreasing, got {times}")
    return times


def _randn(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(like.shape, device=like.device, dtype=like.dtype, generator=generator)


@torch.no_grad()
def edit(consistency_fn: ConsistencyFn, y: torch.Tensor, mask: torch.Tensor, times: Sequence[float],
         sigma_d: float = SIGMA_D, transform: Callable | None = None, inverse: Callable | None = None,
         generator: torch.Generator | None = None) -> torch.Tensor:
    """Algorithm 4: generate where `mask` (in the transform's space, broadcastable to `A y`) is 1,
    keep `y` where it is 0. `transform`/`inverse`: A and A^-1 (default: the identity)."""
    A = transform or (lambda v: v)
    A_inv = inverse or (lambda v: v)
    times = _times(times)
    Ay = A(y)
    mask = mask.to(Ay.dtype).expand_as(Ay)
    keep = Ay * (1 - mask)

    def project(x: torch.Tensor) -> torch.Tensor:
        return A_inv(keep + A(x) * mask)

    x = A_inv(keep)
    for t in times:
        tt = torch.full((y.shape[0],), t, device=y.device, dtype=y.dtype)
        x = project(consistency_fn(trigflow_noise(x, sigma_d * _randn(y, generator), tt), tt))
    return x


# ---------------------------------------------------------------------------------------------
# Inpainting


def inpaint(consistency_fn: ConsistencyFn, y: torch.Tensor, mask: torch.Tensor, times: Sequence[float],
            sigma_d: float = SIGMA_D, generator: torch.Generator | None = None) -> torch.Tensor:
    """Fill the pixels where `mask` is 1 (mask: (H, W), (1, 1, H, W) or like `y`)."""
    return edit(consistency_fn, y, mask, times, sigma_d, generator=generator)


def inpaint_mask(shape: Sequence[int], kind: str = "center", fraction: float = 0.5, seed: int = 0) -> torch.Tensor:
    """A (1, 1, H, W) mask for images of shape (..., H, W): 'center' (a square holding `fraction`
    of the area), 'left' / 'top' (that fraction of columns / rows), 'random' (that fraction of pixels)."""
    h, w = shape[-2], shape[-1]
    mask = torch.zeros(1, 1, h, w)
    if kind == "center":
        sh, sw = max(1, round(h * math.sqrt(fraction))), max(1, round(w * math.sqrt(fraction)))
        top, left = (h - sh) // 2, (w - sw) // 2
        mask[..., top:top + sh, left:left + sw] = 1
    elif kind == "left":
        mask[..., : max(1, round(w * fraction))] = 1
    elif kind == "top":
        mask[..., : max(1, round(h * fraction)), :] = 1
    elif kind == "random":
        gen = torch.Generator().manual_seed(seed)
        mask = (torch.rand(1, 1, h, w, generator=gen) < fraction).float()
    else:
        raise ValueError(f"mask kind must be 'center', 'left', 'top' or 'random', got {kind!r}")
    return mask


# ---------------------------------------------------------------------------------------------
# Colorization


def colour_matrix(dtype=torch.float64) -> torch.Tensor:
    """A 3x3 orthogonal matrix whose first row is the unit luminance direction (QR completion)."""
    luma = torch.tensor(LUMA, dtype=torch.float64)
    basis = torch.stack([luma, torch.tensor([1.0, 0, 0]), torch.tensor([0, 1.0, 0])], dim=1)
    q, _ = torch.linalg.qr(basis)
    q = q.T
    if q[0] @ luma < 0:
        q[0] = -q[0]
    return q.to(dtype)


def _colour_maps(x: torch.Tensor):
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"colorization needs RGB images (B, 3, H, W), got shape {tuple(x.shape)}")
    q = colour_matrix(x.dtype).to(x.device)
    return (lambda v: torch.einsum("ij,bjhw->bihw", q, v)), (lambda v: torch.einsum("ji,bjhw->bihw", q, v))


def luminance(x: torch.Tensor) -> torch.Tensor:
    """The first channel of the colour transform, (B, 1, H, W): luminance up to a fixed scale."""
    return _colour_maps(x)[0](x)[:, :1]


def colorize(consistency_fn: ConsistencyFn, y: torch.Tensor, times: Sequence[float], sigma_d: float = SIGMA_D,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Colour images that keep the luminance of `y` (an RGB image; only its luminance is used)."""
    A, A_inv = _colour_maps(y)
    mask = torch.tensor([0.0, 1.0, 1.0], dtype=y.dtype, device=y.device).reshape(1, 3, 1, 1)
    return edit(consistency_fn, y, mask, times, sigma_d, A, A_inv, generator)


# ---------------------------------------------------------------------------------------------
# Super-resolution


def patch_matrix(patch: int, dtype=torch.float64) -> torch.Tensor:
    """A (p^2, p^2) orthogonal matrix whose first row is the patch mean direction `1 / p`."""
    n = patch * patch
    basis = torch.eye(n, dtype=torch.float64)
    basis[:, 0] = 1.0
    q, _ = torch.linalg.qr(basis)
    q = q.T
    if q[0].sum() < 0:
        q[0] = -q[0]
    return q.to(dtype)


def _patch_maps(x: torch.Tensor, patch: int):
    b, c, h, w = x.shape
    if h % patch or w % patch:
        raise ValueError(f"super-resolution by {patch} needs H and W divisible by {patch}, got {h}x{w}")
    q = patch_matrix(patch, x.dtype).to(x.device)

    def A(v: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, p^2, H/p, W/p)
        cols = F.unfold(v.reshape(b * c, 1, h, w), patch, stride=patch)  # (BC, p^2, L)
        return (q @ cols).reshape(b, c, patch * patch, h // patch, w // patch)

    def A_inv(u: torch.Tensor) -> torch.Tensor:
        cols = q.T @ u.reshape(b * c, patch * patch, -1)
        return F.fold(cols, (h, w), patch, stride=patch).reshape(b, c, h, w)

    return A, A_inv


def super_resolve(consistency_fn: ConsistencyFn, low_res: torch.Tensor, patch: int, times: Sequence[float],
                  sigma_d: float = SIGMA_D, generator: torch.Generator | None = None) -> torch.Tensor:
    """Images `patch` times larger whose `patch x patch` averages are `low_res` (B, C, h, w)."""
    y = F.interpolate(low_res, scale_factor=patch, mode="nearest")  # patch means = low_res
    A, A_inv = _patch_maps(y, patch)
    mask = torch.ones(1, 1, patch * patch, 1, 1, dtype=y.dtype, device=y.device)
    mask[:, :, 0] = 0
    return edit(consistency_fn, y, mask, times, sigma_d, A, A_inv, generator)


# ---------------------------------------------------------------------------------------------
# Stroke-guided editing, denoising, interpolation


@torch.no_grad()
def sdedit(consistency_fn: ConsistencyFn, strokes: torch.Tensor, times: Sequence[float], sigma_d: float = SIGMA_D,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """SDEdit with a consistency model: noise the stroke image to `times[0]` (below pi/2, so some
    of it survives) and sample through the times; nothing is kept fixed."""
    x = strokes
    for t in _times(times):
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype)
        x = consistency_fn(trigflow_noise(x, sigma_d * _randn(x, generator), tt), tt)
    return x


@torch.no_grad()
def denoise(consistency_fn: ConsistencyFn, noisy: torch.Tensor, sigma: float, sigma_d: float = SIGMA_D) -> torch.Tensor:
    """Remove Gaussian noise of known std `sigma` (`noisy = x0 + sigma n`) in one evaluation:
    in TrigFlow that input is `x_t / cos(t)` with `t = arctan(sigma / sigma_d)`."""
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    t = math.atan(sigma / sigma_d)
    tt = torch.full((noisy.shape[0],), t, device=noisy.device, dtype=noisy.dtype)
    return consistency_fn(math.cos(t) * noisy, tt)


def slerp(z0: torch.Tensor, z1: torch.Tensor, alpha: float) -> torch.Tensor:
    """Spherical interpolation between noises, per sample (alpha = 0 -> z0, 1 -> z1)."""
    a, b = z0.flatten(1), z1.flatten(1)
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    theta = expand_to(torch.acos(cos.clamp(-1, 1)), z0)
    sin = torch.sin(theta).clamp_min(1e-12)
    return torch.sin((1 - alpha) * theta) / sin * z0 + torch.sin(alpha * theta) / sin * z1


@torch.no_grad()
def interpolate(consistency_fn: ConsistencyFn, z0: torch.Tensor, z1: torch.Tensor, alphas: Sequence[float],
                sigma_d: float = SIGMA_D) -> torch.Tensor:
    """One-step samples along the slerp between unit noises z0 and z1 (B, ...): returns
    (len(alphas), B, ...)."""
    t = torch.full((z0.shape[0],), math.pi / 2, device=z0.device, dtype=z0.dtype)
    return torch.stack([consistency_fn(sigma_d * slerp(z0, z1, float(a)), t) for a in alphas])
