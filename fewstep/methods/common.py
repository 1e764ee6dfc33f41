"""Pieces shared by the training objectives."""

from __future__ import annotations

import torch

from fewstep.networks.contract import network_info


def same_random_draws(like: torch.Tensor):
    """A context that restores the RNG state of `like`'s device (and the CPU's) on exit, so that the
    code after the block draws the same random numbers as the code inside it: two forward passes
    of a network, one inside and one after, see the same dropout masks. This is how the official
    consistency-model code evaluates its online and target networks (`get_rng_state` /
    `set_rng_state` around the two passes)."""
    devices = [like.device] if like.device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices, device_type=like.device.type)


def per_sample_mse(residual: torch.Tensor) -> torch.Tensor:
    """`||residual||^2 / D` for each sample, in float32 or wider."""
    r = residual.float() if residual.dtype in (torch.float16, torch.bfloat16) else residual
    return r.square().flatten(1).mean(dim=1)


def adaptive_weighting(mse: torch.Tensor, net, t: torch.Tensor, enabled: bool):
    """docs/math.md#adaptive-weighting: `exp(w(t)) * mse - w(t)` with the network's learned head, or `mse` alone.

    Returns the per-sample loss and the weights `w(t)` (None when unused).
    """
    w = net.adaptive_weight(t) if (enabled and network_info(net).adaptive_weight) else None
    if w is None:
        return mse, None
    w = w.to(torch.promote_types(w.dtype, torch.float32))  # fp16/bf16 -> fp32; fp64 stays fp64
    return torch.exp(w) * mse - w, w


def check_range(name: str, value: float, low: float | None = None, high: float | None = None,
                low_open: bool = False) -> None:
    """A config check with an error message that names the key."""
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")


def check_choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")
