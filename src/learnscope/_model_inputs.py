"""How the NFA probe reads a model's input from a batch (probing plumbing, no Lightning).

``NeuralFeatureAnsatz`` calls the model as ``pl_module(inputs)`` on probe batches it
did not build: ``default_input_fn`` finds the inputs in the usual batch layouts and
says which ``input_fn`` to pass when it cannot.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from learnscope._probe import ProbeError

__all__ = ["LABEL_KEYS", "default_input_fn", "required_positional"]

#: Batch keys that ``default_input_fn`` treats as targets and does not pass to the model.
LABEL_KEYS = frozenset({"label", "labels", "y", "target", "targets"})


def default_input_fn(batch: Any, required: Sequence[str] = ()) -> Any:
    """The model input in a batch, as ``NeuralFeatureAnsatz`` reads it by default.

    A tensor is the input; of a tuple or list (``(x, y)``) the first element is;
    of a dict, every entry whose key is not a label key (``label(s)``, ``y``,
    ``target(s)``), passed to the model as keyword arguments. The model is then
    called as ``pl_module(x)``, ``pl_module(*x)`` for a tuple or ``pl_module(**x)``
    for a dict. Raises :class:`ProbeError` naming ``input_fn`` otherwise.

    ``required``: the names of the model forward's positional parameters without a
    default. When there are several (``forward(inputs, target)``), a tuple or list
    batch gives its first ``len(required)`` elements, positionally; a dict keeps those
    keys even when they are label keys; any other batch raises a :class:`ProbeError`
    that says which ``input_fn`` to pass.
    """
    if len(required) > 1:
        return _several_arguments(batch, list(required))
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Mapping):
        inputs = {key: value for key, value in batch.items() if key not in LABEL_KEYS}
        if inputs:
            return inputs
        raise ProbeError(
            f"NeuralFeatureAnsatz: the batch is a dict with only label keys {list(batch)}; "
            "pass input_fn=callable(batch) -> model input"
        )
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], (Tensor, Mapping, tuple, list)):
        return batch[0]
    raise ProbeError(
        f"NeuralFeatureAnsatz: cannot read the model input from a batch of type {type(batch).__name__} "
        "(the default reads a tensor, the first element of a tuple/list, or a dict's non-label entries); "
        "pass input_fn=callable(batch) -> model input"
    )


def _several_arguments(batch: Any, required: list[str]) -> Any:
    """The inputs of a forward that needs ``required`` positional arguments (see ``default_input_fn``)."""
    count = len(required)
    signature = f"forward({', '.join(required)})"
    if isinstance(batch, (tuple, list)) and len(batch) >= count:
        return tuple(batch[:count])
    if isinstance(batch, Mapping):
        if all(name in batch for name in required):
            return {key: value for key, value in batch.items() if key not in LABEL_KEYS or key in required}
        missing = [name for name in required if name not in batch]
        raise ProbeError(
            f"NeuralFeatureAnsatz: the model's {signature} needs {missing}, which the batch dict (keys "
            f"{list(batch)}) lacks; pass input_fn=lambda batch: {{...}} returning the keyword arguments"
        )
    if isinstance(batch, (tuple, list)):
        what = f"a {type(batch).__name__} of {len(batch)} elements"
        missing = required[len(batch) :]
    else:
        what = f"a single {type(batch).__name__}"
        missing = required[1:]
    advice = "(" + ", ".join(f"batch[{i}]" for i in range(count)) + ")"
    raise ProbeError(
        f"NeuralFeatureAnsatz: the model's {signature} needs {count} positional arguments but the batch is "
        f"{what}, which leaves {missing} without a value; pass input_fn=callable(batch) -> "
        f"({', '.join(required)}), e.g. input_fn=lambda batch: {advice} for a batch holding them in that order"
    )


def required_positional(model: nn.Module) -> list[str]:
    """The positional parameters of ``model.forward`` without a default (none known for ``*args``)."""
    try:
        parameters = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return []
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters):
        return []
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in parameters if p.kind in positional and p.default is inspect.Parameter.empty]
