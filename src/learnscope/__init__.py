"""learnscope: see which parameters helped the loss, and whether each layer's
weights line up with the gradient geometry (Neural Feature Ansatz).

The callbacks are imported lazily, so ``learnscope report`` starts without
importing Lightning.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0.dev0"

__all__ = ["LCAConfig", "LossChangeAllocation", "NeuralFeatureAnsatz", "NonFiniteProbe", "ProbeError", "__version__"]

_CALLBACKS = {
    "LossChangeAllocation": "learnscope.callbacks.lca",
    "NeuralFeatureAnsatz": "learnscope.callbacks.nfa",
    "LCAConfig": "learnscope.config",
    "ProbeError": "learnscope._probe",
    "NonFiniteProbe": "learnscope._probe",
}


def __getattr__(name: str) -> Any:
    if name in _CALLBACKS:
        import importlib

        return getattr(importlib.import_module(_CALLBACKS[name]), name)
    raise AttributeError(f"module 'learnscope' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
