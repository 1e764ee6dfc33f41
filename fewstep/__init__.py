"""fewstep: consistency models in PyTorch, for one- and few-step generation."""

__version__ = "0.1.0"
