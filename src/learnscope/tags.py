"""Tag names (public API) for the records the callbacks produce."""

from __future__ import annotations

import math
from collections.abc import Mapping

from torch import Tensor

from learnscope.records import LCAStepRecord


def lca_scalars(record: LCAStepRecord, cumulative: Mapping[str, float], cumulative_relative_error: float) -> dict[str, float]:
    """Scalars of one measured step: run-level ``lca/*`` and per-module ``lca/<kind>/<module>``."""
    out: dict[str, float] = {
        "lca/total": record.total,
        "lca/splits": float(record.splits),
        "lca/helped_fraction": record.counts.helped_fraction,
        "lca/hurt_fraction": record.counts.hurt_fraction,
        "lca/helped_fraction_nonzero": record.counts.helped_fraction_nonzero,
    }
    kurtosis = record.moments.excess_kurtosis
    if math.isfinite(kurtosis):
        out["lca/excess_kurtosis"] = kurtosis
    if record.delta_loss is not None:
        out["lca/delta_loss"] = record.delta_loss
        out["lca/abs_error"] = abs(record.delta_loss - record.total)
        if math.isfinite(cumulative_relative_error):
            out["lca/cumulative_relative_error"] = cumulative_relative_error
    for module, value in record.layers.items():
        counts = record.layer_counts[module]
        out[f"lca/layer/{module}"] = value
        out[f"lca/layer_cumulative/{module}"] = cumulative[module]
        out[f"lca/helped_fraction/{module}"] = counts.helped_fraction
        out[f"lca/hurt_fraction/{module}"] = counts.hurt_fraction
    for part, value in record.parts.items():
        out[f"lca/part/{part}"] = value
    for module, parts in record.layer_parts.items():
        for part, value in parts.items():
            out[f"lca/part/{part}/{module}"] = value
    return out


def lca_histograms(values: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {f"lca/hist/{module}": tensor for module, tensor in values.items()}
