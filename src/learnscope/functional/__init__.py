"""The mathematics of learnscope as plain functions on tensors and modules.

Nothing in this package imports Lightning: use it from a hand-written PyTorch loop.
"""

from learnscope.functional.lca import RULES, Evaluation, StepAllocation, allocate_step, gradient_evaluator

__all__ = ["RULES", "Evaluation", "StepAllocation", "allocate_step", "gradient_evaluator"]
