"""learnscope: see which parameters helped the loss, and whether each layer's
weights line up with the gradient geometry (Neural Feature Ansatz)."""

from learnscope.callbacks.lca import LossChangeAllocation

__version__ = "0.1.0.dev0"

__all__ = ["LossChangeAllocation", "__version__"]
