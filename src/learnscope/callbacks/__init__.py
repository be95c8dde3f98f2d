"""The Lightning callbacks (thin: when and on what to measure; math in learnscope.functional)."""

from learnscope.callbacks.lca import LossChangeAllocation
from learnscope.callbacks.nfa import NeuralFeatureAnsatz

__all__ = ["LossChangeAllocation", "NeuralFeatureAnsatz"]
