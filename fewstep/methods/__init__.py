"""Training objectives, one class per method: `loss, stats = method(net, x0, labels, step)`.

`loss` is per sample (shape (B,)); `stats` maps names to detached scalar tensors. The
training loop knows nothing about which method it runs: each method declares its optional
parts (teacher, after-step hook, checkpoint state, how it is sampled) through the protocol of
`fewstep.methods.base`.
"""

from fewstep.methods.base import METHODS, Method, method_config, register_method
from fewstep.methods.cm import CD, CT, ICT, make_teacher_denoiser
from fewstep.methods.dmd2 import DMD2, RCM
from fewstep.methods.ect import ECT
from fewstep.methods.edm import EDMDiffusion
from fewstep.methods.flow import FlowMatching
from fewstep.methods.meanflow import MeanFlow
from fewstep.methods.pd import ProgressiveDistillation
from fewstep.methods.scd import SCD, make_teacher_velocity
from fewstep.methods.sct import SCT

__all__ = ["CD", "CT", "DMD2", "ECT", "ICT", "METHODS", "EDMDiffusion", "FlowMatching", "MeanFlow", "Method",
           "ProgressiveDistillation", "RCM", "SCD", "SCT", "make_teacher_denoiser", "make_teacher_velocity", "method_config",
           "register_method"]
