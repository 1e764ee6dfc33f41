"""Writing what a person looks at: image grids and 2-D scatter plots as PNG (curves: plot.py)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (N, C, H, W) -> uint8 (N, C, H, W), clipped."""
    return ((x.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def image_grid(x: torch.Tensor, nrow: int | None = None, pad: int = 1, min_cell: int = 32) -> np.ndarray:
    """A grid (H, W, C) uint8 of images in [-1, 1]; tiny images are enlarged (nearest) so a
    cell is at least `min_cell` pixels wide."""
    u8 = to_uint8(x)
    n, c, h, w = u8.shape
    scale = max(1, math.ceil(min_cell / max(h, w)))
    if scale > 1:
        u8 = u8.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
        h, w = h * scale, w * scale
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    grid = torch.full((c, ncol * (h + pad) + pad, nrow * (w + pad) + pad), 255, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = u8[i]
    return grid.permute(1, 2, 0).numpy()


def save_image_grid(x: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = image_grid(x, nrow)
    Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr).save(path)
    return path


def save_scatter(points: dict[str, torch.Tensor], path: str | Path, title: str = "") -> Path:
    """Scatter plots of 2-D point sets side by side (e.g. data, 1-step, 2-step samples)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(points), figsize=(3.2 * len(points), 3.2), squeeze=False)
    all_pts = torch.cat([p[:, :2].float().cpu() for p in points.values()])
    lo, hi = all_pts.quantile(0.005, dim=0), all_pts.quantile(0.995, dim=0)
    margin = 0.1 * (hi - lo)
    for ax, (name, pts) in zip(axes[0], points.items()):
        pts = pts[:, :2].float().cpu().numpy()
        ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.5)
        ax.set_title(name, fontsize=9)
        ax.set_xlim(lo[0] - margin[0], hi[0] + margin[0])
        ax.set_ylim(lo[1] - margin[1], hi[1] + margin[1])
        ax.set_aspect("equal")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
