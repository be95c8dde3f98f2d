"""TensorBoard custom-scalar layout for the learnscope tags.

The custom-scalars dashboard groups scalar tags into multiline charts. Every
chart here is defined by *regular expressions* over the tag names the callbacks
write (see :mod:`learnscope.contract` for the full tag contract), so a callback
can build the layout knowing only which probes are on, not the layer names.
Per-layer NFA charts (pearson next to its rotation null) are the one exception:
they are added when the callback passes the layer names it measures.

TensorBoard matches a chart's tags with ``re.match`` (anchored at the start
only), so every pattern here is anchored at both ends. Module names never contain
``/``, hence ``[^/]+`` stands for "any layer".

One layout per run
------------------
TensorBoard shows **only the last** layout event of a run (checked with
TensorBoard 2.21, both the Python loader and the Rust data server: a run with
layout ``{A, B}`` followed by layout ``{C}`` shows only ``C``). Layouts are
merged across *runs*, never within one. Two callbacks sharing one
``SummaryWriter`` (LCA and NFA) must therefore not each write their own layout.
:func:`write_layout_once` keeps, per writer object, the union of every layout
handed to it; it writes that union again only when a call adds something new. The
last layout event in the file is then always the union of both callbacks'
layouts, whichever callback ran first, and calling it again with the same layout
(a second ``fit``) writes nothing.

How a callback uses it::

    from lightning.pytorch.loggers import TensorBoardLogger
    from learnscope.tensorboard_layout import build_layout, write_layout_once

    def on_train_start(self, trainer, pl_module):
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                # on ranks > 0 `experiment` is a no-op object: nothing is written
                write_layout_once(logger.experiment, build_layout(lca=True, nfa=False))
"""

from __future__ import annotations

import contextlib
import re
import threading
import weakref
from collections.abc import Collection, Iterable, Sequence
from typing import Any

from tensorboard.plugins.custom_scalar import layout_pb2

from learnscope import contract

__all__ = [
    "CATEGORY_LCA",
    "CATEGORY_LCA_ABLATION",
    "CATEGORY_LCA_HEALTH",
    "CATEGORY_LCA_PARTS",
    "CATEGORY_NFA",
    "LCA_PARTS",
    "NFA_METRICS",
    "build_layout",
    "charts_matching",
    "layout_patterns",
    "layout_to_dict",
    "merge_layouts",
    "write_layout_once",
]

CATEGORY_LCA = "learnscope LCA"
CATEGORY_LCA_PARTS = "learnscope LCA parts"
CATEGORY_LCA_HEALTH = "learnscope LCA health"
CATEGORY_LCA_ABLATION = "learnscope LCA ablation"
CATEGORY_NFA = "learnscope NFA"
# The order in which categories appear, whichever callback wrote first.
_CATEGORY_ORDER = (
    CATEGORY_LCA,
    CATEGORY_LCA_PARTS,
    CATEGORY_LCA_HEALTH,
    CATEGORY_LCA_ABLATION,
    CATEGORY_NFA,
)

LCA_PARTS: tuple[str, ...] = contract.PARTS
NFA_METRICS: tuple[str, ...] = tuple(contract.nfa_metric_names((1.0, 0.5), null=True))


def _chart(title: str, patterns: Sequence[str]) -> layout_pb2.Chart:
    return layout_pb2.Chart(title=title, multiline=layout_pb2.MultilineChartContent(tag=list(patterns)))


def _pattern(family: str, root: str, **fixed: object) -> str:
    """The anchored regex of one contract family under ``root`` (free fields match any value)."""
    return contract.family(family).regex(root, **fixed)


def _run_charts(
    root: str, charts: Sequence[tuple[str, Sequence[str]]], unwritten: Collection[str] = ()
) -> list[layout_pb2.Chart]:
    """Charts of families: ``(title, [family, ...])``, without the ``unwritten`` families
    (a chart left with none is dropped)."""
    out = []
    for title, names in charts:
        written = [name for name in names if name not in unwritten]
        if written:
            out.append(_chart(title, [_pattern(name, root) for name in written]))
    return out


_LCA_HEALTH_CHARTS = (
    ("total LCA vs actual loss change", ("lca_total", "lca_delta_loss")),
    ("absolute error per step", ("lca_abs_error",)),
    ("cumulative relative error", ("lca_cumulative_relative_error",)),
    (
        "helped / hurt fraction (all parameters; helped among A != 0)",
        ("lca_helped_fraction", "lca_hurt_fraction", "lca_helped_fraction_nonzero"),
    ),
    ("excess kurtosis of the allocations (all; A != 0)", ("lca_excess_kurtosis", "lca_excess_kurtosis_nonzero")),
    ("skewness of the allocations (per step; pooled over the run)", ("lca_skewness", "lca_skewness_pooled")),
    ("excess kurtosis pooled over the run", ("lca_excess_kurtosis_pooled",)),
    ("quadrature sub-intervals", ("lca_splits",)),
    ("skipped steps", ("lca_skipped_steps", "lca_probe_stochastic")),
    ("adaptive steps capped above tolerance", ("lca_capped_steps",)),
)
_LCA_LAYER_CHARTS = (
    ("layer LCA per step (negative = helped)", ("lca_layer",)),
    ("layer LCA cumulative", ("lca_layer_cumulative",)),
    ("helped fraction per layer", ("lca_layer_helped",)),
    ("hurt fraction per layer", ("lca_layer_hurt",)),
    ("skewness of the allocations per layer", ("lca_layer_skewness",)),
)
_LCA_TENSOR_CHARTS = (
    ("parameter-tensor LCA per step (weight, bias, ...)", ("lca_tensor",)),
    ("parameter-tensor LCA cumulative", ("lca_tensor_cumulative",)),
)


def _unwritten(*, delta_loss: bool, adaptive: bool, sparse: bool, tensors: bool) -> set[str]:
    """The LCA families a run with these settings never writes, or writes as a constant,
    a single point or not at all in a healthy run: no chart for them."""
    unwritten = set()
    if not delta_loss:  # the cheap mode evaluates no loss after the step
        unwritten |= {"lca_delta_loss", "lca_abs_error", "lca_cumulative_relative_error"}
    if not adaptive:  # a fixed rule: a constant number of sub-intervals, nothing capped
        unwritten |= {"lca_splits", "lca_capped_steps"}
    if not sparse:  # written only when a step is skipped, and once by the self-check
        unwritten |= {"lca_skipped_steps", "lca_probe_stochastic"}
    if not tensors:
        unwritten |= {"lca_tensor", "lca_tensor_cumulative"}
    return unwritten


def _lca_part_charts(parts: Sequence[str], root: str) -> list[layout_pb2.Chart]:
    part_charts = _run_charts(
        root,
        [
            ("parts, all layers summed", ("lca_part",)),
            ("parts cumulative, all layers summed", ("lca_part_cumulative",)),
        ],
    )
    for part in parts:
        part_charts.append(_chart(f"{part} part per layer", [_pattern("lca_layer_part", root, part=part)]))
        part_charts.append(
            _chart(f"{part} part per layer, cumulative", [_pattern("lca_layer_part_cumulative", root, part=part)])
        )
    return part_charts


def _lca_categories(
    parts: Sequence[str] | None, ablation: bool, root: str, unwritten: set[str]
) -> list[layout_pb2.Category]:
    categories = [
        layout_pb2.Category(
            title=CATEGORY_LCA, chart=_run_charts(root, _LCA_LAYER_CHARTS + _LCA_TENSOR_CHARTS, unwritten)
        )
    ]
    if parts is not None:
        categories.append(layout_pb2.Category(title=CATEGORY_LCA_PARTS, chart=_lca_part_charts(parts, root)))
    categories.append(
        layout_pb2.Category(title=CATEGORY_LCA_HEALTH, chart=_run_charts(root, _LCA_HEALTH_CHARTS, unwritten))
    )
    parts = parts or ()
    if ablation:
        ablation_charts = _run_charts(root, [("helped fraction by loss and rule", ("lca_ablation_helped",))])
        for part in parts:
            ablation_charts.append(
                _chart(f"{part} part by loss and rule", [_pattern("lca_ablation_part", root, part=part)])
            )
        categories.append(layout_pb2.Category(title=CATEGORY_LCA_ABLATION, chart=ablation_charts))
    return categories


def _nfa_category(metrics: Sequence[str], layers: Sequence[str] | None, root: str) -> layout_pb2.Category:
    charts = []
    for metric in metrics:
        family, fields = contract.nfa_metric(metric)
        charts.append(_chart(f"{metric}, all layers", [family.regex(root, **fields)]))
    charts += _run_charts(root, [("skipped measurements", ("nfa_skipped", "nfa_probe_stochastic"))])
    # Without layer names a per-layer chart cannot be spelled out; show every
    # correlation beside every null in one chart instead.
    for layer in [None] if layers is None else layers:
        if layer is not None and "/" in layer:
            raise ValueError(f"layer name {layer!r} contains '/', which the nfa/<layer>/<metric> tags cannot hold")
        for alpha in (1.0, 0.5):
            fixed: dict[str, object] = {"alpha": alpha} if layer is None else {"alpha": alpha, "layer": layer}
            title = (
                f"pearson vs rotation null, α={alpha:g}, all layers"
                if layer is None
                else (f"{layer}: pearson vs rotation null, α={alpha:g}")
            )
            charts.append(_chart(title, [_pattern("nfa_pearson", root, **fixed), _pattern("nfa_null", root, **fixed)]))
    return layout_pb2.Category(title=CATEGORY_NFA, chart=charts)


def build_layout(
    lca: bool = True,
    nfa: bool = True,
    lca_parts: Sequence[str] | None = LCA_PARTS,
    lca_ablation: bool = False,
    nfa_metrics: Sequence[str] = NFA_METRICS,
    nfa_layers: Sequence[str] | None = None,
    lca_root: str = "lca",
    nfa_root: str = "nfa",
    lca_tensors: bool = False,
    lca_delta_loss: bool = True,
    lca_adaptive: bool = True,
    lca_sparse: bool = True,
) -> layout_pb2.Layout:
    """The custom-scalar layout for the probes that are on.

    Every chart's patterns are the regexes of :mod:`learnscope.contract` families.

    Args:
        lca: add the categories "learnscope LCA" (per-layer LCA, cumulative LCA,
            helped and hurt fraction, all layers per chart), "learnscope LCA parts"
            (one chart per optimizer part with every layer, plus the per-part
            totals) and "learnscope LCA health" (total vs actual loss change,
            errors, helped/hurt fraction, sub-intervals, skipped steps).
        nfa: add the category "learnscope NFA" (one chart per metric with every
            layer, and pearson beside its rotation null).
        lca_parts: the optimizer parts to chart (``lca/part/<part>/<m>``); None: no
            "learnscope LCA parts" category (``decompose=False``).
        lca_ablation: add "learnscope LCA ablation" (``lca/ablation/...`` tags).
        nfa_metrics: the NFA metrics to chart, one chart each.
        nfa_layers: names of the measured NFA layers. Given, every layer gets two
            charts (pearson_a1 with null_a1, pearson_a0.5 with null_a0.5); ``None``
            gives two charts with every layer's correlations and nulls instead.
        lca_root, nfa_root: the callbacks' ``name`` (the first field of their tags);
            categories of a non-default root carry it in their title.
        lca_tensors: add the per-parameter-tensor charts (``tensor_series=True``).
        lca_delta_loss: chart ``lca/delta_loss`` and the errors (False: the cheap mode).
        lca_adaptive: chart the sub-intervals and capped steps (``rule="adaptive"``).
        lca_sparse: chart ``lca/skipped_steps`` and ``lca/probe_stochastic``, which a
            healthy run writes once or never (the callback passes False).

    Returns:
        A ``tensorboard.plugins.custom_scalar.layout_pb2.Layout`` (empty when both
        probes are off).
    """
    categories: list[layout_pb2.Category] = []
    if lca:
        unwritten = _unwritten(delta_loss=lca_delta_loss, adaptive=lca_adaptive, sparse=lca_sparse, tensors=lca_tensors)
        parts = None if lca_parts is None else tuple(lca_parts)
        lca_categories = _lca_categories(parts, lca_ablation, lca_root, unwritten)
        categories.extend(_titled(category, "lca", lca_root) for category in lca_categories)
    if nfa:
        nfa_category = _nfa_category(tuple(nfa_metrics), None if nfa_layers is None else tuple(nfa_layers), nfa_root)
        categories.append(_titled(nfa_category, "nfa", nfa_root))
    return layout_pb2.Layout(category=categories)


def _titled(category: layout_pb2.Category, writer: str, root: str) -> layout_pb2.Category:
    """A category of a renamed callback carries its root in the title."""
    if root == contract.DEFAULT_ROOTS[writer]:
        return category
    return layout_pb2.Category(title=f"{category.title} ({root})", chart=category.chart)


def merge_layouts(*layouts: layout_pb2.Layout) -> layout_pb2.Layout:
    """The union of several layouts.

    Categories with the same title are merged; charts with the same title within
    a category get the union of their tag patterns (kept in first-seen order).
    The learnscope categories come first in a fixed order, others after them in
    first-seen order, so the result does not depend on which callback wrote first.
    """
    merged: dict[str, dict[str, list[str]]] = {}
    for layout in layouts:
        for category in layout.category:
            charts = merged.setdefault(category.title, {})
            for chart in category.chart:
                if chart.WhichOneof("content") == "margin":
                    raise ValueError(f"chart {chart.title!r}: only multiline charts can be merged")
                patterns = charts.setdefault(chart.title, [])
                patterns.extend(tag for tag in chart.multiline.tag if tag not in patterns)

    def order(title: str) -> tuple[int, int]:
        if title in _CATEGORY_ORDER:
            return (0, _CATEGORY_ORDER.index(title))
        return (1, list(merged).index(title))

    return layout_pb2.Layout(
        category=[
            layout_pb2.Category(title=title, chart=[_chart(name, tags) for name, tags in merged[title].items()])
            for title in sorted(merged, key=order)
        ]
    )


def layout_to_dict(layout: layout_pb2.Layout) -> dict[str, dict[str, list[Any]]]:
    """The layout in the dict form of ``SummaryWriter.add_custom_scalars``
    (``{category: {chart: ["Multiline", [patterns]]}}``), which torch's and
    tensorboardX's writers both accept."""
    return {
        category.title: {chart.title: ["Multiline", list(chart.multiline.tag)] for chart in category.chart}
        for category in layout.category
    }


_written: weakref.WeakKeyDictionary[Any, layout_pb2.Layout] = weakref.WeakKeyDictionary()
_written_lock = threading.Lock()


def write_layout_once(summary_writer: Any, layout: layout_pb2.Layout) -> bool:
    """Write ``layout`` to ``summary_writer``, merged with every layout written to
    that writer before; write nothing when that adds nothing.

    TensorBoard keeps only the last layout event of a run, so the union is what
    must come last; see the module docstring. Works with any object that has
    ``add_custom_scalars(dict)`` (torch's and tensorboardX's ``SummaryWriter``,
    Lightning's no-op experiment on ranks > 0).

    Args:
        summary_writer: the writer (``TensorBoardLogger.experiment``); ``None`` is
            accepted and ignored.
        layout: a layout from :func:`build_layout` (or any multiline layout).

    Returns:
        True when a layout event was written.
    """
    if summary_writer is None or not layout.category:
        return False
    with _written_lock:
        previous = _lookup(summary_writer)
        merged = merge_layouts(layout) if previous is None else merge_layouts(previous, layout)
        if previous is not None and merged == previous:
            return False
        summary_writer.add_custom_scalars(layout_to_dict(merged))
        _remember(summary_writer, merged)
        return True


def _lookup(summary_writer: Any) -> layout_pb2.Layout | None:
    try:
        return _written.get(summary_writer)
    except TypeError:  # not weak-referenceable or not hashable
        return getattr(summary_writer, "_learnscope_layout", None)


def _remember(summary_writer: Any, layout: layout_pb2.Layout) -> None:
    try:
        _written[summary_writer] = layout
    except TypeError:
        with contextlib.suppress(AttributeError):  # cannot remember: a later call writes the (idempotent) union again
            summary_writer._learnscope_layout = layout


def layout_patterns(layout: layout_pb2.Layout) -> Iterable[tuple[str, str, str]]:
    """Every ``(category, chart, pattern)`` of a layout, for tests and tooling."""
    for category in layout.category:
        for chart in category.chart:
            for pattern in chart.multiline.tag:
                yield category.title, chart.title, pattern


def charts_matching(layout: layout_pb2.Layout, tag: str) -> list[tuple[str, str]]:
    """The ``(category, chart)`` pairs whose patterns match ``tag`` the way the
    custom-scalars plugin matches them (``re.match``)."""
    return sorted({(category, chart) for category, chart, pattern in layout_patterns(layout) if re.match(pattern, tag)})
