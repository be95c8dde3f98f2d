"""The mathematics of learnscope as plain functions on tensors and modules.

Nothing in this package imports Lightning: use it from a hand-written PyTorch loop.
"""

from learnscope.functional import nfa
from learnscope.functional.lca import (
    RULES,
    AccumulatingEvaluator,
    Evaluation,
    Evaluator,
    StepAllocation,
    allocate_step,
    first_order_step,
    gradient_evaluator,
)
from learnscope.functional.nfa import *  # noqa: F403  (exactly nfa.__all__)

__all__ = [
    "RULES",
    "AccumulatingEvaluator",
    "Evaluation",
    "Evaluator",
    "StepAllocation",
    "allocate_step",
    "first_order_step",
    "gradient_evaluator",
]
__all__ += nfa.__all__
