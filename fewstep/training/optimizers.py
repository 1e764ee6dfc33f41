"""The optimizers a run chooses from (`optim.name`): one mapping for the main network (`build`) and
for the networks a method trains beside it (`fewstep.training.auxiliary`)."""

from __future__ import annotations

import torch

OPTIMIZERS = {"adam": torch.optim.Adam, "radam": torch.optim.RAdam}


def new_optimizer(name: str, params, lr: float, betas, weight_decay: float = 0.0,
                  eps: float = 1e-8) -> torch.optim.Optimizer:
    return OPTIMIZERS[name](params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)


def optimizer_name(optimizer: torch.optim.Optimizer) -> str:
    """`optimizer`'s name in OPTIMIZERS; "adam" for another class (a Python user's own choice)."""
    return next((name for name, cls in OPTIMIZERS.items() if type(optimizer) is cls), "adam")
