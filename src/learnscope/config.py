"""The LossChangeAllocation callback's flags, resolved once into an immutable config.

A flag left unset (None) takes its preset's value, else its default; a flag the user
sets wins, also when it equals the default. Every value is checked here, so a bad
argument fails in the constructor with a message that names it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch.utils.data import DataLoader

from learnscope._validate import (
    check_bool,
    check_callable,
    check_choice,
    check_int,
    check_patterns,
    check_probe_options,
    check_tag_root,
)
from learnscope.functional.lca import check_max_intervals, check_relative_tolerance, check_rule, check_tolerance

__all__ = ["DEFAULTS", "PRESETS", "PROBES", "LCAConfig"]

PROBES = ("train", "val", "batch")

#: The flags' values when neither the user nor a preset sets them.
DEFAULTS: dict[str, Any] = dict(
    probe="train", probe_size=1024, rule="simpson", tolerance=1e-3, histograms=True, decompose=True
)
#: Named flag sets. ``cheap``: no extra gradient pass (the optimizer's own gradient,
#: minibatch loss, first order). ``paper``: Lan et al.'s protocol (the whole training
#: set, adaptive Simpson to 1e-3 per step).
PRESETS: dict[str, dict[str, Any]] = {
    "cheap": dict(probe="batch", rule="first_order", histograms=False, decompose=False),
    "default": dict(),
    "paper": dict(probe="train", probe_size=None, rule="adaptive", tolerance=1e-3),
}


@dataclass(frozen=True)
class LCAConfig:
    """Every flag of :class:`~learnscope.LossChangeAllocation`, resolved and checked
    (see the callback's docstring for each one's meaning)."""

    every_n_steps: int = 1
    probe: str | DataLoader = "train"
    probe_size: int | None = 1024
    probe_batch_size: int = 256
    rule: str = "simpson"
    tolerance: float = 1e-3
    max_intervals: int = 32
    relative_tolerance: float | None = None
    loss_fn: Callable[[Any, Any], Any] | None = None
    batch_size_fn: Callable[[Any], int] | None = None
    histograms: bool = True
    modules: list[str] | None = None
    decompose: bool = True
    ablation: bool = False
    unit_allocations: bool = False
    preset: str | None = None
    compile_statistics: bool | None = None
    name: str = "lca"
    parameter_counts: bool = False
    tensor_series: bool = False
    per_step_series: bool = False

    @classmethod
    def resolve(cls, **flags: Any) -> LCAConfig:
        """The config of the callback's constructor arguments: presets applied, each checked."""
        preset = flags.get("preset")
        if preset is not None:
            check_choice("preset", preset, tuple(PRESETS))
        chosen = PRESETS[preset] if preset is not None else {}
        for flag in ("probe", "rule", "tolerance", "histograms", "decompose"):
            if flags.get(flag) is None:
                flags[flag] = chosen.get(flag, DEFAULTS[flag])
        # probe_size's None already means "the whole set": there the default itself counts as unset
        if "probe_size" in chosen and flags.get("probe_size", DEFAULTS["probe_size"]) == DEFAULTS["probe_size"]:
            flags["probe_size"] = chosen["probe_size"]
        return cls(**flags)

    def __post_init__(self) -> None:
        # in the constructor's order: the first bad argument is the one named
        object.__setattr__(self, "name", check_tag_root("name", self.name))
        object.__setattr__(self, "every_n_steps", check_int("every_n_steps", self.every_n_steps, minimum=1))
        probe = check_probe_options(self.probe, self.probe_size, self.probe_batch_size, PROBES)
        for flag, value in zip(("probe", "probe_size", "probe_batch_size"), probe):
            object.__setattr__(self, flag, value)
        for flag, check in _CHECKS.items():
            object.__setattr__(self, flag, check(getattr(self, flag)))

    @property
    def quadrature(self) -> dict[str, Any]:
        """The keyword arguments of :func:`~learnscope.functional.lca.allocate_step` that
        choose and tune the rule: ``rule``, ``tolerance``, ``max_intervals``, ``relative_tolerance``."""
        return {
            "rule": self.rule,
            "tolerance": self.tolerance,
            "max_intervals": self.max_intervals,
            "relative_tolerance": self.relative_tolerance,
        }

    @property
    def cheap(self) -> bool:
        """The first-order estimate from the gradient the optimizer applied: no probe pass."""
        return self.probe == "batch" and self.rule == "first_order"

    @property
    def data(self) -> str:
        """The main estimate's loss: ``"batch"`` (the step's micro-batches) or ``"probe"`` (a fixed set)."""
        return "batch" if self.probe == "batch" else "probe"

    @property
    def needs_fixed_set(self) -> bool:
        """Whether a fixed probe set is built (the main probe, or the ablation's probe corners)."""
        return self.probe != "batch" or self.ablation


def _optional_bool(value: Any) -> bool | None:
    if value is not None:
        check_bool("compile_statistics", value, extra="or None (automatic)")
    return value


def _loss_fn(value: Any) -> Any:
    if value is not None and not callable(value):
        raise ValueError(f"loss_fn must be a callable (module, batch) -> scalar tensor or None, got {value!r}")
    return value


_CHECKS: dict[str, Callable[[Any], Any]] = {
    "rule": check_rule,
    "tolerance": check_tolerance,
    "max_intervals": check_max_intervals,
    "relative_tolerance": check_relative_tolerance,
    "loss_fn": _loss_fn,
    "batch_size_fn": lambda v: check_callable("batch_size_fn", v, "callable(batch) -> number of samples"),
    "histograms": lambda v: check_bool("histograms", v),
    "modules": lambda v: check_patterns("modules", v),
    "decompose": lambda v: check_bool("decompose", v),
    "ablation": lambda v: check_bool("ablation", v),
    "unit_allocations": lambda v: check_bool("unit_allocations", v),
    "compile_statistics": _optional_bool,
    "parameter_counts": lambda v: check_bool("parameter_counts", v),
    "tensor_series": lambda v: check_bool("tensor_series", v),
    "per_step_series": lambda v: check_bool("per_step_series", v),
}
