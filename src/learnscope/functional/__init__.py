"""The mathematics of learnscope as plain functions on tensors and modules.

Nothing in this package imports Lightning: use it from a hand-written PyTorch loop.
"""

from learnscope.functional import nfa
from learnscope.functional.lca import (
    RULES,
    Evaluation,
    StepAllocation,
    allocate_step,
    gradient_evaluator,
)
from learnscope.functional.nfa import *  # exactly nfa.__all__

__all__ = ["RULES", "Evaluation", "StepAllocation", "allocate_step", "gradient_evaluator"]
__all__ += nfa.__all__
