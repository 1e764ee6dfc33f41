"""2-D toys and an isotropic Gaussian, drawn on the fly.

Three ways to get points, each reproducible on its own terms:
  * `sample(n)` draws from torch's global CPU RNG (saving `torch.get_rng_state()` makes a run resumable);
  * `__getitems__(indices)` (the DataLoader's path) draws `len(indices)` fresh points from a generator
    seeded by a hash of the indices and the dataset's `seed`: a batch is a function of its indices, the
    same in any worker process and after a resume, and different for every batch;
  * `all()` / `batches()` give one fixed-seed reference set of `len(self)` points (for evaluation).
"""

from __future__ import annotations

import abc
import functools
import math
import numbers
from typing import Iterator, Sequence

import torch

from fewstep.data.base import SIGMA_D, DataError, Dataset, batch_generator, check_count, index_spans

TOY_SIZE = 10_000  # nominal len() of the on-the-fly datasets; all() draws exactly this many
_MOMENT_DRAWS = 1 << 20  # fixed-seed draw that sets a toy's shift and scale: ~0.1% error on the std
_MOMENT_SEED = 1234
_REFERENCE_SEED = 0  # seed of the draw all() returns


class DrawnDataset(Dataset):
    """A vector distribution drawn on the fly; subclasses say how to draw `n` points from a generator."""

    kind = "vector"
    num_classes = 0

    def __init__(self, size: int = TOY_SIZE, seed: int = 0):
        check_count(size, "size")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise DataError(f"seed must be an integer, got {seed!r}")
        self.size, self.seed = size, seed
        self._reference: torch.Tensor | None = None

    @abc.abstractmethod
    def draw_points(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """`n` points (n, D) float32 as the model sees them; generator None = torch's global RNG."""

    def __len__(self) -> int:
        return self.size

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor]:
        return (self.draw_points(len(indices), batch_generator(indices, self.seed)),)

    def sample(self, batch_size: int, device: torch.device | str | None = None) -> tuple[torch.Tensor, None]:
        check_count(batch_size, "batch_size")
        return self.draw_points(batch_size).to(device), None

    def all(self) -> tuple[torch.Tensor, None]:
        if self._reference is None:  # fixed set, global RNG untouched
            self._reference = self.draw_points(self.size, torch.Generator().manual_seed(_REFERENCE_SEED))
        return self._reference.clone(), None

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[tuple[torch.Tensor, None]]:
        """Slices of the reference set `all()` (not index-seeded draws), so that evaluations agree."""
        reference = self.all()[0]
        for span in index_spans(len(self), batch_size, limit):
            yield reference[span.start:span.stop], None


class ToyDataset(DrawnDataset):
    """A 2-D distribution shifted and scaled per dimension to mean 0, std 0.5.

    The shift (`offset`) and scale are constants estimated once from a fixed-seed draw of 2^20 raw
    points with a local generator (the global RNG is untouched); `denormalize` maps samples back
    to the raw coordinates that each subclass's docstring describes.
    """

    shape = (2,)

    def __init__(self, size: int = TOY_SIZE, seed: int = 0):
        super().__init__(size, seed)
        self.offset, self.scale = _toy_moments(type(self))

    @classmethod
    @abc.abstractmethod
    def draw(cls, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """`n` raw points (n, 2) in float32, before the shift and scale; generator None = global RNG."""

    def draw_points(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return (self.draw(n, generator) - self.offset) * self.scale


@functools.cache
def _toy_moments(cls: type[ToyDataset]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension (mean, sigma_d / std) of a toy, from a fixed-seed draw with a local generator."""
    raw = cls.draw(_MOMENT_DRAWS, torch.Generator().manual_seed(_MOMENT_SEED)).double()
    return raw.mean(0).float(), (SIGMA_D / raw.std(0)).float()


class EightGaussians(ToyDataset):
    """Eight equally likely Gaussians (std 0.1) centred on the unit circle at angles k pi / 4."""

    name = "8gaussians"
    NOISE = 0.1

    @classmethod
    def draw(cls, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        angle = torch.randint(8, (n,), generator=generator) * (math.pi / 4)
        centres = torch.stack([torch.cos(angle), torch.sin(angle)], dim=1).float()
        return centres + cls.NOISE * torch.randn(n, 2, generator=generator)


class Checkerboard(ToyDataset):
    """Uniform on the 8 squares of a 4x4 board on [-2, 2]^2 where floor(x) + floor(y) is even."""

    name = "checkerboard"

    @classmethod
    def draw(cls, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        x = torch.rand(n, generator=generator) * 4 - 2
        # a unit-high cell in row 0 or -2, lifted by one row in odd columns (so the parity is even)
        row = -2 * torch.randint(2, (n,), generator=generator) + torch.floor(x) % 2
        y = torch.rand(n, generator=generator) + row
        return torch.stack([x, y], dim=1)


class Moons(ToyDataset):
    """Two interleaved half circles as in scikit-learn's make_moons, plus Gaussian noise (std 0.1).

    Upper moon (cos a, sin a), lower moon (1 - cos a, 0.5 - sin a), a uniform in [0, pi], each moon
    equally likely.
    """

    name = "moons"
    NOISE = 0.1

    @classmethod
    def draw(cls, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        a = torch.rand(n, generator=generator) * math.pi
        upper = torch.rand(n, 1, generator=generator) < 0.5
        outer = torch.stack([torch.cos(a), torch.sin(a)], dim=1)
        inner = torch.stack([1 - torch.cos(a), 0.5 - torch.sin(a)], dim=1)
        return torch.where(upper, outer, inner) + cls.NOISE * torch.randn(n, 2, generator=generator)


class SwissRoll(ToyDataset):
    """A 2-D Swiss roll (s cos s, s sin s), s uniform in [1.5 pi, 4.5 pi], plus Gaussian noise (std 0.5)."""

    name = "swissroll"
    NOISE = 0.5
    T_MIN, T_MAX = 1.5 * math.pi, 4.5 * math.pi

    @classmethod
    def draw(cls, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        s = cls.T_MIN + (cls.T_MAX - cls.T_MIN) * torch.rand(n, generator=generator)
        roll = torch.stack([s * torch.cos(s), s * torch.sin(s)], dim=1)
        return roll + cls.NOISE * torch.randn(n, 2, generator=generator)


class GaussianDataset(DrawnDataset):
    """Exactly N(mean, std^2 I) in `dim` dimensions, deliberately not rescaled: its TrigFlow velocity
    and consistency function are known in closed form (tests compare against them)."""

    name = "gaussian"

    def __init__(self, dim: int = 2, std: float = 0.5, mean: float | Sequence[float] = 0.0,
                 size: int = TOY_SIZE, seed: int = 0):
        check_count(dim, "dim")
        if isinstance(std, bool) or not (isinstance(std, numbers.Real) and math.isfinite(std) and std > 0):
            raise DataError(f"std must be a positive number, got {std!r}")
        super().__init__(size, seed)
        m = torch.as_tensor(mean, dtype=torch.float32)
        if m.ndim > 1 or (m.ndim == 1 and len(m) != dim) or not torch.isfinite(m).all():
            raise DataError(f"mean must be a finite number or {dim} numbers, got {mean!r}")
        self.dim, self.std, self.shape = dim, float(std), (dim,)
        self.mean = m.expand(dim).clone()

    def draw_points(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.mean + self.std * torch.randn(n, self.dim, generator=generator)
