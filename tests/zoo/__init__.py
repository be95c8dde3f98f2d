"""Tiny, random-init, no-download versions of the models users train (the model zoo).

Each module builds one architecture; nothing here downloads data or weights. Every
model module offers ``build(stochastic=True) -> (LightningModule, train DataLoader)``
(``stochastic=False``: every dropout / drop-path rate 0), ``NFA_LAYERS`` (the layer
names NeuralFeatureAnsatz measures by default once issue 15's layer support is in)
and ``NFA_OPTIONS`` (callback arguments the model needs).
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: The zoo's models, by module name.
MODELS = ("gpt2", "bert", "demo_transformer", "vit", "resnet")
#: Those that need Hugging Face ``transformers``.
NEEDS_TRANSFORMERS = ("gpt2", "bert")


def load(name: str) -> ModuleType:
    """The zoo module of ``name`` (one of ``MODELS``)."""
    if name not in MODELS:
        raise ValueError(f"name must be one of {MODELS}, got {name!r}")
    return importlib.import_module(f".{name}", __name__)
