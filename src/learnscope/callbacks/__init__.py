from learnscope.callbacks.lca import LossChangeAllocation

__all__ = ["LossChangeAllocation"]
