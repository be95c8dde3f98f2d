"""Tag names (public API) for the records the callbacks produce."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

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
    # frozen or never-reached parameters (A = 0 exactly) pile up at 0 and inflate the all-parameter kurtosis
    kurtosis_nonzero = record.moments.over(record.counts.nonzero).excess_kurtosis
    if math.isfinite(kurtosis_nonzero):
        out["lca/excess_kurtosis_nonzero"] = kurtosis_nonzero
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
    for corner, stats in record.ablation.items():
        out[f"lca/ablation/{corner}/helped_fraction"] = stats.counts.helped_fraction
        for part, value in stats.parts.items():
            out[f"lca/ablation/{corner}/part/{part}"] = value
    for module, values in record.units.items():
        for unit, value in enumerate(values.tolist()):
            out[f"lca/unit/{module}/{unit}"] = value
    return out


LCA_CAPPED_STEPS = "lca/capped_steps"


def lca_capped(capped_steps: int) -> dict[str, float]:
    """``lca/capped_steps``: how many steps so far ``rule="adaptive"`` accepted at
    ``max_intervals`` with their error above the target (cumulative, like ``lca/skipped_steps``)."""
    return {LCA_CAPPED_STEPS: float(capped_steps)}


def lca_part_cumulative(cumulative_parts: Mapping[str, float]) -> dict[str, float]:
    """``lca/part_cumulative/<part>`` and ``lca/part_cumulative/<part>/<module>`` from a
    flat mapping keyed ``<part>`` or ``<part>/<module>``."""
    return {f"lca/part_cumulative/{key}": value for key, value in cumulative_parts.items()}


def lca_histograms(values: Mapping[str, Any]) -> dict[str, Any]:
    return {f"lca/hist/{module}": tensor for module, tensor in values.items()}


# --------------------------------------------------------------------------- NFA

from learnscope.records import NFARecord  # noqa: E402  (kept beside the NFA tags)

NFA_SKIPPED = "nfa/skipped"


def nfa_scalars(record: NFARecord) -> dict[str, float]:
    """``nfa/<layer>/<metric>`` for every measured metric, and the run's ``nfa/skipped`` count."""
    out = {
        f"nfa/{layer}/{metric}": value
        for layer, metrics in record.metrics.items()
        for metric, value in metrics.items()
    }
    out[NFA_SKIPPED] = float(record.skipped)
    return out


def nfa_skipped(skipped: int) -> dict[str, float]:
    """The scalar written when a whole measurement is skipped."""
    return {NFA_SKIPPED: float(skipped)}


def nfa_histograms(record: NFARecord) -> dict[str, Tensor]:
    """``nfa/<layer>/spectrum``: eigenvalues of G compressed to range(W)."""
    return {f"nfa/{layer}/spectrum": spectrum for layer, spectrum in record.spectra.items()}


def nfa_images(record: NFARecord) -> dict[str, dict[str, Tensor]]:
    """``nfa/<layer>/matrices``: the matrices to draw side by side (WᵀW, AGOP^α, ...)."""
    return {f"nfa/{layer}/matrices": matrices for layer, matrices in record.matrices.items()}
