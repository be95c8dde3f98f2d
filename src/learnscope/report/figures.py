"""PNG figures of one run, drawn from the reader's records.

Every function takes records (or a summary/sync result) and an output path,
writes one PNG and returns the path, or returns None without writing when the
run lacks the data. Figures are built with ``matplotlib.figure.Figure`` on an
Agg canvas: pyplot is never imported, so no global figure state is created or
leaked and no display backend is needed. Sizes are fixed (``DPI`` × the inch
sizes below, growing with the number of panels where noted), never cropped.

LCA colours: green = helped (negative LCA), red = hurt (positive).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import CenteredNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from learnscope import contract
from learnscope.report.reader import RunRecords, ScalarSeries
from learnscope.report.shape import (
    TensorLca,
    histogram_mean,
    last_histogram,
    lca_before,
    pooled_histogram,
    rebin,
    tensor_totals,
    uniform_bins,
)
from learnscope.report.summary import (
    RunSummary,
    _present,
    cumulative_layer_series,
    layer_part_totals,
)
from learnscope.report.sync import SyncResult, format_p_value

__all__ = [
    "DPI",
    "HELPED_COLOUR",
    "HURT_COLOUR",
    "plot_cumulative_lca",
    "plot_helped_fraction",
    "plot_layer_lca_bars",
    "plot_lca_distribution",
    "plot_lca_nfa_steps",
    "plot_lca_overlay",
    "plot_lca_parts",
    "plot_nfa_alignment",
    "plot_nfa_metrics",
    "plot_param_helped_fraction",
    "plot_synchronisation",
    "plot_tensor_lca",
    "plot_unit_lca",
    "tensor_lca_figure",
]

DPI = 100
HELPED_COLOUR = "#2ca02c"
HURT_COLOUR = "#d62728"
PART_COLOURS = dict(zip(contract.PARTS, ("#1f77b4", "#9467bd", "#8c564b", "#7f7f7f")))
_OTHER_PART_COLOURS = ("#17becf", "#bcbd22", "#e377c2", "#ff7f0e")
_PEARSON, _NULL, _NULL_SE = contract.family("nfa_pearson"), contract.family("nfa_null"), contract.family("nfa_null_se")
# The α of the NFA alignment figure (the callback's default alphas), one colour each.
_ALIGNMENT_ALPHAS = ((1.0, "#1f77b4"), (0.5, "#ff7f0e"))
# Families of the second NFA figure, in display order (pearson/null have their own).
_CONTEXT_FAMILIES = (
    "nfa_excess",
    "nfa_cosine",
    "nfa_sphericity",
    "nfa_sphericity_range",
    "nfa_align",
    "nfa_stable_rank",
    "nfa_weight_change",
    "nfa_cnfa_pearson",
)


def _context_rank(metric: str) -> int:
    return _CONTEXT_FAMILIES.index(contract.nfa_metric(metric)[0].name)


# Metrics of the second NFA figure: those a callback with the default alphas logs.
NFA_CONTEXT_METRICS = tuple(
    sorted(
        (m for m in contract.nfa_metric_names() if contract.nfa_metric(m)[0].name in _CONTEXT_FAMILIES),
        key=_context_rank,
    )
)


def _run_title(run: RunRecords) -> str:
    """A run's name for titles: the folder's own name when LOGDIR is the run itself."""
    return run.name if run.name not in ("", ".") else Path(run.path).name


def _layer_colour(index: int) -> tuple[float, float, float, float]:  # RGBA
    return colormaps["tab10"](index % 10)


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI, format="png")
    return path


def _layer_ticks(axes, names: list[str]) -> None:
    slanted = len(names) > 6
    axes.set_xticks(np.arange(len(names)), names, rotation=45 if slanted else 0, ha="right" if slanted else "center")


def _grid(n: int, max_columns: int) -> tuple[int, int]:
    columns = min(n, max_columns)
    return math.ceil(n / columns), columns


def _layers_with(run: RunRecords, attribute: str) -> dict[str, ScalarSeries]:
    if run.lca is None:
        return {}
    return {
        name: getattr(layer, attribute)
        for name, layer in run.lca.layers.items()
        if getattr(layer, attribute) is not None and len(getattr(layer, attribute))
    }


# (a) ---------------------------------------------------------------------------


def plot_cumulative_lca(run: RunRecords, path: str | Path) -> Path | None:
    """Cumulative LCA of each layer over the steps (8 × 5 in)."""
    if run.lca is None:
        return None
    curves = {
        name: curve for name, layer in run.lca.layers.items() if (curve := cumulative_layer_series(layer)) is not None
    }
    if not curves:
        return None
    figure = _new_figure(8, 5)
    axes = figure.add_subplot()
    for name, (steps, values) in curves.items():
        axes.plot(steps, values, label=name, linewidth=1.5)
    axes.axhline(0, color="black", linewidth=0.8)
    axes.set_xlabel("step")
    axes.set_ylabel("cumulative LCA (negative = helped)")
    axes.set_title(f"Cumulative loss change allocation per layer — {_run_title(run)}")
    axes.legend(fontsize="small", ncols=2 if len(curves) > 8 else 1)
    return _save(figure, path)


# (b) ---------------------------------------------------------------------------


def plot_layer_lca_bars(summary: RunSummary, path: str | Path) -> Path | None:
    """Total LCA per layer as bars: green = helped (< 0), red = hurt (8 × 5 in)."""
    layers = [layer for layer in summary.layers if layer.cumulative_lca is not None]
    if not layers:
        return None
    figure = _new_figure(8, 5)
    axes = figure.add_subplot()
    values = np.array([layer.cumulative_lca for layer in layers])
    positions = np.arange(len(layers))
    axes.bar(positions, values, color=[HELPED_COLOUR if v < 0 else HURT_COLOUR for v in values])
    axes.axhline(0, color="black", linewidth=0.8)
    _layer_ticks(axes, [layer.name for layer in layers])
    axes.set_ylabel("cumulative LCA")
    axes.set_title(f"Which layers helped (green) and hurt (red) — {summary.run}")
    return _save(figure, path)


# (c) ---------------------------------------------------------------------------


def plot_helped_fraction(run: RunRecords, path: str | Path) -> Path | None:
    """Helped fraction over the steps (run-level and per layer) and the
    histogram of its per-step values (12 × 4.5 in)."""
    if run.lca is None:
        return None
    overall = run.lca.helped_fraction if run.lca.helped_fraction is not None and len(run.lca.helped_fraction) else None
    per_layer = _layers_with(run, "helped_fraction")
    if overall is None and not per_layer:
        return None
    figure = _new_figure(12, 4.5)
    over_time, histogram = figure.subplots(1, 2, width_ratios=[2, 1])
    for name, series in per_layer.items():
        over_time.plot(series.steps, series.values, linewidth=0.8, alpha=0.7, label=name)
    if overall is not None:
        over_time.plot(overall.steps, overall.values, color="black", linewidth=1.6, label="all parameters")
    nonzero = run.lca.helped_fraction_nonzero
    if nonzero is not None and len(nonzero):
        over_time.plot(nonzero.steps, nonzero.values, color="black", linestyle="--", linewidth=1.2, label="A ≠ 0 only")
    over_time.axhline(0.5, color="grey", linestyle="--", linewidth=0.8)
    over_time.set_xlabel("step")
    over_time.set_ylabel("fraction of parameters with A < 0")
    over_time.set_title("Helped fraction over training")
    over_time.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.14), ncols=4)

    values = overall.values if overall is not None else np.concatenate([s.values for s in per_layer.values()])
    values = values[np.isfinite(values)]
    if len(values):
        histogram.hist(values, bins=min(30, max(5, len(values) // 3)), color=HELPED_COLOUR, alpha=0.8)
        histogram.axvline(float(np.mean(values)), color="black", linewidth=1.2, label=f"mean {np.mean(values):.3f}")
    histogram.axvline(0.5, color="grey", linestyle="--", linewidth=0.8)
    histogram.set_xlabel("helped fraction per step" + ("" if overall is not None else " (all layers pooled)"))
    histogram.set_ylabel("steps")
    histogram.set_title("Distribution")
    histogram.legend(fontsize="small")
    return _save(figure, path)


def plot_lca_overlay(sections: Sequence[RunRecords], path: str | Path) -> Path | None:
    """Several LCA callbacks of one run side by side (the LCA paper's train / held-out
    overlay): each section's cumulative Σ LCA over the steps, solid, and its cumulative
    actual loss change, dashed (10 × 4.5 in). None unless two sections logged LCA."""
    curves = []
    for section in sections:
        lca = section.lca
        if lca is None or lca.total is None or not len(lca.total):
            continue
        root = section.roots[0] if section.roots else section.name
        curves.append((root, lca.total, lca.delta_loss))
    if len(curves) < 2:
        return None
    figure = _new_figure(10, 4.5)
    axes = figure.subplots()
    for index, (root, total, delta_loss) in enumerate(curves):
        colour = _layer_colour(index)
        axes.plot(total.steps, np.cumsum(total.values), color=colour, linewidth=1.6, label=f"{root}: Σ LCA")
        if delta_loss is not None and len(delta_loss):
            axes.plot(
                delta_loss.steps,
                np.cumsum(delta_loss.values),
                color=colour,
                linestyle="--",
                linewidth=1.0,
                label=f"{root}: Σ actual ΔL",
            )
    axes.axhline(0.0, color="grey", linewidth=0.8)
    axes.set_xlabel("step")
    axes.set_ylabel("cumulative loss change (negative = helped)")
    axes.set_title(f"{_run_title(sections[0])}: LCA of each probe set")
    axes.legend(fontsize="small")
    return _save(figure, path)


# (d) ---------------------------------------------------------------------------


def _part_colour(part: str, index: int) -> str:
    return PART_COLOURS.get(part, _OTHER_PART_COLOURS[index % len(_OTHER_PART_COLOURS)])


def plot_lca_parts(run: RunRecords, path: str | Path) -> Path | None:
    """Cumulative LCA of each optimizer part per layer as stacked bars
    (positive parts stacked up, negative ones down; a black marker at the sum)
    (8 × 5 in)."""
    if run.lca is None:
        return None
    totals = {name: layer_part_totals(layer) for name, layer in run.lca.layers.items()}
    totals = {name: parts for name, parts in totals.items() if parts}
    if not totals:
        return None
    parts = list(dict.fromkeys(part for per_layer in totals.values() for part in per_layer))
    figure = _new_figure(8, 5)
    axes = figure.add_subplot()
    positions = np.arange(len(totals))
    up = np.zeros(len(totals))
    down = np.zeros(len(totals))
    for index, part in enumerate(parts):
        values = np.array([totals[name].get(part, 0.0) for name in totals])
        bottom = np.where(values >= 0, up, down)
        bars = axes.bar(positions, values, bottom=bottom, color=_part_colour(part, index), label=part, width=0.6)
        for bar in bars:  # a tiny residual stacked at a bar's tip must not pin the axis limit there
            bar.sticky_edges.y[:] = [0.0]
        up += np.clip(values, 0, None)
        down += np.clip(values, None, 0)
    axes.scatter(positions, up + down, color="black", marker="D", zorder=3, label="sum of parts")
    axes.axhline(0, color="black", linewidth=0.8)
    _layer_ticks(axes, list(totals))
    axes.set_ylabel("cumulative LCA (negative = helped)")
    axes.set_title(f"LCA split by optimizer part — {_run_title(run)}")
    axes.legend(fontsize="small")
    return _save(figure, path)


# (e) ---------------------------------------------------------------------------


def _draw_against_null(axes, metrics: dict[str, ScalarSeries], alpha: float, colour: str) -> bool:
    pearson = metrics.get(_PEARSON.leaf(alpha=alpha))
    if pearson is None or not len(pearson):
        return False
    axes.plot(pearson.steps, pearson.values, color=colour, linewidth=1.6, label=f"pearson α={alpha:g}")
    null = metrics.get(_NULL.leaf(alpha=alpha))
    if null is not None and len(null):
        axes.plot(
            null.steps, null.values, color=colour, linestyle="--", linewidth=1.0, label=f"rotation null α={alpha:g}"
        )
        # The band a random rotation of G already reaches: alignment below it is not evidence.
        axes.fill_between(null.steps, 0, null.values, color=colour, alpha=0.12, linewidth=0)
        _draw_null_error(axes, null, metrics.get(_NULL_SE.leaf(alpha=alpha)), colour)
    return True


def _draw_null_error(axes, null: ScalarSeries, error: ScalarSeries | None, colour: str) -> None:
    """null ± 1.96·SE (the null's standard error over its draws) at the steps that have both."""
    if error is None or not len(error):
        return
    steps, in_null, in_error = np.intersect1d(null.steps, error.steps, return_indices=True)
    if not len(steps):
        return
    centre, half = null.values[in_null], 1.96 * error.values[in_error]
    axes.errorbar(steps, centre, yerr=half, fmt="none", ecolor=colour, elinewidth=0.8, capsize=2, alpha=0.7)


def plot_nfa_alignment(run: RunRecords, path: str | Path) -> Path | None:
    """Per layer: the NFA Pearson correlation (α = 1 and α = ½) over the steps,
    with the rotation null drawn as a dashed line over a shaded band, with
    ±1.96·SE error bars where ``null_se`` was logged (panels of 4 × 3.6 in, at most 3 per row)."""
    if run.nfa is None:
        return None
    layers = {
        name: layer.metrics
        for name, layer in run.nfa.layers.items()
        if any(_PEARSON.leaf(alpha=alpha) in layer.metrics for alpha, _ in _ALIGNMENT_ALPHAS)
    }
    if not layers:
        return None
    rows, columns = _grid(len(layers), 3)
    figure = _new_figure(4 * columns, 3.6 * rows)
    grid = np.atleast_1d(figure.subplots(rows, columns, squeeze=False)).ravel()
    for axes, (name, metrics) in zip(grid, layers.items()):
        drawn = [_draw_against_null(axes, metrics, alpha, colour) for alpha, colour in _ALIGNMENT_ALPHAS]
        title = name if drawn[0] else f"{name} (readout: α=1 omitted)"
        axes.set_title(title, fontsize="medium")
        axes.set_ylim(min(0.0, axes.get_ylim()[0]), 1.02)
        axes.set_xlabel("step")
        axes.set_ylabel("correlation")
        axes.legend(fontsize="x-small", loc="lower right")
    for axes in grid[len(layers) :]:
        axes.set_visible(False)
    figure.suptitle(f"Neural Feature Ansatz: NFM vs AGOP^α against the rotation null — {_run_title(run)}")
    return _save(figure, path)


def plot_nfa_metrics(run: RunRecords, path: str | Path) -> Path | None:
    """The other NFA metrics (excess, cosine, sphericity, alignment, stable
    rank, weight change, C-NFA), one panel per metric with every layer
    (panels of 3.5 × 2.8 in, 4 per row)."""
    if run.nfa is None:
        return None
    present = [
        metric
        for metric in NFA_CONTEXT_METRICS
        if any(metric in layer.metrics and len(layer.metrics[metric]) for layer in run.nfa.layers.values())
    ]
    if not present:
        return None
    rows, columns = _grid(len(present), 4)
    figure = _new_figure(3.5 * columns, 2.8 * rows)
    grid = np.atleast_1d(figure.subplots(rows, columns, squeeze=False)).ravel()
    # One colour per layer across panels (a readout layer is absent from the α=1 ones).
    colours = {name: _layer_colour(k) for k, name in enumerate(run.nfa.layers)}
    for axes, metric in zip(grid, present):
        for name, layer in run.nfa.layers.items():
            series = layer.metrics.get(metric)
            if series is not None and len(series):
                axes.plot(series.steps, series.values, linewidth=1.2, color=colours[name])
        if contract.nfa_metric(metric)[0].name == "nfa_excess":  # pearson − null: 0 is chance
            axes.axhline(0, color="black", linewidth=0.8)
        axes.set_title(metric, fontsize="medium")
        axes.set_xlabel("step", fontsize="small")
    handles = [Line2D([], [], color=colour, linewidth=1.2) for colour in colours.values()]
    figure.legend(handles, list(colours), loc="outside lower center", ncols=min(len(colours), 8), fontsize="small")
    for axes in grid[len(present) :]:
        axes.set_visible(False)
    figure.suptitle(f"NFA metrics per layer — {_run_title(run)}")
    return _save(figure, path)


# (f) ---------------------------------------------------------------------------


def _compressed(values: np.ndarray) -> np.ndarray:
    """arcsinh((x − median) / (1.4826·MAD)), for display: linear within a few MADs and
    logarithmic beyond, so a few large early steps do not flatten every later one (the
    std replaces a zero MAD)."""
    centred = values - np.median(values)
    spread = 1.4826 * float(np.median(np.abs(centred))) or float(values.std()) or 1.0
    return np.arcsinh(centred / spread)


def plot_synchronisation(sync: SyncResult | None, path: str | Path, title: str = "") -> Path | None:
    """Top: each layer's (smoothed, standardised) LCA series, offset for
    readability, with its local minima marked and the coincident steps shaded.
    Bottom: the circular-shift null distribution of the coincidence count with
    the observed value (12 × 7 in)."""
    if sync is None:
        return None
    figure = _new_figure(12, 7)
    series_axes, null_axes = figure.subplots(2, 1, height_ratios=[2, 1])
    for step in sync.coincident_steps:
        series_axes.axvline(step, color="grey", alpha=0.25, linewidth=1)
    shown = [_compressed(values) for values in sync.smoothed]
    gap = 1.05 * max((float(np.ptp(y)) for y in shown), default=1.0)
    for offset, (name, compressed) in enumerate(zip(sync.layers, shown)):
        shifted = compressed - gap * offset
        (line,) = series_axes.plot(sync.steps, shifted, linewidth=1, label=name)
        minima = np.isin(sync.steps, sync.minima_steps[name])
        series_axes.plot(sync.steps[minima], shifted[minima], "v", color=line.get_color(), markersize=5)
    series_axes.set_yticks([])
    series_axes.set_xlabel("step")
    series_axes.set_ylabel("layer LCA: arcsinh((x − median) / MAD),\noffset per layer")
    what = "per-layer LCA, shared driver removed" if sync.driver_removed else "per-layer LCA"
    series_axes.set_title(
        f"Local minima of the {what} (▼); grey: steps where layers' minima coincide" + (f" — {title}" if title else "")
    )
    series_axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))

    null = sync.null_distribution
    low, high = int(np.floor(min(null.min(), sync.observed))), int(np.ceil(max(null.max(), sync.observed)))
    bins = np.arange(low - 0.5, high + 1.5) if high - low <= 80 else 40
    null_axes.hist(null, bins=bins, color="#7f7f7f", alpha=0.8, label=f"circular-shift null ({sync.n_draws} draws)")
    null_axes.axvline(sync.observed, color=HURT_COLOUR, linewidth=2, label=f"observed {sync.observed:g}")
    null_axes.set_xlabel("coincident minima pairs")
    null_axes.set_ylabel("draws")
    null_axes.set_title(f"{format_p_value(sync)}; null {sync.null_mean:.1f} ± {sync.null_std:.1f}", fontsize="small")
    null_axes.legend(fontsize="small")
    return _save(figure, path)


# (h) ---------------------------------------------------------------------------


def plot_param_helped_fraction(run: RunRecords, path: str | Path, bins: int = 20) -> Path | None:
    """The LCA paper's per-parameter histogram: each parameter's helped fraction
    (measured steps with A < 0 / measured steps, ``parameter_counts=True``) at the last
    logged ``lca/param_helped_fraction``, all parameters (left) and per module as the
    fraction of the module's parameters in each bin (right) (12 × 4.5 in)."""
    if run.lca is None or (overall := last_histogram(run.lca.param_helped_fraction)) is None:
        return None
    figure = _new_figure(12, 4.5)
    left, right = figure.subplots(1, 2)
    edges, counts = uniform_bins(overall, 0.0, 1.0, bins)
    left.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color=HELPED_COLOUR, alpha=0.8)
    mean = histogram_mean(overall)
    left.axvline(mean, color="black", linewidth=1.4, label=f"mean {mean:.3f}")
    left.axvline(0.5, color="grey", linestyle="--", linewidth=0.8, label="0.5")
    left.set_xlabel("helped fraction of the parameter (its measured steps with A < 0)")
    left.set_ylabel("parameters")
    left.set_title(f"All {overall.num:.0f} parameters, at step {overall.step}")
    left.legend(fontsize="small")
    for index, (name, layer) in enumerate(run.lca.layers.items()):
        histogram = last_histogram(layer.param_helped_fraction)
        if histogram is None or not histogram.num:
            continue
        edges, counts = uniform_bins(histogram, 0.0, 1.0, bins)
        label = f"{name} (mean {histogram_mean(histogram):.3f})"
        right.stairs(counts / histogram.num, edges, color=_layer_colour(index), linewidth=1.4, label=label)
    right.axvline(0.5, color="grey", linestyle="--", linewidth=0.8)
    right.set_xlabel("helped fraction of the parameter")
    right.set_ylabel("fraction of the module's parameters")
    right.set_title("Per module")
    if right.get_legend_handles_labels()[0]:
        right.legend(fontsize="small")
    figure.suptitle(f"How often each parameter helped — {_run_title(run)}")
    return _save(figure, path)


def tensor_lca_figure(totals: dict[tuple[str, str], float], title: str = "") -> Figure | None:
    """Horizontal bars of the cumulative LCA of each (module, parameter tensor), model
    order top to bottom, green = helped (< 0), red = hurt, the value beside each bar
    (8 in wide, 0.35 in per bar). None without totals."""
    if not totals:
        return None
    labels = [f"{module} · {tensor}" for module, tensor in totals]
    values = np.array(list(totals.values()))
    figure = _new_figure(8, 1.6 + 0.35 * len(values))
    axes = figure.add_subplot()
    positions = np.arange(len(values))[::-1]
    axes.barh(positions, values, color=[HELPED_COLOUR if v < 0 else HURT_COLOUR for v in values], height=0.7)
    for y, value in zip(positions, values):
        axes.annotate(
            f"{value:+.3g}",
            (value, y),
            xytext=(4 if value >= 0 else -4, 0),
            textcoords="offset points",
            ha="left" if value >= 0 else "right",
            va="center",
            fontsize="x-small",
        )
    axes.margins(x=0.18)
    axes.axvline(0, color="black", linewidth=0.8)
    axes.set_yticks(positions, labels, fontsize="small")
    axes.set_xlabel("cumulative LCA (negative = helped)")
    axes.set_title("LCA per parameter tensor: green helped, red hurt" + (f" — {title}" if title else ""))
    return figure


def plot_tensor_lca(tensors: dict[str, dict[str, TensorLca]], path: str | Path, title: str = "") -> Path | None:
    """Each layer's total LCA split by parameter tensor (weight / bias, BatchNorm γ / β),
    from :func:`learnscope.report.shape.read_tensor_lca`; see :func:`tensor_lca_figure`."""
    figure = tensor_lca_figure(tensor_totals(tensors), title)
    return None if figure is None else _save(figure, path)


def _draw_pooled_allocations(axes, run: RunRecords, bins: int = 101) -> bool:
    """The allocations of every module at the last step with ``lca/hist``, as a density
    on ``bins`` equal bins (log scale), with the normal of the same mean and variance."""
    assert run.lca is not None
    series = [
        layer.histogram for layer in run.lca.layers.values() if layer.histogram is not None and len(layer.histogram)
    ]
    if not series:
        return False
    step = max(int(s.steps[-1]) for s in series)
    moments = [h for s in series for h in s.histograms if h.step == step]
    pooled = pooled_histogram(moments)
    assert pooled is not None
    reach = max(abs(float(pooled[0][0])), abs(float(pooled[1][-1]))) or 1.0
    edges = np.linspace(-reach, reach, bins + 1)
    total = float(pooled[2].sum())
    density = rebin(*pooled, edges) / (total * np.diff(edges))
    axes.stairs(density, edges, color="black", label="allocations A")
    mean = sum(h.sum for h in moments) / total
    std = math.sqrt(max(sum(h.sum_squares for h in moments) / total - mean**2, 0.0)) or 1.0
    normal = np.exp(-0.5 * ((edges - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))
    axes.plot(edges, normal, color=HURT_COLOUR, linestyle="--", linewidth=1.0, label="normal, same mean and s.d.")
    axes.set_yscale("log")
    axes.set_ylim(float(density[density > 0].min()) / 3, float(density.max()) * 3)
    axes.set_xlabel("allocation A of one parameter")
    axes.set_ylabel("density (log)")
    axes.set_title(f"All parameters' allocations at step {step}", fontsize="medium")
    axes.legend(fontsize="x-small")
    return True


def _draw_shape_series(axes, series: ScalarSeries | None, pooled: float | None, label: str, colour: str) -> None:
    if series is not None and len(series):
        axes.plot(series.steps, series.values, color=colour, linewidth=1.0, label=f"{label} per step")
    if pooled is not None:
        axes.axhline(pooled, color=colour, linestyle="--", linewidth=1.2, label=f"{label} pooled: {pooled:.3g}")
    axes.set_xlabel("step")
    axes.set_title(label, fontsize="medium")
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize="x-small")


def plot_lca_distribution(run: RunRecords, summary: RunSummary, path: str | Path) -> Path | None:
    """The shape of the allocations: their density at the last histogram step (all
    modules pooled, log scale, against a normal), and the skewness m₃/m₂^{3/2} and
    excess kurtosis m₄/m₂² − 3 per step (solid) and pooled over every step and
    parameter (dashed) (15 × 4.2 in)."""
    lca = run.lca
    if lca is None:
        return None
    skewness, kurtosis = _present(lca.skewness), _present(lca.excess_kurtosis)
    has_histograms = any(layer.histogram is not None and len(layer.histogram) for layer in lca.layers.values())
    if skewness is None and kurtosis is None and not has_histograms:
        return None
    figure = _new_figure(15, 4.2)
    density, skew_axes, kurtosis_axes = figure.subplots(1, 3)
    if not _draw_pooled_allocations(density, run):
        density.set_visible(False)
    _draw_shape_series(skew_axes, skewness, summary.pooled_skewness, "skewness", "#1f77b4")
    skew_axes.axhline(0, color="grey", linewidth=0.8)
    _draw_shape_series(kurtosis_axes, kurtosis, summary.pooled_excess_kurtosis, "excess kurtosis", "#9467bd")
    kurtosis_axes.set_yscale("symlog", linthresh=1.0)
    figure.suptitle(
        f"Distribution of the allocations (0 skewness = symmetric, 0 kurtosis = normal tails) — {_run_title(run)}"
    )
    return _save(figure, path)


def plot_lca_nfa_steps(run: RunRecords, path: str | Path, alpha: float = 0.5) -> Path | None:
    """LCA and NFA of each layer on one step axis, aligned: at each NFA step s (the
    weights θ_s), the LCA accumulated over the LCA steps < s (the updates that made θ_s,
    left axis, markers) and NFA Pearson(WᵀW, AGOP^α) (right axis); the cumulative LCA
    curve is drawn at s + 1 for LCA step s (panels of 4.5 × 3.4 in, 3 per row)."""
    if run.lca is None or run.nfa is None:
        return None
    metric = _PEARSON.leaf(alpha=alpha)
    layers = [
        name
        for name, layer in run.nfa.layers.items()
        if metric in layer.metrics and name in run.lca.layers and run.lca.layers[name].allocation is not None
    ]
    if not layers:
        return None
    rows, columns = _grid(len(layers), 3)
    figure = _new_figure(4.5 * columns, 3.4 * rows)
    grid = np.atleast_1d(figure.subplots(rows, columns, squeeze=False)).ravel()
    for axes, name in zip(grid, layers):
        allocation, pearson = run.lca.layers[name].allocation, run.nfa.layers[name].metrics[metric]
        assert allocation is not None
        axes.plot(allocation.steps + 1, np.cumsum(allocation.values), color=HELPED_COLOUR, linewidth=1.0)
        axes.plot(
            pearson.steps,
            lca_before(allocation.steps, allocation.values, pearson.steps),
            "o",
            color=HELPED_COLOUR,
            markersize=3,
            label="Σ LCA over steps < s",
        )
        axes.set_ylabel("cumulative LCA", color=HELPED_COLOUR)
        axes.set_xlabel("step s (NFA: θ_s; LCA step s−1: θ_{s−1} → θ_s)", fontsize="small")
        twin = axes.twinx()
        twin.plot(pearson.steps, pearson.values, "s-", color="#1f77b4", markersize=3, linewidth=1.0)
        twin.set_ylabel(f"NFA pearson α={alpha:g}", color="#1f77b4")
        axes.set_title(name, fontsize="medium")
    for axes in grid[len(layers) :]:
        axes.set_visible(False)
    figure.suptitle(f"LCA and NFA on one axis, aligned: NFA at s against the LCA of updates < s — {_run_title(run)}")
    return _save(figure, path)


# (g) ---------------------------------------------------------------------------


def plot_unit_lca(run: RunRecords, path: str | Path, max_layers: int = 8) -> Path | None:
    """Per-neuron LCA heatmaps (output units × logged points) of the layers that logged
    ``lca/unit/<m>`` (one tensor per point: a measured step, or a logging window's sum);
    diverging colormap centred at 0, green = helped (one 10 × 2.5 in panel per layer, at
    most ``max_layers``)."""
    if run.lca is None:
        return None
    layers = {
        name: layer.units for name, layer in run.lca.layers.items() if layer.units is not None and len(layer.units)
    }
    if not layers:
        return None
    layers = dict(list(layers.items())[:max_layers])
    windowed = run.lca.window_steps is not None and bool(np.any(run.lca.window_steps.values > 1))
    figure = _new_figure(10, 2.5 * len(layers))
    grid = np.atleast_1d(figure.subplots(len(layers), 1, squeeze=False)).ravel()
    colormap = colormaps["RdYlGn_r"]  # low (negative, helped) = green
    for axes, (name, units) in zip(grid, layers.items()):
        steps, matrix = units.steps, units.values.reshape(len(units.steps), -1).T  # (units, points)
        halfrange = float(np.nanmax(np.abs(matrix))) if matrix.size else 1.0
        image = axes.imshow(
            matrix,
            aspect="auto",
            interpolation="nearest",
            cmap=colormap,
            norm=CenteredNorm(vcenter=0.0, halfrange=halfrange or 1.0),
            extent=(-0.5, len(steps) - 0.5, matrix.shape[0] - 0.5, -0.5),
        )
        ticks = np.linspace(0, len(steps) - 1, min(8, len(steps))).round().astype(int)
        axes.set_xticks(ticks, [str(s) for s in steps[ticks]])
        axes.yaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_ylabel(f"{name}\noutput unit")
        axes.set_xlabel("step (end of each logging window: its sum)" if windowed else "step")
        figure.colorbar(image, ax=axes, label="LCA (green = helped)")
    figure.suptitle(f"Per-neuron loss change allocation — {_run_title(run)}")
    return _save(figure, path)


FIGURES: Sequence[str] = (
    "cumulative_lca",
    "lca_per_layer",
    "helped_fraction",
    "lca_parts",
    "nfa_alignment",
    "nfa_metrics",
    "synchronisation",
    "unit_lca",
    "param_helped_fraction",
    "tensor_lca",
    "lca_distribution",
    "synchronisation_driver_removed",
    "lca_nfa_steps",
)
