"""The tab's data, read only through TensorBoard's data provider.

Every method takes names the caller has already checked against the provider's own
listing (:meth:`Reader.index`): nothing here opens a file or evaluates input, so the
same code serves local and remote log directories.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from tensorboard.data import provider as tb_provider

from learnscope.tensorboard_plugin.columns import Columns, finite
from learnscope.tensorboard_plugin.health import health
from learnscope.tensorboard_plugin.tags import RunIndex, run_sections

__all__ = ["MAX_UNITS", "Reader"]

#: read every point TensorBoard kept (its own reservoir, ``--samples_per_plugin``, still applies)
_READ_ALL = 1_000_000_000
#: the most unit rows of the unit heatmap; wider layers are drawn in groups of adjacent units
MAX_UNITS = 512
# tensor plugins that are certainly not learnscope's per-unit allocations
_NOT_UNITS = frozenset({"scalars", "images", "histograms", "distributions", "audio", "text", "pr_curves", "hparams"})
_NOT_UNITS |= {"custom_scalars", "graphs", "mesh", "projector", "debugger-v2"}

#: a scalar series: steps (int64, ascending) and values (float64)
Series = tuple[np.ndarray, np.ndarray]
_EMPTY: Series = (np.zeros(0, dtype=np.int64), np.zeros(0))
_STEP, _VALUE = operator.attrgetter("step"), operator.attrgetter("value")


class Reader:
    """One request's view of an experiment (``experiment_id`` from the request)."""

    def __init__(self, provider: Any, ctx: Any, experiment_id: str) -> None:
        self._provider = provider
        self._ctx = ctx
        self._eid = experiment_id

    @property
    def experiment_id(self) -> str:
        return self._eid

    def _call(self, method: str, **kwargs: Any) -> Any:
        return getattr(self._provider, method)(self._ctx, experiment_id=self._eid, **kwargs)

    def indices(self, runs: Sequence[str] | None = None) -> dict[str, dict[str, RunIndex]]:
        """Every run's (or the named runs') sections (``{key: RunIndex}``, one per
        learnscope callback root, :func:`~learnscope.tensorboard_plugin.tags.run_sections`),
        runs without any left out."""
        where = tb_provider.RunTagFilter(runs=runs)
        scalars = self._call("list_scalars", plugin_name="scalars", run_tag_filter=where)
        images = self._call("list_blob_sequences", plugin_name="images", run_tag_filter=where)
        tensors: dict[str, list[tuple[str, str]]] = {}
        for plugin in set(self._call("list_plugins") or ()) - _NOT_UNITS:
            for run, tags in self._call("list_tensors", plugin_name=plugin, run_tag_filter=where).items():
                tensors.setdefault(run, []).extend((plugin, tag) for tag in tags)
        indices = {}
        for run in sorted(set(scalars) | set(images) | set(tensors)):
            sections = run_sections(scalars.get(run, {}), images.get(run, {}), tensors.get(run, ()))
            for index in sections.values():
                tags = {
                    tag
                    for series in (*index.lca.values(), index.health, *index.nfa.values())
                    for tag in series.values()
                }
                index.max_step = max((scalars[run][tag].max_step for tag in tags), default=-1)
            if sections:
                indices[run] = sections
        return indices

    def scalars(self, run: str, tags: Sequence[str]) -> dict[str, Series]:
        """``{tag: (steps, values)}`` of the run's scalar ``tags``, by step."""
        if not tags:
            return {}
        where = tb_provider.RunTagFilter(runs=[run], tags=tags)
        found = self._call("read_scalars", plugin_name="scalars", downsample=_READ_ALL, run_tag_filter=where)
        out = {}
        for tag, data in found.get(run, {}).items():
            steps = np.fromiter(map(_STEP, data), dtype=np.int64, count=len(data))
            values = np.fromiter(map(_VALUE, data), dtype=np.float64, count=len(data))
            if np.any(steps[1:] < steps[:-1]):  # the providers return them by step; be sure
                order = np.argsort(steps, kind="stable")
                steps, values = steps[order], values[order]
            out[tag] = (steps, values)
        return out

    def last_values(self, run: str, tags: Sequence[str]) -> dict[str, float]:
        """``{tag: value}`` at the last step of each of the run's scalar ``tags`` (for
        cumulative series and run totals: one point read instead of the series)."""
        if not tags:
            return {}
        where = tb_provider.RunTagFilter(runs=[run], tags=tags)
        # downsampling to one point keeps the most recent one (DataProvider.read_scalars)
        found = self._call("read_scalars", plugin_name="scalars", downsample=1, run_tag_filter=where)
        return {tag: float(data[-1].value) for tag, data in found.get(run, {}).items() if data}

    def lca(self, run: str, index: RunIndex) -> dict[str, object]:
        """The LCA view: per module its total, per-step and cumulative columns, helped
        fraction and parts; the columns; and the health banner.

        The per-step and helped series are read whole; of the cumulative series only the
        last value, unless TensorBoard kept a sample of the module's per-step series (it
        no longer sums to that total): then the cumulative series too."""
        per_step, helped, cumulative = (index.lca.get(name, {}) for name in ("per_step", "helped", "cumulative"))
        data = self.scalars(run, [*per_step.values(), *helped.values()])
        parts = [tag for tags in index.parts.values() for tag in tags.values()]
        lasts = self.last_values(run, [*cumulative.values(), *parts, *index.health.values()])
        sampled = [
            module
            for module, tag in cumulative.items()
            if tag in lasts and not _sums_to(data.get(per_step.get(module, ""), _EMPTY)[1], lasts[tag])
        ]
        data.update(self.scalars(run, [cumulative[module] for module in sampled]))
        columns = Columns.over(np.concatenate([series[0] for series in data.values()] or [_EMPTY[0]]))
        layers = [_lca_layer(module, index, data, lasts, columns) for module in index.lca_modules]
        return {
            "run": run,
            "columns": columns.as_json(),
            "window_steps": self.window_steps(run, index),
            "layers": layers,
            "health": health({metric: lasts[tag] for metric, tag in index.health.items() if tag in lasts}, sampled),
            "parts": sorted({part for tags in index.parts.values() for part in tags}),
        }

    def window_steps(self, run: str, index: RunIndex) -> int:
        """How many measured steps a point of the per-layer series holds: the largest
        ``{root}/window_steps`` value (a logging window's; the last window of a fit, or
        one cut by a checkpoint, holds fewer), 1 when the run wrote per-step series."""
        if index.window_steps is None:
            return 1
        values = self.scalars(run, [index.window_steps]).get(index.window_steps, _EMPTY)[1]
        finite_values = values[np.isfinite(values)]
        return max(1, int(finite_values.max())) if len(finite_values) else 1

    def nfa(self, run: str, index: RunIndex) -> dict[str, object]:
        """The NFA view: per layer its Pearson, null, null SE and excess series, and the
        steps of its matrices images."""
        data = self.scalars(run, [tag for metrics in index.nfa.values() for tag in metrics.values()])
        images = {}
        if index.images:
            where = tb_provider.RunTagFilter(runs=[run], tags=list(index.images.values()))
            listing = self._call(
                "read_blob_sequences", plugin_name="images", downsample=_READ_ALL, run_tag_filter=where
            )
            images = {tag: sorted({d.step for d in seq}) for tag, seq in listing.get(run, {}).items()}
        layers = []
        for layer in index.nfa_layers:
            metrics = index.nfa.get(layer, {})
            series = {}
            for metric, tag in metrics.items():
                steps, values = data.get(tag, _EMPTY)
                columns = Columns.over(steps)
                series[metric] = {"steps": list(columns.last), "values": columns.reduce(steps, values, "last")}
            layers.append({"name": layer, "series": series, "image_steps": images.get(index.images.get(layer), [])})
        return {"run": run, "layers": layers}

    def units(self, run: str, plugin: str, tag: str) -> dict[str, object]:
        """A module's per-unit allocations: a units × columns matrix of column sums."""
        where = tb_provider.RunTagFilter(runs=[run], tags=[tag])
        found = self._call("read_tensors", plugin_name=plugin, downsample=_READ_ALL, run_tag_filter=where)
        data = sorted(found.get(run, {}).get(tag, []), key=lambda d: d.step)
        rows = [[float(v) for v in d.numpy.reshape(-1)] for d in data]
        width = max((len(row) for row in rows), default=0)
        group = max(1, math.ceil(width / MAX_UNITS))
        columns = Columns.over(d.step for d in data)
        steps = [d.step for d in data]
        matrix = []
        for start in range(0, width, group):
            values = [sum(row[start : start + group]) if len(row) > start else math.nan for row in rows]
            matrix.append(columns.reduce(steps, values, "sum"))
        return {
            "run": run,
            "units": width,
            "units_per_row": group,
            "steps_read": len(steps),
            "columns": columns.as_json(),
            "values": [_rounded(row) for row in matrix],
        }

    def image(self, run: str, tag: str, step: int) -> bytes | None:
        """The PNG of the matrices image at ``step`` (None when there is none)."""
        where = tb_provider.RunTagFilter(runs=[run], tags=[tag])
        found = self._call("read_blob_sequences", plugin_name="images", downsample=_READ_ALL, run_tag_filter=where)
        for datum in found.get(run, {}).get(tag, []):
            if datum.step == step and len(datum.values) > 2:  # [width, height, image, ...]
                blob: bytes = self._provider.read_blob(self._ctx, blob_key=datum.values[2].blob_key)
                return blob
        return None


def _sums_to(values: np.ndarray, total: float) -> bool:
    """Whether a per-step series sums to its cumulative total: every step was read
    (float32 values: within 1e-4 of the summed magnitudes)."""
    finite_values = values[np.isfinite(values)]
    scale = float(np.sum(np.abs(finite_values)))
    return not len(values) or abs(float(np.sum(finite_values)) - total) <= 1e-4 * scale + 1e-12


def _lca_layer(
    module: str, index: RunIndex, data: Mapping[str, Series], lasts: Mapping[str, float], columns: Columns
) -> dict[str, Any]:
    """One module's row: total, per-step sums, cumulative and helped columns, parts.

    With the whole per-step series read, a column is the sum of its steps and the
    cumulative column the running sum of those. When TensorBoard kept only a sample
    (the cumulative series was read), a column is the increase of the cumulative series
    over it (:meth:`Columns.increments`): exact between kept points; the row still sums
    to the total."""
    per_step = data.get(index.lca.get("per_step", {}).get(module, ""), _EMPTY)
    helped = data.get(index.lca.get("helped", {}).get(module, ""), _EMPTY)
    cumulative_tag = index.lca.get("cumulative", {}).get(module, "")
    sums = columns.reduce(*per_step, "sum")
    total = lasts.get(cumulative_tag, float(np.sum(per_step[1][np.isfinite(per_step[1])])))
    if cumulative_tag in data:  # sampled
        sums, cumulative = columns.increments(*data[cumulative_tag]), columns.reduce(*data[cumulative_tag], "last")
    else:
        running = np.cumsum([0.0 if v is None else v for v in sums]).tolist()
        cumulative = [None if v is None else r for v, r in zip(sums, running)]
    parts = {part: lasts[tag] for part, tag in index.parts.get(module, {}).items() if tag in lasts}
    return {
        "name": module,
        "total": finite(total),
        "per_step": _rounded(sums),
        "cumulative": _rounded(cumulative),
        "helped": _rounded(columns.reduce(*helped, "mean")),
        "helped_mean": finite(float(np.mean(helped[1]))) if len(helped[1]) else None,
        "parts": {part: finite(value) for part, value in parts.items()},
        "points": len(per_step[0]),
        "complete": cumulative_tag not in data,
    }


def _rounded(values: Sequence[float | None]) -> list[float | None]:
    """Seven significant digits (TensorBoard stores scalars as float32): half the JSON."""
    return [None if v is None else float(f"{v:.7g}") for v in values]
