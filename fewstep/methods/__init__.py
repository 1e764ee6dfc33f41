"""Training objectives, one class per method: `loss, stats = method(net, x0, labels, step)`.

`loss` is per sample (shape (B,)); `stats` maps names to detached scalar tensors. The
training loop knows nothing about which method it runs.
"""

from fewstep.methods.cm import CD, CT, ICT, make_teacher_denoiser
from fewstep.methods.edm import EDMDiffusion
from fewstep.methods.flow import FlowMatching
from fewstep.methods.pd import ProgressiveDistillation
from fewstep.methods.scd import SCD, make_teacher_velocity
from fewstep.methods.sct import SCT

METHODS = {"flow": FlowMatching, "edm": EDMDiffusion, "sct": SCT, "scd": SCD, "cd": CD, "ct": CT, "ict": ICT,
           "pd": ProgressiveDistillation}

__all__ = ["CD", "CT", "ICT", "METHODS", "EDMDiffusion", "FlowMatching", "ProgressiveDistillation", "SCD", "SCT",
           "make_teacher_denoiser", "make_teacher_velocity"]
