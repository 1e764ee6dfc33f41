"""Devices and precision: one place for the `auto` device and the autocast context."""

from __future__ import annotations

import contextlib

import torch


def resolve_device(name: str | torch.device | None) -> torch.device:
    """'auto' (or None): CUDA when available, else the CPU; otherwise the named device, checked."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(name)!r} asked for, but CUDA is not available; use 'cpu' or 'auto'")
    return device


PRECISIONS = ("fp32", "bf16", "fp16")


def autocast_context(device: torch.device, precision: str):
    """Mixed precision for the forward pass: bf16 or fp16 autocast, or nothing for fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
