"""What the report draws beyond the reader's records: the per-parameter-tensor LCA
series, the per-parameter helped-fraction histogram, the allocations' pooled
histogram, and the step alignment of LCA and NFA. No torch.

Per-tensor series (``LossChangeAllocation(tensor_series=True)``): ``<root>/tensor/<m>/<p>``
is Σ_{i ∈ tensor p of module m} A_t,i per step and ``<root>/tensor_cumulative/<m>/<p>``
its running sum (p = ``weight``, ``bias``, BatchNorm's γ ``weight`` and β ``bias``, ...).
The reader files them into ``LcaLayer.tensors`` / ``tensors_cumulative``.

Steps (README, "Steps: how LCA and NFA line up"): LCA step s is the update θ_s → θ_{s+1};
NFA step s is θ_s, the weights after s updates. The LCA that produced the weights NFA
sees at step s is therefore the sum over the LCA steps < s (:func:`lca_before`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from learnscope import contract
from learnscope.report.reader import (
    Histogram,
    HistogramSeries,
    RunRecords,
    ScalarSeries,
)

__all__ = [
    "TENSOR_KINDS",
    "TensorLca",
    "buckets",
    "histogram_mean",
    "histogram_quantile",
    "last_histogram",
    "lca_before",
    "lca_root",
    "pooled_histogram",
    "read_tensor_lca",
    "rebin",
    "tensor_totals",
    "uniform_bins",
]

#: the per-tensor tag kinds: per step and cumulative
TENSOR_KINDS = ("tensor", "tensor_cumulative")


@dataclass(frozen=True, eq=False)
class TensorLca:
    """The LCA of one parameter tensor of one module."""

    module: str
    tensor: str
    allocation: ScalarSeries | None = None  # <root>/tensor/<m>/<p>, per step
    cumulative: ScalarSeries | None = None  # <root>/tensor_cumulative/<m>/<p>

    @property
    def total(self) -> float | None:
        """The last cumulative value, else the sum of the per-step values."""
        if self.cumulative is not None and len(self.cumulative):
            return self.cumulative.last()
        if self.allocation is not None and len(self.allocation):
            return self.allocation.sum()
        return None


def lca_root(run: RunRecords) -> str | None:
    """The tag root of the run's LCA callback (``lca`` by default), None without LCA."""
    if run.lca is None:
        return None
    return run.roots[0] if run.roots else contract.DEFAULT_ROOTS["lca"]


def _from_records(run: RunRecords) -> dict[str, dict[str, TensorLca]]:
    """The per-tensor series the reader filed into ``LcaLayer.tensors`` / ``tensors_cumulative``."""
    assert run.lca is not None
    result: dict[str, dict[str, TensorLca]] = {}
    for module, layer in run.lca.layers.items():
        steps, cumulative = layer.tensors, layer.tensors_cumulative
        for tensor in dict.fromkeys([*steps, *cumulative]):
            result.setdefault(module, {})[tensor] = TensorLca(module, tensor, steps.get(tensor), cumulative.get(tensor))
    return result


def read_tensor_lca(run: RunRecords) -> dict[str, dict[str, TensorLca]]:
    """``{module: {tensor: TensorLca}}`` of the run (modules in the order of its LCA layers);
    empty when it logged no per-tensor series."""
    if run.lca is None:
        return {}
    return _from_records(run)


def tensor_totals(tensors: dict[str, dict[str, TensorLca]]) -> dict[tuple[str, str], float]:
    """``{(module, tensor): cumulative LCA}`` of the tensors with a value, in order."""
    totals = {}
    for module, per_tensor in tensors.items():
        for tensor, series in per_tensor.items():
            if (total := series.total) is not None:
                totals[(module, tensor)] = total
    return totals


def last_histogram(series: HistogramSeries | None) -> Histogram | None:
    """The histogram at the last logged step (None: no series or an empty one)."""
    return series.histograms[-1] if series is not None and len(series) else None


def histogram_mean(histogram: Histogram) -> float:
    """The mean of the histogrammed values, exact: Σ x / n as logged."""
    return histogram.sum / histogram.num if histogram.num else float("nan")


def buckets(histogram: Histogram) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left edges, right edges and counts of the histogram's buckets: bucket i is
    (limit[i−1], limit[i]], the first one starting at the logged minimum and the last
    one ending at the maximum."""
    right = np.minimum(histogram.bucket_limits, histogram.max)
    left = np.concatenate([[histogram.min], histogram.bucket_limits[:-1]])
    return np.minimum(left, right), right, histogram.bucket_counts


def rebin(left: np.ndarray, right: np.ndarray, counts: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Contiguous buckets' counts moved to the bins between ``edges``, each bucket's count
    spread evenly over its width (the cumulative count interpolated linearly at the edges)."""
    cumulative = np.concatenate([[0.0], np.cumsum(counts)])
    return np.diff(np.interp(edges, np.concatenate([left[:1], right]), cumulative))


def histogram_quantile(histogram: Histogram, q: float) -> float:
    """The q-quantile of the histogrammed values, interpolated linearly within the bucket
    that holds it (exact to the bucket's width)."""
    left, right, counts = buckets(histogram)
    cumulative = np.concatenate([[0.0], np.cumsum(counts)])
    return float(np.interp(q * cumulative[-1], cumulative, np.concatenate([left[:1], right])))


def uniform_bins(histogram: Histogram, low: float, high: float, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """The histogram on ``bins`` equal bins over [low, high]: (edges, counts)."""
    edges = np.linspace(low, high, bins + 1)
    return edges, rebin(*buckets(histogram), edges)


def pooled_histogram(histograms: list[Histogram]) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Several histograms of one step pooled into one (left edges, right edges, counts):
    TensorBoard's buckets are one fixed grid trimmed to the data, so buckets with the
    same right limit are the same bucket."""
    if not histograms:
        return None
    counts: dict[float, float] = {}
    lefts: dict[float, float] = {}
    for histogram in histograms:
        for a, b, count in zip(*buckets(histogram)):
            key = float(b)
            counts[key] = counts.get(key, 0.0) + float(count)
            lefts[key] = min(lefts.get(key, float(a)), float(a))
    limits = np.array(sorted(counts))
    return np.array([lefts[k] for k in limits]), limits, np.array([counts[k] for k in limits])


def lca_before(lca_steps: np.ndarray, lca_values: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """Σ of the per-step LCA over the LCA steps < s, for each s in ``steps``: the LCA
    of the updates θ_0 → θ_s that produced the weights NFA measures at step s."""
    order = np.argsort(lca_steps, kind="stable")
    prefix = np.concatenate([[0.0], np.cumsum(np.asarray(lca_values, dtype=np.float64)[order])])
    return prefix[np.searchsorted(np.asarray(lca_steps)[order], steps, side="left")]
