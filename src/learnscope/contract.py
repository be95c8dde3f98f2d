"""The tag contract: every TensorBoard tag learnscope writes, declared once.

A *family* is one kind of tag: its template (``{root}/layer/{module}``), what kind
of summary it is (scalar, histogram, image or tensor), the unit of its values, one
sentence of meaning, and which callback writes it. The writers
(:mod:`learnscope.tags`), the custom-scalar layout (:mod:`learnscope.tensorboard_layout`),
the offline report (:mod:`learnscope.report`) and the README's tag table all derive
from :data:`FAMILIES`; a test fails when a callback writes a tag not declared here.

``{root}`` is the writing callback's ``name=`` (``lca`` and ``nfa`` by default), so
several callbacks of one kind can log into one run. Every other placeholder is one
``/``-free field (:data:`PLACEHOLDERS`); the closed ones (``part``, ``data``,
``rule``) list their values, so a tag parses back to exactly one family.

This module imports the standard library only (no torch, no TensorBoard, no NumPy):
the report and other tools read it without the training stack.

Run ``python -m learnscope.contract`` to print the Markdown tables of the README.

**Windowed series.** Every measured step enters the run-level scalars (one value per
measured step) and the cumulative values. The per-layer *step* series (per module, per
part and module, per parameter tensor, per unit) are by default written once per logging
window of ``trainer.log_every_n_steps`` steps (windows ``[w·N, (w+1)·N)`` of
``global_step``; a window also ends at each checkpoint, so that a resumed run counts
every step once, and at the end of the fit), at the window's
last measured step: sums are the window's sum over its measured steps, fractions and
skewness are pooled over the window's parameters × steps, cumulative values are the
running totals at that step, and ``{root}/window_steps`` says how many measured steps
each point holds. ``per_step_series=True`` writes every measured step instead.

>>> family("lca_layer").format("lca", module="net.0")
'lca/layer/net.0'
>>> match = parse_tag("lca_val/ablation/probe_simpson/part/momentum", {"lca_val": "lca"})
>>> match.family.name, match.fields
('lca_ablation_part', {'data': 'probe', 'rule': 'simpson', 'part': 'momentum'})
"""

from __future__ import annotations

import functools
import re
import string
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "DATA",
    "DEFAULT_ROOTS",
    "FAMILIES",
    "KINDS",
    "LCA_RUN_METRICS",
    "NFA_RUN_METRICS",
    "PARTS",
    "PLACEHOLDERS",
    "RULES",
    "TENSOR_PLUGIN",
    "WRITERS",
    "Placeholder",
    "TagFamily",
    "TagMatch",
    "ablation_corner",
    "callback_roots",
    "families",
    "family",
    "main_section_roots",
    "markdown_table",
    "nfa_metric",
    "nfa_metric_names",
    "parse_tag",
]

Kind = Literal["scalar", "histogram", "image", "tensor"]
Writer = Literal["lca", "nfa"]

KINDS: tuple[str, ...] = ("scalar", "histogram", "image", "tensor")
#: the callbacks that write tags, by the short name a family records
WRITERS: dict[str, str] = {"lca": "LossChangeAllocation", "nfa": "NeuralFeatureAnsatz"}
#: each writer's default ``name=`` (its tag root)
DEFAULT_ROOTS: dict[str, str] = {"lca": "lca", "nfa": "nfa"}

# Literal copies (functional/ imports torch); tests check them against
# learnscope.functional.lca.RULES and learnscope.functional.decompose.PARTS.
RULES: tuple[str, ...] = ("first_order", "trapezoid", "simpson", "adaptive")
PARTS: tuple[str, ...] = ("gradient", "momentum", "weight_decay", "residual")
DATA: tuple[str, ...] = ("batch", "probe")


@dataclass(frozen=True)
class Placeholder:
    """One ``{field}`` of a template: a ``/``-free piece of the tag."""

    name: str
    meaning: str
    pattern: str  #: regex of one value, without capturing groups
    values: tuple[str, ...] | None = None  #: the closed set of values, or None (open)
    spec: str = ""  #: format spec of a value (``g`` for α: 0.5 → ``0.5``, 1.0 → ``1``)

    def text(self, value: object) -> str:
        """``value`` as it appears in a tag; ValueError when it is not allowed."""
        text = value if isinstance(value, str) else format(value, self.spec)
        allowed = text in self.values if self.values is not None else re.fullmatch(self.pattern, text)
        if not allowed:
            expected = f"one of {self.values}" if self.values is not None else self.meaning
            raise ValueError(f"{self.name} must be {expected}, got {value!r}")
        return text

    @property
    def regex(self) -> str:
        if self.values is not None:
            return "(?:" + "|".join(re.escape(v) for v in self.values) + ")"
        return self.pattern


_FIELD = "[^/]+"
PLACEHOLDERS: dict[str, Placeholder] = {
    p.name: p
    for p in (
        Placeholder("root", "the callback's name= (lca, nfa by default)", r"[A-Za-z0-9_.\-]+"),
        Placeholder("module", "a module's qualified name, such as net.0 (never contains /)", _FIELD),
        Placeholder("layer", "a measured layer's name, such as net.0 or attn.q (never contains /)", _FIELD),
        Placeholder("part", "a part of the optimizer's update", _FIELD, PARTS),
        Placeholder("data", "the loss: the minibatch (batch) or the fixed probe set (probe)", _FIELD, DATA),
        Placeholder("rule", "the quadrature rule", _FIELD, RULES),
        Placeholder(
            "tensor",
            "a parameter's name within its module: weight, bias, in_proj_weight, ... (BatchNorm's γ and β are weight "
            "and bias; a parameter of the top module itself is listed under the module root)",
            _FIELD,
        ),
        Placeholder(
            "alpha", "an exponent α of AGOP^α, as Python's :g writes it", r"\d+(?:\.\d+)?(?:e[-+]\d+)?", spec="g"
        ),
    )
}


@dataclass(frozen=True, eq=False)  # one object per family: hashed and compared by identity
class TagFamily:
    """One family of tags.

    Attributes:
        name: its identifier (``lca_layer``).
        template: the tag with ``{placeholder}`` fields; starts with ``{root}/``.
        kind: scalar, histogram, image or tensor.
        unit: the unit of its values.
        meaning: one sentence for a user.
        writer: the callback that writes it (``lca`` or ``nfa``, see :data:`WRITERS`).
    """

    name: str
    template: str
    kind: Kind
    unit: str
    meaning: str
    writer: Writer
    _fields: tuple[str, ...] = field(init=False, repr=False, compare=False)
    _field_set: frozenset[str] = field(init=False, repr=False, compare=False)
    _pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        fields = tuple(f for _, f, _, _ in string.Formatter().parse(self.template) if f)
        if fields[:1] != ("root",) or not self.template.startswith("{root}/"):
            raise ValueError(f"family {self.name!r}: the template must start with '{{root}}/', got {self.template!r}")
        if self.kind not in KINDS or self.writer not in WRITERS:
            raise ValueError(f"family {self.name!r}: kind must be one of {KINDS}, writer one of {tuple(WRITERS)}")
        object.__setattr__(self, "_fields", fields[1:])
        object.__setattr__(self, "_field_set", frozenset(fields[1:]))
        rest = self.template[len("{root}/") :]
        object.__setattr__(self, "_pattern", re.compile(_regex(rest, {}, named=True)))

    @property
    def fields(self) -> tuple[str, ...]:
        """The placeholders after the root, in template order."""
        return self._fields

    @property
    def run_metric(self) -> str | None:
        """The metric's name when the family is one run-level tag (``{root}/total`` → ``total``)."""
        return None if self._fields else self.template[len("{root}/") :]

    def format(self, root: str | None = None, **fields: object) -> str:
        """The tag for ``root`` (default: the writer's default root) and ``fields``.

        Raises:
            ValueError: a field is missing, unknown, or not an allowed value.
        """
        if fields.keys() != self._field_set:
            raise ValueError(f"{self.name} takes the fields {self._fields}, got {tuple(fields)}")
        return _formatted(self, root, tuple(fields.items()))

    def bind(self, root: str | None = None, **fixed: object) -> str:
        """The template with ``root`` and the ``fixed`` fields filled in (checked), the
        other fields left as ``{name}`` for ``str.format``: the fast way to format many
        tags of one family in a loop (``bind("lca").format(module=m)``), which checks
        no further values.

        >>> family("lca_layer_part").bind("lca", part="momentum")
        'lca/part/momentum/{module}'
        """
        unknown = fixed.keys() - self._field_set
        if unknown:
            raise ValueError(f"{self.name} has no field {sorted(unknown)}; its fields are {self._fields}")
        return _bound(self, root, tuple(fixed.items()))

    def _root(self, root: str | None) -> str:
        return PLACEHOLDERS["root"].text(DEFAULT_ROOTS[self.writer] if root is None else root)

    def leaf(self, **fields: object) -> str:
        """The tag's last ``/`` field for ``fields`` (an NFA metric's name: ``pearson_a0.5``)."""
        last = self.template.rsplit("/", 1)[1]
        names = [f for _, f, _, _ in string.Formatter().parse(last) if f]
        return last.format(**{name: PLACEHOLDERS[name].text(fields[name]) for name in names})

    def regex(self, root: str | None = None, **fixed: object) -> str:
        """An anchored regular expression (``^...$``) of this family's tags under
        ``root``, with the ``fixed`` fields set and every other field free (for the
        custom-scalar layout, which matches tags with ``re.match``)."""
        unknown = fixed.keys() - self._field_set
        if unknown:
            raise ValueError(f"{self.name} has no field {sorted(unknown)}; its fields are {self._fields}")
        texts = {name: PLACEHOLDERS[name].text(value) for name, value in fixed.items()}
        texts["root"] = self._root(root)
        return "^" + _regex(self.template, texts, named=False) + "$"

    def match(self, tag: str, root: str) -> dict[str, str] | None:
        """The fields of ``tag`` when it is this family's tag under ``root``, else None."""
        if not tag.startswith(root + "/"):
            return None
        found = self._pattern.fullmatch(tag, len(root) + 1)
        return None if found is None else found.groupdict()

    def display(self) -> str:
        """The template as the README writes it: ``lca/layer/<module>``."""
        return self.template.replace("{root}", DEFAULT_ROOTS[self.writer]).replace("{", "<").replace("}", ">")


# The writers format the same tags every step: remember them (the values are checked once).
@functools.lru_cache(maxsize=16384, typed=True)
def _formatted(family: TagFamily, root: str | None, fields: tuple[tuple[str, object], ...]) -> str:
    texts = {name: PLACEHOLDERS[name].text(value) for name, value in fields}
    return family.template.format(root=family._root(root), **texts)


@functools.lru_cache(maxsize=4096, typed=True)
def _bound(family: TagFamily, root: str | None, fixed: tuple[tuple[str, object], ...]) -> str:
    texts = {name: "{" + name + "}" for name in family.fields}
    for name, value in fixed:  # braces escaped: the result is formatted again
        texts[name] = PLACEHOLDERS[name].text(value).replace("{", "{{").replace("}", "}}")
    return family.template.format(root=family._root(root), **texts)


def _regex(template: str, fixed: Mapping[str, str], *, named: bool) -> str:
    """``template`` as a regex: literals escaped, ``fixed`` fields as their text, the
    others as their placeholder's pattern (a named group when ``named``)."""
    pieces = []
    for literal, name, _, _ in string.Formatter().parse(template):
        pieces.append(re.escape(literal))
        if name is None:
            continue
        if name in fixed:
            pieces.append(re.escape(fixed[name]))
        else:
            regex = PLACEHOLDERS[name].regex
            pieces.append(f"(?P<{name}>{regex})" if named else regex)
    return "".join(pieces)


def _lca(name: str, template: str, unit: str, meaning: str, kind: Kind = "scalar") -> TagFamily:
    return TagFamily(name, template, kind, unit, meaning, "lca")


def _nfa(name: str, template: str, unit: str, meaning: str, kind: Kind = "scalar") -> TagFamily:
    return TagFamily(name, template, kind, unit, meaning, "nfa")


LOSS = "loss"
FRACTION = "fraction of parameters"
FRACTION_OF_STEPS = "fraction of measured steps"
COUNT = "count"
FLAG = "0 or 1"
RATIO = "ratio"
CORRELATION = "correlation"
# What a point of a windowed per-layer series means (see the module docstring).
WINDOW_SUM = " Windowed: summed over the measured steps of the logging window ending at this step."
WINDOW_POOLED = " Windowed: over the parameters × measured steps of the logging window ending at this step."
WINDOW_END = " Windowed: written at the last measured step of each logging window."
#: ``SummaryMetadata.plugin_data.plugin_name`` of learnscope's tensor summaries (``lca/unit/<module>``)
TENSOR_PLUGIN = "learnscope"

#: Every family, in the order of the README's table. The step of every value is
#: ``trainer.global_step`` of the measured step (LCA) or of the measurement (NFA).
FAMILIES: tuple[TagFamily, ...] = (
    # LCA, run level (one value per measured step); the order is LcaRecords'
    _lca("lca_total", "{root}/total", LOSS,
         "Σᵢ Aᵢ over every parameter: the allocated loss change of the step (negative = the step lowered the loss)."),
    _lca("lca_delta_loss", "{root}/delta_loss", LOSS,
         "The actual loss change L(θ_{t+1}) − L(θ_t) of the step (not written by the cheap mode)."),
    _lca("lca_abs_error", "{root}/abs_error", LOSS,
         "|ΔL − Σᵢ Aᵢ|: the quadrature error of the step (not written by the cheap mode)."),
    _lca("lca_splits", "{root}/splits", COUNT, "Sub-intervals the quadrature rule used on the step."),
    _lca("lca_helped_fraction", "{root}/helped_fraction", FRACTION, "Fraction of all parameters with A < 0 (helped)."),
    _lca("lca_hurt_fraction", "{root}/hurt_fraction", FRACTION, "Fraction of all parameters with A > 0 (hurt)."),
    _lca("lca_helped_fraction_nonzero", "{root}/helped_fraction_nonzero", FRACTION,
         "Fraction of the parameters with A ≠ 0 that helped (A < 0)."),
    _lca("lca_excess_kurtosis", "{root}/excess_kurtosis", RATIO,
         "Excess kurtosis m₄/m₂² − 3 of the step's allocations over every parameter (per step; the report averages "
         "it over steps; 0 for a normal distribution)."),
    _lca("lca_excess_kurtosis_nonzero", "{root}/excess_kurtosis_nonzero", RATIO,
         "Excess kurtosis of the allocations over the parameters with A ≠ 0."),
    _lca("lca_skewness", "{root}/skewness", RATIO,
         "Skewness m₃/m₂^{3/2} of the step's allocations over every parameter (per step; negative: a long tail of "
         "parameters that helped)."),
    _lca("lca_excess_kurtosis_pooled", "{root}/excess_kurtosis_pooled", RATIO,
         "Excess kurtosis m₄/m₂² − 3 of every allocation of every measured step so far, pooled (run level, "
         "cumulative)."),
    _lca("lca_skewness_pooled", "{root}/skewness_pooled", RATIO,
         "Skewness m₃/m₂^{3/2} of every allocation of every measured step so far, pooled (run level, cumulative)."),
    _lca("lca_cumulative_relative_error", "{root}/cumulative_relative_error", RATIO,
         "|Σ_t Σᵢ Aᵢ − Σ_t ΔL| / |Σ_t ΔL| over the measured steps so far (not written by the cheap mode)."),
    _lca("lca_skipped_steps", "{root}/skipped_steps", COUNT,
         "Steps so far that were not measured (non-finite values, or an update the optimizer skipped)."),
    _lca("lca_probe_stochastic", "{root}/probe_stochastic", FLAG,
         "1 when the self-check found that the probe loss draws random numbers in eval mode (first measured step)."),
    _lca("lca_capped_steps", "{root}/capped_steps", COUNT,
         "Steps so far that rule=\"adaptive\" accepted at max_intervals with their error above the target."),
    _lca("lca_window_steps", "{root}/window_steps", COUNT,
         "Measured steps summed into the per-layer series' point at this step (the logging window's; not written "
         "with per_step_series=True, where every point is one step)."),
    # LCA, per module
    _lca("lca_layer", "{root}/layer/{module}", LOSS, "Σᵢ Aᵢ over the module's parameters on the step." + WINDOW_SUM),
    _lca("lca_layer_cumulative", "{root}/layer_cumulative/{module}", LOSS,
         "The module's allocation summed over the measured steps so far." + WINDOW_END),
    _lca("lca_layer_helped", "{root}/helped_fraction/{module}", FRACTION,
         "Fraction of the module's parameters with A < 0 (helped)." + WINDOW_POOLED),
    _lca("lca_layer_hurt", "{root}/hurt_fraction/{module}", FRACTION,
         "Fraction of the module's parameters with A > 0 (hurt)." + WINDOW_POOLED),
    _lca("lca_hist", "{root}/hist/{module}", LOSS,
         "Histogram of the module's per-parameter allocations Aᵢ (under ModelParallelStrategy: rank 0's shard of "
         "them).", "histogram"),
    _lca("lca_layer_skewness", "{root}/skewness/{module}", RATIO,
         "Skewness m₃/m₂^{3/2} of the module's allocations on the step." + WINDOW_POOLED),
    # LCA, per parameter tensor (tensor_series=True)
    _lca("lca_tensor", "{root}/tensor/{module}/{tensor}", LOSS,
         "Σᵢ Aᵢ over one parameter tensor of the module (weight, bias, ...) on the step; the module's tensors sum to "
         "its layer value." + WINDOW_SUM),
    _lca("lca_tensor_cumulative", "{root}/tensor_cumulative/{module}/{tensor}", LOSS,
         "The parameter tensor's allocation summed over the measured steps so far." + WINDOW_END),
    # LCA, per parameter over training (parameter_counts=True), at the histogram cadence
    _lca("lca_param_helped", "{root}/param_helped_fraction", FRACTION_OF_STEPS,
         "Histogram over every parameter of the fraction of the measured steps so far on which it helped (A < 0).",
         "histogram"),
    _lca("lca_layer_param_helped", "{root}/param_helped_fraction/{module}", FRACTION_OF_STEPS,
         "The same over the module's parameters.", "histogram"),
    # LCA, optimizer parts (decompose=True)
    _lca("lca_part", "{root}/part/{part}", LOSS, "The step's allocation due to one part of the update, all modules."),
    _lca("lca_layer_part", "{root}/part/{part}/{module}", LOSS, "The same for one module." + WINDOW_SUM),
    _lca("lca_part_cumulative", "{root}/part_cumulative/{part}", LOSS,
         "One part's allocation summed over the measured steps so far, all modules."),
    _lca("lca_layer_part_cumulative", "{root}/part_cumulative/{part}/{module}", LOSS,
         "The same for one module." + WINDOW_END),
    # LCA, the three-factor ablation (ablation=True)
    _lca("lca_ablation_helped", "{root}/ablation/{data}_{rule}/helped_fraction", FRACTION,
         "Helped fraction of every parameter with the allocation of the data × rule corner."),
    _lca("lca_ablation_part", "{root}/ablation/{data}_{rule}/part/{part}", LOSS,
         "One part's allocation in the data × rule corner."),
    # LCA, per output unit (unit_allocations=True)
    _lca("lca_unit", "{root}/unit/{module}", LOSS,
         "A 1-D float32 tensor [units]: the allocation of each output unit of the module (its weights summed over "
         "inputs, plus its bias) on the step, one tensor summary per layer (plugin_name learnscope)." + WINDOW_SUM,
         "tensor"),
    # NFA, run level
    _nfa("nfa_skipped", "{root}/skipped", COUNT, "Measurements so far skipped for non-finite weights or G."),
    _nfa("nfa_probe_stochastic", "{root}/probe_stochastic", FLAG,
         "1 when the self-check found that the probe forward draws random numbers in eval mode (first measurement)."),
    # NFA, per layer; the order is the metrics' order in the layout
    _nfa("nfa_pearson", "{root}/{layer}/pearson_a{alpha}", CORRELATION,
         "Pearson correlation of the flattened WᵀW and AGOP^α: the headline alignment."),
    _nfa("nfa_cosine", "{root}/{layer}/cosine_a{alpha}", CORRELATION, "Cosine similarity of WᵀW and AGOP^α."),
    _nfa("nfa_null", "{root}/{layer}/null_a{alpha}", CORRELATION,
         "pearson_a<alpha> with G randomly rotated (mean over the null's draws): the alignment a G with the same spectrum "
         "gets for free."),
    _nfa("nfa_null_se", "{root}/{layer}/null_se_a{alpha}", CORRELATION,
         "Standard error of null (and of excess): the draws' sample standard deviation / √(number of draws) "
         "(≥ 2 draws)."),
    _nfa("nfa_null_draws", "{root}/{layer}/null_draws", COUNT,
         "Haar draws the null used: null_draws, or with null_draws=\"auto\" the draws (4 to 64) taken until "
         "every null_se, with the 90 % upper bound of the draws' std, is ≤ 0.01."),
    _nfa("nfa_excess", "{root}/{layer}/excess_a{alpha}", CORRELATION,
         "pearson − null: the alignment beyond chance, the number to read."),
    _nfa("nfa_sphericity", "{root}/{layer}/sphericity", RATIO, "ψ(G) = tr(G)²/(k·tr(G²)) ∈ [1/k, 1]; 1 when G ∝ I."),
    _nfa("nfa_sphericity_range", "{root}/{layer}/sphericity_range", RATIO,
         "ψ(UᵀGU): the sphericity of G on range(W) (the α = 1 condition)."),
    _nfa("nfa_align", "{root}/{layer}/align_a{alpha}", CORRELATION,
         "Cosine of UᵀGU with S^{2(1/α−1)}: the NFA-α condition on range(W) (α ≠ 1 only)."),
    _nfa("nfa_stable_rank", "{root}/{layer}/stable_rank", RATIO, "‖W‖_F² / ‖W‖_2²."),
    _nfa("nfa_weight_change", "{root}/{layer}/weight_change", RATIO, "‖W − W₀‖_F / ‖W‖_F since the start of training."),
    _nfa("nfa_cnfa_pearson", "{root}/{layer}/cnfa_pearson_a1", CORRELATION,
         "pearson_a1 with W − W₀ in place of W (the centred NFA)."),
    _nfa("nfa_spectrum", "{root}/{layer}/spectrum", "eigenvalue", "Eigenvalues of G compressed to range(W).",
         "histogram"),
    _nfa("nfa_matrices", "{root}/{layer}/matrices", "heatmap", "Heatmaps of WᵀW beside AGOP^α (d ≤ 256).", "image"),
)  # fmt: skip

_BY_NAME: dict[str, TagFamily] = {f.name: f for f in FAMILIES}
if len(_BY_NAME) != len(FAMILIES):  # pragma: no cover - a declaration error
    raise RuntimeError("two tag families share a name")

#: the run-level LCA scalars (``lca/<metric>``), in LcaRecords' order
LCA_RUN_METRICS: tuple[str, ...] = tuple(
    f.run_metric for f in FAMILIES if f.writer == "lca" and f.run_metric and f.kind == "scalar"
)
#: the run-level NFA scalars (``nfa/<metric>``)
NFA_RUN_METRICS: tuple[str, ...] = tuple(f.run_metric for f in FAMILIES if f.writer == "nfa" and f.run_metric)


def family(name: str) -> TagFamily:
    """The family called ``name``; ValueError naming the known ones otherwise."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown tag family {name!r}; the families are {tuple(_BY_NAME)}") from None


def families(writer: str | None = None, kind: str | None = None) -> tuple[TagFamily, ...]:
    """The families a writer writes (``lca``/``nfa``), of one kind, or all."""
    return tuple(f for f in FAMILIES if writer in (None, f.writer) and kind in (None, f.kind))


@dataclass(frozen=True)
class TagMatch:
    """A parsed tag: its family, root and field values (as written in the tag)."""

    tag: str
    family: TagFamily
    root: str
    fields: dict[str, str]

    @property
    def leaf(self) -> str:
        """The tag's last ``/`` field (a run-level metric's or an NFA metric's name)."""
        return self.tag.rsplit("/", 1)[1]


def parse_tag(tag: str, roots: Mapping[str, str | None] | None = None) -> TagMatch | None:
    """The family and fields of ``tag``, or None when it is not a contract tag.

    Args:
        tag: a tag as written.
        roots: ``{root: writer}`` of the callbacks that wrote the run (default
            :data:`DEFAULT_ROOTS`: ``lca`` for LossChangeAllocation, ``nfa`` for
            NeuralFeatureAnsatz). A tag under any other root, or under a root
            mapped to None, is not parsed.
    """
    root = tag.partition("/")[0]
    writer = (roots if roots is not None else _DEFAULT_WRITERS).get(root)
    if writer is None:
        return None
    for candidate in _BY_WRITER.get(writer, ()):
        fields = candidate.match(tag, root)
        if fields is not None:
            return TagMatch(tag, candidate, root, fields)
    return None


_DEFAULT_WRITERS = {root: writer for writer, root in DEFAULT_ROOTS.items()}
_BY_WRITER: dict[str, tuple[TagFamily, ...]] = {writer: families(writer) for writer in WRITERS}
# A root is a callback's when it logged one of these run-level tags.
_ROOT_MARKS = {
    "lca": tuple(_BY_NAME[name].run_metric for name in ("lca_total", "lca_splits")),
    "nfa": (_BY_NAME["nfa_skipped"].run_metric,),
}


def callback_roots(scalar_tags: Collection[str]) -> tuple[list[str], list[str]]:
    """The tag roots (``name=``) of the LossChangeAllocation and of the NeuralFeatureAnsatz
    callbacks that wrote a run, each list with the default root first, then in
    first-written order.

    A root is a callback's when the run holds one of its run-level scalars
    (``{root}/total`` or ``{root}/splits`` for LCA, ``{root}/skipped`` for NFA).

    Args:
        scalar_tags: the run's scalar tags, in the order they were first written.
    """
    firsts = list(dict.fromkeys(tag.split("/", 1)[0] for tag in scalar_tags if "/" in tag))

    def marked(root: str, writer: str) -> bool:
        return any(f"{root}/{metric}" in scalar_tags for metric in _ROOT_MARKS[writer])

    lca = [r for r in firsts if marked(r, "lca")]
    nfa = [r for r in firsts if marked(r, "nfa") and r not in lca]
    lca.sort(key=lambda r: r != DEFAULT_ROOTS["lca"])
    nfa.sort(key=lambda r: r != DEFAULT_ROOTS["nfa"])
    return lca, nfa


def main_section_roots(lca_roots: Sequence[str], nfa_roots: Sequence[str]) -> dict[str, str | None]:
    """``{root: writer}`` of a run's main section, from :func:`callback_roots`' lists: the
    first LCA and the first NFA root. A default root that no callback of its kind owns is
    read too (a run with only ``lca/layer/...`` tags is an LCA run); beside another root of
    its kind its tags are not read (None). The further roots are sections of their own."""
    main: dict[str, str | None] = {
        DEFAULT_ROOTS["lca"]: None if lca_roots else "lca",
        DEFAULT_ROOTS["nfa"]: None if nfa_roots else "nfa",
    }
    main.update({root: "lca" for root in lca_roots[:1]})
    main.update({root: "nfa" for root in nfa_roots[:1]})
    return main


def ablation_corner(data: str, rule: str) -> str:
    """The name of one corner of the three-factor ablation (``probe_simpson``), the
    ``{data}_{rule}`` field of the ``lca_ablation_*`` tags."""
    return f"{PLACEHOLDERS['data'].text(data)}_{PLACEHOLDERS['rule'].text(rule)}"


def nfa_metric(metric: str) -> tuple[TagFamily, dict[str, str]]:
    """The per-layer NFA scalar family of a metric's name and its fields
    (``pearson_a0.5`` → the ``nfa_pearson`` family, ``{"alpha": "0.5"}``).

    Raises:
        ValueError: no per-layer NFA scalar family has this name.
    """
    found, fields = _nfa_metric(metric)
    return found, dict(fields)


@functools.lru_cache(maxsize=256)
def _nfa_metric(metric: str) -> tuple[TagFamily, tuple[tuple[str, str], ...]]:
    root = DEFAULT_ROOTS["nfa"]
    match = parse_tag(f"{root}/layer/{metric}", {root: "nfa"}) if "/" not in metric else None
    if match is None or match.family.kind != "scalar" or "layer" not in match.fields:
        known = ", ".join(f.display().rsplit("/", 1)[1] for f in families("nfa", "scalar") if "layer" in f.fields)
        raise ValueError(f"{metric!r} is not an NFA metric of the tag contract (known: {known})")
    return match.family, tuple((name, value) for name, value in match.fields.items() if name != "layer")


def nfa_metric_names(alphas: Iterable[float] = (1.0, 0.5), null: bool = True) -> list[str]:
    """The per-layer metrics a NeuralFeatureAnsatz logs for a hidden layer (the readout
    logs the subset without α = 1), in the layout's order.

    Args:
        alphas: the callback's ``alphas``.
        null: whether the rotation null is on (``null_draws != 0``): ``null_*``, ``null_se_*``
            (written with ≥ 2 draws), ``excess_*`` and ``null_draws``.
    """
    alphas = tuple(alphas)
    per_alpha = ["nfa_pearson", "nfa_cosine"] + (["nfa_null", "nfa_null_se", "nfa_excess"] if null else [])
    names = [_BY_NAME[name].leaf(alpha=alpha) for name in per_alpha for alpha in alphas]
    names += [_BY_NAME["nfa_null_draws"].leaf()] if null else []
    names += [_BY_NAME["nfa_sphericity"].leaf(), _BY_NAME["nfa_sphericity_range"].leaf()]
    # align_a1 would be √sphericity_range: not written
    names += [_BY_NAME["nfa_align"].leaf(alpha=alpha) for alpha in alphas if alpha != 1.0]
    return names + [_BY_NAME[name].leaf() for name in ("nfa_stable_rank", "nfa_weight_change", "nfa_cnfa_pearson")]


def markdown_table() -> str:
    """The README's tag tables: every family, then the placeholders' values."""
    lines = [
        "| tag | kind | unit | written by | meaning |",
        "|---|---|---|---|---|",
    ]
    for f in FAMILIES:
        meaning = f.meaning.replace("|", "\\|")
        lines.append(f"| `{f.display()}` | {f.kind} | {f.unit} | `{WRITERS[f.writer]}` | {meaning} |")
    lines += ["", "| placeholder | values | meaning |", "|---|---|---|"]
    for p in PLACEHOLDERS.values():
        if p.name == "root":  # shown as the default roots lca/ and nfa/
            continue
        values = ", ".join(f"`{v}`" for v in p.values) if p.values is not None else "any"
        lines.append(f"| `<{p.name}>` | {values} | {p.meaning} |")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    print(markdown_table())
