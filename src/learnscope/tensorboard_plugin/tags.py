"""Which learnscope tags a run holds, sorted by what the tab draws.

The tags are parsed with :func:`learnscope.contract.parse_tag` (default roots ``lca``
and ``nfa``). Standard library and the contract only.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from learnscope import contract

__all__ = ["HEALTH_METRICS", "NFA_SERIES", "RunIndex", "index_tags"]

#: the run-level LCA scalars the health banner reads
HEALTH_METRICS: tuple[str, ...] = (
    "cumulative_relative_error",
    "capped_steps",
    "skipped_steps",
    "probe_stochastic",
    "total",
)
#: the per-layer NFA families the tab draws (Pearson, its rotation null, the null's SE, the excess)
NFA_SERIES: tuple[str, ...] = ("nfa_pearson", "nfa_null", "nfa_null_se", "nfa_excess")
_LAYER_FAMILIES = {
    "lca_layer": "per_step",
    "lca_layer_cumulative": "cumulative",
    "lca_layer_helped": "helped",
}
# Per-unit allocations as one 1-D tensor per module and step (issue #17); matched here
# as long as the contract still declares the older one-scalar-per-unit family.
_UNIT_TENSOR = re.compile(r"^lca/unit/(?P<module>[^/]+)$")


@dataclass
class RunIndex:
    """The learnscope tags of one run: ``{module: tag}`` per LCA series, and so on."""

    lca: dict[str, dict[str, str]] = field(default_factory=dict)  #: series → module → tag
    parts: dict[str, dict[str, str]] = field(default_factory=dict)  #: module → part → cumulative tag
    health: dict[str, str] = field(default_factory=dict)  #: run metric → tag
    nfa: dict[str, dict[str, str]] = field(default_factory=dict)  #: layer → metric → tag
    images: dict[str, str] = field(default_factory=dict)  #: layer → matrices tag
    units: dict[str, tuple[str, str]] = field(default_factory=dict)  #: module → (plugin, tensor tag)
    max_step: int = -1  #: the last step of any learnscope scalar TensorBoard has loaded

    @property
    def lca_modules(self) -> list[str]:
        """Every module with an LCA series, in first-seen order."""
        seen: dict[str, None] = {}
        for series in self.lca.values():
            seen.update(dict.fromkeys(series))
        return list(seen)

    @property
    def nfa_layers(self) -> list[str]:
        return list(dict.fromkeys([*self.nfa, *self.images]))

    def add_scalar(self, tag: str) -> None:
        match = contract.parse_tag(tag)
        if match is None:
            return
        name, fields = match.family.name, match.fields
        if name in _LAYER_FAMILIES:
            self.lca.setdefault(_LAYER_FAMILIES[name], {})[fields["module"]] = tag
        elif name == "lca_layer_part_cumulative":
            self.parts.setdefault(fields["module"], {})[fields["part"]] = tag
        elif match.family.writer == "lca" and match.family.run_metric in HEALTH_METRICS:
            self.health[match.leaf] = tag
        elif name in NFA_SERIES:
            self.nfa.setdefault(fields["layer"], {})[match.leaf] = tag

    def add_image(self, tag: str) -> None:
        match = contract.parse_tag(tag)
        if match is not None and match.family.name == "nfa_matrices":
            self.images[match.fields["layer"]] = tag

    def add_tensor(self, plugin: str, tag: str) -> None:
        match = contract.parse_tag(tag)
        if match is not None and match.family.kind == "tensor" and "module" in match.fields:
            self.units[match.fields["module"]] = (plugin, tag)
            return
        found = _UNIT_TENSOR.match(tag) if match is None else None
        if found is not None:
            self.units[found["module"]] = (plugin, tag)

    @property
    def empty(self) -> bool:
        return not (self.lca or self.nfa or self.images or self.units)


def index_tags(scalars: Iterable[str], images: Iterable[str] = (), tensors: Iterable[tuple[str, str]] = ()) -> RunIndex:
    """The :class:`RunIndex` of a run's scalar tags, image tags and ``(plugin, tag)`` tensors."""
    index = RunIndex()
    for tag in scalars:
        index.add_scalar(tag)
    for tag in images:
        index.add_image(tag)
    for plugin, tag in tensors:
        index.add_tensor(plugin, tag)
    return index
