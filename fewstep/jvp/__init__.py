"""Forward-mode derivatives of networks (the JVPs of sCT, sCD and MeanFlow).

- `jvp(net, args, tangents, kwargs, mode)`: the output with autograd and its JVP; `JVP_MODES`.
- `tangent_rule(*ops)`: register the tangent rule of an op (yours too) with the tangent engine;
  the rule sees a `TangentContext`.
- `check_tangent(net, inputs)`: the engine against float64 finite differences, naming the first
  op that disagrees or has no rule.
- `tangent_forward`: the tangent engine itself (`fewstep.jvp.engine`); `fewstep.jvp.attention`:
  attention's tangent, with a fused Triton kernel on CUDA.
"""

from fewstep.jvp.api import JVP_MODES, forward_ad_attention, jvp
from fewstep.jvp.engine import (NoRule, NoTangentRuleError, TangentContext, check_tangent, tangent_forward,
                                tangent_rule)

__all__ = ["JVP_MODES", "NoRule", "NoTangentRuleError", "TangentContext", "check_tangent", "forward_ad_attention",
           "jvp", "tangent_forward", "tangent_rule"]
