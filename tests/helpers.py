"""Helpers shared by the test files."""

import torch


def randomize_zero_params_(net: torch.nn.Module, scale: float = 0.3, seed: int = 0) -> torch.nn.Module:
    """Re-draw every all-zero parameter (zero-initialised output layers, the adaptive-weight
    head) so that no part of the network is trivially zero and no math test is vacuous."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)
    return net
