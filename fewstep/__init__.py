"""fewstep: consistency models in PyTorch, for one- and few-step generation.

    from fewstep import fit            # the training loop over your own objects
    from fewstep import build, train   # the same from a config (what `fewstep train` runs)
    from fewstep.jvp import jvp, tangent_rule  # exact JVPs of any network, and rules for your own ops
"""

__version__ = "0.3.0"

_LAZY = {"fit": "fewstep.training.fit", "Callback": "fewstep.training.callbacks", "build": "fewstep.training.build",
         "train": "fewstep.apps.train"}


def __getattr__(name):  # keep `import fewstep` light: torch loads on first use
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fewstep' has no attribute {name!r}")


__all__ = ["Callback", "build", "fit", "train"]
