"""Helpers shared by the test files."""

import gzip
import json
import math
import os
import struct
import traceback
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fewstep.core.edm import edm_precond
from fewstep.networks import MLP, UNet


def randomize_zero_params_(net: torch.nn.Module, scale: float = 0.3, seed: int = 0) -> torch.nn.Module:
    """Re-draw every all-zero parameter (zero-initialised output layers, the adaptive-weight
    head) so that no part of the network is trivially zero and no math test is vacuous."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)
    return net


def tiny_unet(**kw) -> UNet:
    """A UNet small enough for float64 math checks, with attention (2 heads) at 4x4."""
    cfg = dict(img_channels=2, img_resolution=8, model_channels=8, channel_mult=(1, 2), num_blocks=1,
               attn_resolutions=(4,), attn_heads=2)
    cfg.update(kw)
    return UNet(**cfg)


def tiny_mlp(**kw) -> MLP:
    cfg = dict(dim=3, width=16, depth=2)
    cfg.update(kw)
    return MLP(**cfg)


# ---------------------------------------------------------------------------- Gaussian data, docs/math.md#gaussian-closed-forms
# Data N(MU, S^2 I) with S != SD, so that the probability-flow ODE is curved; every quantity below
# is a closed form, so samplers, conversions and tangents can be checked exactly (float64).

SD, S = 0.5, 0.2
MU = torch.tensor([0.3, -0.5, 1.0, 0.1], dtype=torch.float64)


def per_sample(t, x):
    """A time (scalar or (B,)) shaped to broadcast against `x` (B, ...)."""
    t = torch.as_tensor(t, dtype=x.dtype).expand(x.shape[0])
    return t.reshape(-1, *([1] * (x.ndim - 1)))


def v_star(x, t, labels=None, mu=MU, s=S, sd=SD):
    """Exact TrigFlow velocity `k(t) (x - cos t mu) - sin t mu`, `k = sin t cos t (sd^2 - s^2) / q`,
    `q = s^2 cos^2 t + sd^2 sin^2 t` (usable as a teacher `v(x, t, labels)`)."""
    t = per_sample(t, x)
    q = s ** 2 * torch.cos(t) ** 2 + sd ** 2 * torch.sin(t) ** 2
    return torch.sin(t) * torch.cos(t) * (sd ** 2 - s ** 2) / q * (x - torch.cos(t) * mu) - torch.sin(t) * mu


def f_star(x, t, mu=MU, s=S, sd=SD):
    """Exact TrigFlow consistency function (the ODE endpoint at t = 0 from (x, t))."""
    t = per_sample(t, x)
    q = s ** 2 * torch.cos(t) ** 2 + sd ** 2 * torch.sin(t) ** 2
    return mu + (x - torch.cos(t) * mu) * s / q.sqrt()


def exact_f(mu, s=None, cov=None, sd=SD):
    """The exact TrigFlow consistency function `fn(x_t, t)` (a sampler callable) of N(mu, s^2 I)
    data, or of N(mu, cov) data with `cov` over the flattened `mu`: per eigen-direction of cov with
    std s_i, `f = mu + s_i / sqrt(s_i^2 cos^2 t + sd^2 sin^2 t) (x - cos t mu)`."""
    if cov is None:
        return lambda x_t, t: f_star(x_t, t, mu, s, sd)
    lam, U = torch.linalg.eigh(cov)
    std = lam.clamp_min(0).sqrt()

    def f(x_t, t):
        x, m = x_t.reshape(x_t.shape[0], -1), mu.flatten()
        c, si = torch.cos(t)[:, None], torch.sin(t)[:, None]
        gain = std / (std ** 2 * c ** 2 + sd ** 2 * si ** 2).sqrt()  # (B, D)
        return (m + ((x - c * m) @ U * gain) @ U.T).reshape(x_t.shape)

    return f


def d_star(x, sigma, labels=None, mu=MU, s=S):
    """Exact EDM denoiser `mu + s^2 / (s^2 + sigma^2) (x - mu)`."""
    sigma = per_sample(sigma, x)
    return mu + s ** 2 / (s ** 2 + sigma ** 2) * (x - mu)


def f_star_edm(x, sigma, eps, mu=MU, s=S):
    """Exact EDM/VE consistency function (the PF-ODE solution through (x, sigma) at noise level
    eps): `mu + (x - mu) sqrt(s^2 + eps^2) / sqrt(s^2 + sigma^2)`; sigma a float or (B,) tensor."""
    return mu + (x - mu) * math.sqrt(s ** 2 + eps ** 2) / (s ** 2 + per_sample(sigma, x) ** 2).sqrt()


def algorithm_1_moments(sigmas, eps, mu=MU, s=S):
    """Mean and variance (per dimension) of VE multistep consistency samples (CM paper Algorithm 1:
    `x = f(T z, T)`, then `x = f(x + sqrt(tau^2 - eps^2) z', tau)`) with the exact consistency
    function `f(x, sigma) = mu + (x - mu) r(sigma)`, `r = sqrt(s^2 + eps^2) / sqrt(s^2 + sigma^2)`:
    f is affine, so each step maps a Gaussian to a Gaussian."""
    def r(sigma):
        return math.sqrt(s ** 2 + eps ** 2) / math.sqrt(s ** 2 + sigma ** 2)

    mean, var = mu - mu * r(sigmas[0]), sigmas[0] ** 2 * r(sigmas[0]) ** 2
    for tau in sigmas[1:]:
        mean, var = mu + (mean - mu) * r(tau), r(tau) ** 2 * (var + tau ** 2 - eps ** 2)
    return mean, var


class ConsistencyOracle(torch.nn.Module):
    """A TrigFlow network `F(x_t / sd, t)` whose consistency function `cos t x_t - sin t sd F` is
    exactly f* (defined for t > 0). Not the velocity: `cos t x - sin t v*` is the posterior mean."""

    num_classes = 0

    def __init__(self, mu=MU, s=S, sd=SD):
        super().__init__()
        self.register_buffer("mu", torch.as_tensor(mu))
        self.s, self.sd = s, sd

    def forward(self, y, t, labels=None):
        x = self.sd * y
        return (per_sample(torch.cos(t), x) * x - f_star(x, t, self.mu, self.s, self.sd)) / (
            self.sd * per_sample(torch.sin(t), x))


class OracleEDMNet(torch.nn.Module):
    """An EDM network `F(c_in x, c_noise)` whose preconditioned denoiser is exactly D*."""

    num_classes = 0

    def __init__(self, mu=MU, s=S, sigma_data=SD):
        super().__init__()
        self.mu, self.s, self.sigma_data = mu, s, sigma_data

    def forward(self, y, c_noise, labels=None):
        sigma = torch.exp(4 * c_noise)
        c_skip, c_out, c_in, _ = edm_precond(sigma, self.sigma_data)
        x = y / per_sample(c_in, y)
        return (d_star(x, sigma, mu=self.mu, s=self.s) - per_sample(c_skip, x) * x) / per_sample(c_out, x)


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> Path:
    """The MNIST IDX format: magic 0x0000TTNN, N big-endian uint32 sizes, big-endian data."""
    code = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D,
            np.float64: 0x0E}[array.dtype.type]
    raw = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw += array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def init_gloo(rank: int, world: int, directory, timeout: float = 120, store: str = "gloo-store",
              torchrun_env: bool = False) -> None:
    """A Gloo process group for an `mp.spawn` test, met through the file `store` in `directory` (no
    TCP port to race for), with a timeout so that a failed peer fails the test instead of hanging it.
    `torchrun_env`: also set RANK/WORLD_SIZE/LOCAL_RANK, which `fit` reads, as torchrun would."""
    import datetime

    import torch.distributed as dist

    if torchrun_env:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{Path(directory).resolve() / store}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=timeout))


def run_scenarios(rank: int, out_dir, scenarios) -> None:
    """Run `scenarios`, `[(name, fn(result))]`, in order on this process; write the dict they fill to
    `rank{rank}.json` and leave the process group. A failure is kept as `error_<name>` (its traceback)
    and ends the list: the other process may be stuck in a collective."""
    import torch.distributed as dist

    result = {}
    for name, scenario in scenarios:
        try:
            scenario(result)
        except Exception:  # noqa: BLE001 - reported by the test that reads it (scenario_part)
            result[f"error_{name}"] = traceback.format_exc()[-3000:]
            break
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def spawn_ranks(worker, out_dir, world: int, *args) -> list[dict]:
    """`worker(rank, out_dir, *args)` on `world` processes (it ends in `run_scenarios`); their results."""
    import torch.multiprocessing as mp

    mp.spawn(worker, args=(str(out_dir), *args), nprocs=world, join=True)
    return [json.loads((Path(out_dir) / f"rank{r}.json").read_text()) for r in range(world)]


def scenario_part(ranks: list[dict], name: str) -> list[dict]:
    """Every process's results, once none reports that scenario `name` failed."""
    for r in ranks:
        assert f"error_{name}" not in r, r[f"error_{name}"]
    return ranks


def rank_batches(rank: int, steps: int, world: int) -> list[torch.Tensor]:
    """Process `rank`'s batches (8 points in 2-D each) of one fixed draw shared by `world` processes."""
    gen = torch.Generator().manual_seed(3)
    x = 0.5 * torch.randn(steps, world, 8, 2, generator=gen, dtype=torch.float64)
    return [x[s, rank] for s in range(steps)]


class DropoutNet(nn.Module):
    """A tiny network with dropout between two linears (dropout-mask tests of the JVP modes)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 16), nn.Linear(16, 4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x, t):
        return self.b(self.drop(torch.tanh(self.a(x) * t[:, None])))
