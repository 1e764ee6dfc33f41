"""Training objectives, one class per method: `loss, stats = method(net, x0, labels, step)`.

`loss` is per sample (shape (B,)); `stats` maps names to detached scalar tensors. The
training loop knows nothing about which method it runs.
"""

from fewstep.methods.flow import FlowMatching
from fewstep.methods.sct import SCT

METHODS = {"flow": FlowMatching, "sct": SCT}

__all__ = ["METHODS", "FlowMatching", "SCT"]
