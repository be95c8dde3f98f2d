"""Per-run and per-layer summary numbers, computed from the reader's records.

These are quantities only; :mod:`learnscope.report.cli` prints them and
:mod:`learnscope.report.figures` draws them.

Conventions (BRIEF.md 2.4): LCA is negative when a layer *helped* (lowered the
loss). A layer's cumulative LCA is the last logged ``lca/layer_cumulative/<m>``
(the callback's own running sum over every measured step), or, when that tag is
absent, the sum of the logged ``lca/layer/<m>`` values. A layer's *share* is its
cumulative LCA over the sum of all layers' cumulative LCA: with a falling loss,
a layer that helped has a positive share and one that hurt a negative share.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from learnscope import contract
from learnscope.report.reader import HistogramSeries, LcaLayer, LcaRecords, RunRecords, ScalarSeries
from learnscope.report.shape import histogram_mean, last_histogram
from learnscope.report.sync import (
    SyncError,
    SyncResult,
    align_on_common_steps,
    describe_test,
    format_p_value,
    require_per_step,
    synchronisation_test,
)

__all__ = [
    "TABLE_COLUMNS",
    "LayerSummary",
    "RunSummary",
    "SyncSettings",
    "cumulative_layer_lca",
    "cumulative_layer_series",
    "format_headline",
    "format_sync_lines",
    "format_table",
    "layer_part_totals",
    "run_synchronisation",
    "summarise_run",
    "table_rows",
]

_MISSING = "-"


@dataclass(frozen=True)
class SyncSettings:
    """Parameters of :func:`learnscope.report.sync.synchronisation_test`."""

    smooth: int = 1
    window: int = 2
    tolerance: int = 0
    n_draws: int = 2000
    seed: int = 0


@dataclass(frozen=True)
class LayerSummary:
    name: str
    cumulative_lca: float | None = None
    share_of_total: float | None = None
    mean_helped_fraction: float | None = None
    part_totals: dict[str, float] = field(default_factory=dict)
    final_pearson_a1: float | None = None
    final_pearson_a05: float | None = None
    final_excess_a1: float | None = None
    final_excess_a05: float | None = None

    @property
    def verdict(self) -> str | None:
        if self.cumulative_lca is None or self.cumulative_lca == 0:
            return None
        return "helped" if self.cumulative_lca < 0 else "hurt"


@dataclass(frozen=True)
class RunSummary:
    run: str
    layers: tuple[LayerSummary, ...]
    measured_steps: int = 0
    total_lca: float | None = None  # Σ_t lca/total
    total_loss_change: float | None = None  # Σ_t lca/delta_loss
    cumulative_relative_error: float | None = None
    mean_helped_fraction: float | None = None
    mean_helped_fraction_nonzero: float | None = None
    mean_excess_kurtosis: float | None = None
    mean_excess_kurtosis_nonzero: float | None = None
    mean_skewness: float | None = None  # lca/skewness averaged over steps
    pooled_excess_kurtosis: float | None = None  # lca/excess_kurtosis_pooled at the last step
    pooled_skewness: float | None = None  # lca/skewness_pooled at the last step
    #: mean over parameters of each one's helped fraction, at the last lca/param_helped_fraction histogram
    param_helped_fraction: float | None = None
    skipped_steps: float | None = None
    probe_stochastic: bool | None = None  # the LCA self-check found the probe loss random
    capped_steps: float | None = None  # adaptive steps accepted at max_intervals above their error target
    sync: SyncResult | None = None
    sync_message: str | None = None  # why there is no sync result
    sync_driver_removed: SyncResult | None = None  # the same test with the shared driver removed
    sync_driver_removed_message: str | None = None


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _mean(series: ScalarSeries | None) -> float | None:
    """Mean over the steps, ignoring NaN (a step where no parameter moved)."""
    if series is None:
        return None
    finite = series.values[np.isfinite(series.values)]
    return float(finite.mean()) if len(finite) else None


def cumulative_layer_series(layer: LcaLayer) -> tuple[np.ndarray, np.ndarray] | None:
    """(steps, cumulative LCA) of one layer, from ``lca/layer_cumulative/<m>``
    or the running sum of ``lca/layer/<m>``."""
    if layer.cumulative is not None and len(layer.cumulative):
        return layer.cumulative.steps, layer.cumulative.values
    if layer.allocation is not None and len(layer.allocation):
        return layer.allocation.steps, np.cumsum(layer.allocation.values)
    return None


def cumulative_layer_lca(layer: LcaLayer) -> float | None:
    series = cumulative_layer_series(layer)
    return None if series is None else float(series[1][-1])


def _total(per_step: dict[str, ScalarSeries], cumulative: dict[str, ScalarSeries], part: str) -> float | None:
    if part in cumulative and len(cumulative[part]):
        return cumulative[part].last()
    if part in per_step and len(per_step[part]):
        return per_step[part].sum()
    return None


def layer_part_totals(layer: LcaLayer) -> dict[str, float]:
    """Cumulative LCA of each optimizer part of one layer."""
    totals = {}
    for part in dict.fromkeys([*layer.parts, *layer.parts_cumulative]):
        value = _total(layer.parts, layer.parts_cumulative, part)
        if value is not None:
            totals[part] = value
    return totals


def run_synchronisation(
    run: RunRecords, settings: SyncSettings = SyncSettings(), remove_driver: bool = False
) -> SyncResult:
    """The synchronisation test on the run's ``lca/layer/<m>`` series, on the
    steps every layer logged (``remove_driver``: on each layer's deviation from
    the layers' mean, see :func:`learnscope.report.sync.remove_shared_driver`).
    Raises SyncError when it cannot be run."""
    if run.lca is None:
        raise SyncError("the run has no LCA data")
    require_per_step(None if run.lca.window_steps is None else run.lca.window_steps.values)
    series = {
        name: (layer.allocation.steps, layer.allocation.values)
        for name, layer in run.lca.layers.items()
        if layer.allocation is not None and len(layer.allocation)
    }
    steps, aligned = align_on_common_steps(series)
    return synchronisation_test(
        aligned,
        steps,
        smooth=settings.smooth,
        window=settings.window,
        tolerance=settings.tolerance,
        n_draws=settings.n_draws,
        seed=settings.seed,
        remove_driver=remove_driver,
    )


def _final(metrics: dict[str, ScalarSeries], name: str) -> float | None:
    series = metrics.get(name)
    return None if series is None or not len(series) else _finite_or_none(series.last())


def _present(series: ScalarSeries | None) -> ScalarSeries | None:
    """``series`` when it holds at least one point."""
    return series if series is not None and len(series) else None


# The NFA metrics of the per-layer table, by the contract's names.
_PEARSON, _EXCESS = contract.family("nfa_pearson"), contract.family("nfa_excess")
_TABLE_METRICS = {
    "final_pearson_a1": _PEARSON.leaf(alpha=1.0),
    "final_pearson_a05": _PEARSON.leaf(alpha=0.5),
    "final_excess_a1": _EXCESS.leaf(alpha=1.0),
    "final_excess_a05": _EXCESS.leaf(alpha=0.5),
}


def _layer_summaries(run: RunRecords, cumulative: dict[str, float]) -> tuple[LayerSummary, ...]:
    """One summary per layer of the LCA records, then the NFA-only layers."""
    lca_layers = run.lca.layers if run.lca is not None else {}
    nfa_layers = run.nfa.layers if run.nfa is not None else {}
    layers_sum = sum(cumulative.values()) if cumulative else None
    summaries = []
    for name in dict.fromkeys([*lca_layers, *nfa_layers]):
        lca_layer, nfa_layer = lca_layers.get(name), nfa_layers.get(name)
        value = cumulative.get(name)
        metrics = nfa_layer.metrics if nfa_layer is not None else {}
        summaries.append(
            LayerSummary(
                name=name,
                cumulative_lca=value,
                share_of_total=value / layers_sum if value is not None and layers_sum else None,
                mean_helped_fraction=None if lca_layer is None else _mean(_present(lca_layer.helped_fraction)),
                part_totals=layer_part_totals(lca_layer) if lca_layer is not None else {},
                **{key: _final(metrics, metric) for key, metric in _TABLE_METRICS.items()},
            )
        )
    return tuple(summaries)


def _relative_error(lca: LcaRecords, total: float | None, loss_change: float | None) -> float | None:
    """The logged cumulative relative error, else |Σ LCA − Σ ΔL| / |Σ ΔL|."""
    logged = _present(lca.cumulative_relative_error)
    if logged is not None:
        return _finite_or_none(logged.last())
    if total is not None and loss_change:
        return abs(total - loss_change) / abs(loss_change)
    return None


def _with_lca_fields(summary: RunSummary, lca: LcaRecords, layers_sum: float | None) -> RunSummary:
    """``summary`` with the run-level LCA numbers filled in."""
    logged_total, logged_change = _present(lca.total), _present(lca.delta_loss)
    total = logged_total.sum() if logged_total is not None else layers_sum
    loss_change = logged_change.sum() if logged_change is not None else None
    step_counts = [len(s) for s in (lca.total, lca.delta_loss) if s is not None]
    step_counts += [len(layer.allocation) for layer in lca.layers.values() if layer.allocation is not None]
    probe_stochastic = _present(lca.probe_stochastic)
    return replace(
        summary,
        measured_steps=max(step_counts, default=0),
        total_lca=total,
        total_loss_change=loss_change,
        cumulative_relative_error=_relative_error(lca, total, loss_change),
        mean_helped_fraction=_mean(lca.helped_fraction),
        mean_helped_fraction_nonzero=_mean(lca.helped_fraction_nonzero),
        mean_excess_kurtosis=_mean(lca.excess_kurtosis),
        mean_excess_kurtosis_nonzero=_mean(lca.excess_kurtosis_nonzero),
        mean_skewness=_mean(lca.skewness),
        pooled_excess_kurtosis=_last(lca.excess_kurtosis_pooled),
        pooled_skewness=_last(lca.skewness_pooled),
        param_helped_fraction=_histogram_mean(lca.param_helped_fraction),
        skipped_steps=_last(lca.skipped_steps),
        probe_stochastic=None if probe_stochastic is None else bool(probe_stochastic.values.max() > 0),
        capped_steps=_last(lca.capped_steps),
    )


def _histogram_mean(series: HistogramSeries | None) -> float | None:
    histogram = last_histogram(series)
    return None if histogram is None else _finite_or_none(histogram_mean(histogram))


def _last(series: ScalarSeries | None) -> float | None:
    present = _present(series)
    return None if present is None else present.last()


def summarise_run(run: RunRecords, sync_settings: SyncSettings | None = SyncSettings()) -> RunSummary:
    """Summary numbers of one run; ``sync_settings=None`` skips the
    synchronisation test."""
    cumulative = {}
    if run.lca is not None:
        for name, layer in run.lca.layers.items():
            value = cumulative_layer_lca(layer)
            if value is not None:
                cumulative[name] = value
    summary = RunSummary(run=run.name, layers=_layer_summaries(run, cumulative))
    if run.lca is None:
        return summary
    summary = _with_lca_fields(summary, run.lca, sum(cumulative.values()) if cumulative else None)
    sync, sync_message = _sync_or_message(run, sync_settings)
    removed, removed_message = _sync_or_message(run, sync_settings, remove_driver=True)
    return replace(
        summary,
        sync=sync,
        sync_message=sync_message,
        sync_driver_removed=removed,
        sync_driver_removed_message=removed_message,
    )


def _sync_or_message(
    run: RunRecords, settings: SyncSettings | None, remove_driver: bool = False
) -> tuple[SyncResult | None, str | None]:
    """The synchronisation test's result, or why there is none (None, None: not run)."""
    if settings is None:
        return None, None
    try:
        return run_synchronisation(run, settings, remove_driver), None
    except SyncError as error:
        return None, str(error)


def _fmt(value: float | None, spec: str) -> str:
    return _MISSING if value is None else format(value, spec)


TABLE_COLUMNS = (
    "layer",
    "cum. LCA",
    "share",
    "helped frac.",
    "pearson_a1",
    "pearson_a0.5",
    "excess_a1",
    "excess_a0.5",
)


def table_rows(summary: RunSummary) -> tuple[list[str], list[list[str]]]:
    """Column names and one row of strings per layer; columns with no value in
    any row (NFA columns of an LCA-only run) are left out."""
    rows = [
        [
            layer.name,
            _fmt(layer.cumulative_lca, "+.6g"),
            _MISSING if layer.share_of_total is None else f"{100 * layer.share_of_total:.1f}%",
            _fmt(layer.mean_helped_fraction, ".3f"),
            _fmt(layer.final_pearson_a1, ".3f"),
            _fmt(layer.final_pearson_a05, ".3f"),
            _fmt(layer.final_excess_a1, "+.3f"),
            _fmt(layer.final_excess_a05, "+.3f"),
        ]
        for layer in summary.layers
    ]
    keep = [0] + [k for k in range(1, len(TABLE_COLUMNS)) if any(row[k] != _MISSING for row in rows)]
    return [TABLE_COLUMNS[k] for k in keep], [[row[k] for k in keep] for row in rows]


def format_table(summary: RunSummary, markdown: bool = False) -> str:
    """The per-layer table as aligned plain text (or a Markdown table)."""
    columns, rows = table_rows(summary)
    if markdown:
        lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(["---"] + ["---:"] * (len(columns) - 1)) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(str(cell)) for cell in column) for column in zip(columns, *rows)]

    def line(cells) -> str:
        return "  ".join(
            cell.ljust(width) if k == 0 else cell.rjust(width) for k, (cell, width) in enumerate(zip(cells, widths))
        ).rstrip()

    return "\n".join([line(columns), line(["-" * w for w in widths]), *(line(row) for row in rows)])


def _is_set(value: object) -> bool:
    return value is not None


# The run-level lines of the headline, in order: (RunSummary field, line, whether to show it).
_HEADLINE: tuple[tuple[str, Callable[[Any], str], Callable[[Any], bool]], ...] = (
    ("measured_steps", "measured steps: {}".format, bool),
    ("total_lca", "sum of LCA over steps: {:+.6g}".format, _is_set),
    ("total_loss_change", "sum of actual loss changes: {:+.6g}".format, _is_set),
    ("cumulative_relative_error", lambda value: f"cumulative relative error: {100 * value:.3g}%", _is_set),
    ("mean_helped_fraction", "mean helped fraction (all parameters): {:.3f}".format, _is_set),
    ("mean_helped_fraction_nonzero", "mean helped fraction (parameters with A != 0): {:.3f}".format, _is_set),
    ("mean_excess_kurtosis", "mean excess kurtosis of the allocations: {:.3g}".format, _is_set),
    (
        "mean_excess_kurtosis_nonzero",
        "mean excess kurtosis of the allocations (parameters with A != 0): {:.3g}".format,
        _is_set,
    ),
    ("pooled_excess_kurtosis", "excess kurtosis of all steps' allocations pooled: {:.3g}".format, _is_set),
    (
        "param_helped_fraction",
        "per-parameter helped fraction (steps with A < 0 / measured steps), mean over parameters: {:.3f}".format,
        _is_set,
    ),
    ("mean_skewness", "mean skewness of the allocations: {:.3g}".format, _is_set),
    ("pooled_skewness", "skewness of all steps' allocations pooled: {:.3g}".format, _is_set),
    ("skipped_steps", "skipped steps: {:g}".format, bool),
    (
        "probe_stochastic",
        lambda _: (
            "WARNING: the probe loss draws random numbers even in eval mode (the run's warning names the module): "
            "the allocations sum to the change of one fixed noisy loss, not of the deterministic loss"
        ),
        bool,
    ),
    (
        "capped_steps",
        lambda value: (
            f"capped steps: {value:g} (adaptive stopped at max_intervals above its tolerance; see lca/abs_error)"
        ),
        bool,
    ),
)


def format_headline(summary: RunSummary) -> list[str]:
    """Run-level lines: LCA totals, the cumulative relative error, sync."""
    lines = [line(getattr(summary, name)) for name, line, shown in _HEADLINE if shown(getattr(summary, name))]
    lines += format_sync_lines(summary)
    return lines


def _sync_line(label: str, sync: SyncResult | None, message: str | None) -> list[str]:
    if sync is None:
        return [f"{label}: not tested ({message})"] if message else []
    return [
        f"{label}: {sync.observed:g} coincident minima pairs vs {sync.null_mean:.1f} ± {sync.null_std:.1f} by chance, "
        f"{format_p_value(sync)} ({len(sync.layers)} layers, {len(sync.steps)} steps, "
        f"window {sync.window}, tolerance {sync.tolerance}, smooth {sync.smooth})"
    ]


def format_sync_lines(summary: RunSummary) -> list[str]:
    """The synchronisation test on the raw layer LCA, with the shared driver
    removed, and the test's definition (one line each)."""
    lines = _sync_line("synchronisation", summary.sync, summary.sync_message)
    lines += _sync_line(
        "synchronisation, shared driver removed", summary.sync_driver_removed, summary.sync_driver_removed_message
    )
    shown = summary.sync or summary.sync_driver_removed
    if shown is not None:
        lines.append(f"synchronisation test: {describe_test(shown)}")
    return lines
