"""Which learnscope tags a run holds, sorted by what the tab draws.

A run's learnscope callbacks are found by their tag roots
(:func:`learnscope.contract.callback_roots`, as the offline report does): the first
LossChangeAllocation root and the first NeuralFeatureAnsatz root form the run's main
section; every further root (``LossChangeAllocation(name="lca_val")``) is a section of
its own. Tags are parsed with :func:`learnscope.contract.parse_tag` under those roots.
Standard library and the contract only.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

from learnscope import contract

__all__ = ["HEALTH_METRICS", "NFA_SERIES", "RunIndex", "index_tags", "run_sections", "section_roots"]

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


def _default_roots() -> dict[str, str | None]:
    return {root: writer for writer, root in contract.DEFAULT_ROOTS.items()}


@dataclass
class RunIndex:
    """The learnscope tags of one section of a run (one or two callbacks' roots):
    ``{module: tag}`` per LCA series, and so on."""

    roots: dict[str, str | None] = field(default_factory=_default_roots)  #: root → writer

    lca: dict[str, dict[str, str]] = field(default_factory=dict)  #: series → module → tag
    parts: dict[str, dict[str, str]] = field(default_factory=dict)  #: module → part → cumulative tag
    health: dict[str, str] = field(default_factory=dict)  #: run metric → tag
    nfa: dict[str, dict[str, str]] = field(default_factory=dict)  #: layer → metric → tag
    images: dict[str, str] = field(default_factory=dict)  #: layer → matrices tag
    units: dict[str, tuple[str, str]] = field(default_factory=dict)  #: module → (plugin, tensor tag)
    window_steps: str | None = None  #: the ``{root}/window_steps`` tag (absent: per-step series)
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
        match = contract.parse_tag(tag, self.roots)
        if match is None:
            return
        name, fields = match.family.name, match.fields
        if name in _LAYER_FAMILIES:
            self.lca.setdefault(_LAYER_FAMILIES[name], {})[fields["module"]] = tag
        elif name == "lca_layer_part_cumulative":
            self.parts.setdefault(fields["module"], {})[fields["part"]] = tag
        elif match.family.writer == "lca" and match.family.run_metric in HEALTH_METRICS:
            self.health[match.leaf] = tag
        elif name == "lca_window_steps":
            self.window_steps = tag
        elif name in NFA_SERIES:
            self.nfa.setdefault(fields["layer"], {})[match.leaf] = tag

    def add_image(self, tag: str) -> None:
        match = contract.parse_tag(tag, self.roots)
        if match is not None and match.family.name == "nfa_matrices":
            self.images[match.fields["layer"]] = tag

    def add_tensor(self, plugin: str, tag: str) -> None:
        match = contract.parse_tag(tag, self.roots)
        if match is not None and match.family.name == "lca_unit":
            self.units[match.fields["module"]] = (plugin, tag)

    @property
    def empty(self) -> bool:
        return not (self.lca or self.nfa or self.images or self.units)


def index_tags(
    scalars: Iterable[str],
    images: Iterable[str] = (),
    tensors: Iterable[tuple[str, str]] = (),
    roots: Mapping[str, str | None] | None = None,
) -> RunIndex:
    """The :class:`RunIndex` of a run's scalar tags, image tags and ``(plugin, tag)`` tensors
    under ``roots`` (``{root: writer}``; default :data:`learnscope.contract.DEFAULT_ROOTS`)."""
    index = RunIndex() if roots is None else RunIndex(roots=dict(roots))
    for tag in scalars:
        index.add_scalar(tag)
    for tag in images:
        index.add_image(tag)
    for plugin, tag in tensors:
        index.add_tensor(plugin, tag)
    return index


def section_roots(scalars: Collection[str]) -> dict[str, dict[str, str | None]]:
    """A run's sections: ``{key: {root: writer}}``, the main section first (its key the
    first of its roots), then one per further callback root (its key that root).

    The main section reads the first LCA and the first NFA root; a default root that no
    callback of its kind owns is read too (a run with only ``lca/layer/...`` tags is an
    LCA run), one beside another root of its kind is not (None), as in the report."""
    lca, nfa = contract.callback_roots(scalars)
    main = contract.main_section_roots(lca, nfa)
    key = (lca[:1] or nfa[:1] or ["lca"])[0]
    sections: dict[str, dict[str, str | None]] = {key: main}
    sections.update({root: {root: "lca"} for root in lca[1:]})
    sections.update({root: {root: "nfa"} for root in nfa[1:]})
    return sections


def run_sections(
    scalars: Collection[str], images: Iterable[str] = (), tensors: Iterable[tuple[str, str]] = ()
) -> dict[str, RunIndex]:
    """``{key: RunIndex}`` of each section of a run (:func:`section_roots`) that holds tags."""
    images, tensors = list(images), list(tensors)
    out = {}
    for key, roots in section_roots(scalars).items():
        index = index_tags(scalars, images, tensors, roots)
        if not index.empty:
            out[key] = index
    return out
