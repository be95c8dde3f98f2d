"""Tag names (public API) for the records the callbacks produce.

Every tag starts with its callback's ``name`` (the *root*: ``lca`` and ``nfa`` by
default), so that several callbacks of one kind can log into one run."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from learnscope.records import LCAStepRecord


def lca_scalars(
    record: LCAStepRecord, cumulative: Mapping[str, float], cumulative_relative_error: float, root: str = "lca"
) -> dict[str, float]:
    """Scalars of one measured step: run-level ``lca/*`` and per-module ``lca/<kind>/<module>``."""
    out: dict[str, float] = {
        f"{root}/total": record.total,
        f"{root}/splits": float(record.splits),
        f"{root}/helped_fraction": record.counts.helped_fraction,
        f"{root}/hurt_fraction": record.counts.hurt_fraction,
        f"{root}/helped_fraction_nonzero": record.counts.helped_fraction_nonzero,
    }
    kurtosis = record.moments.excess_kurtosis
    if math.isfinite(kurtosis):
        out[f"{root}/excess_kurtosis"] = kurtosis
    # frozen or never-reached parameters (A = 0 exactly) pile up at 0 and inflate the all-parameter kurtosis
    kurtosis_nonzero = record.moments.over(record.counts.nonzero).excess_kurtosis
    if math.isfinite(kurtosis_nonzero):
        out[f"{root}/excess_kurtosis_nonzero"] = kurtosis_nonzero
    if record.probe_stochastic is not None:
        out[f"{root}/probe_stochastic"] = float(record.probe_stochastic)
    if record.delta_loss is not None:
        out[f"{root}/delta_loss"] = record.delta_loss
        out[f"{root}/abs_error"] = abs(record.delta_loss - record.total)
        if math.isfinite(cumulative_relative_error):
            out[f"{root}/cumulative_relative_error"] = cumulative_relative_error
    for module, value in record.layers.items():
        counts = record.layer_counts[module]
        out[f"{root}/layer/{module}"] = value
        out[f"{root}/layer_cumulative/{module}"] = cumulative[module]
        out[f"{root}/helped_fraction/{module}"] = counts.helped_fraction
        out[f"{root}/hurt_fraction/{module}"] = counts.hurt_fraction
    for part, value in record.parts.items():
        out[f"{root}/part/{part}"] = value
    for module, parts in record.layer_parts.items():
        for part, value in parts.items():
            out[f"{root}/part/{part}/{module}"] = value
    for corner, stats in record.ablation.items():
        out[f"{root}/ablation/{corner}/helped_fraction"] = stats.counts.helped_fraction
        for part, value in stats.parts.items():
            out[f"{root}/ablation/{corner}/part/{part}"] = value
    for module, values in record.units.items():
        for unit, value in enumerate(values.tolist()):
            out[f"{root}/unit/{module}/{unit}"] = value
    return out


LCA_CAPPED_STEPS = "capped_steps"


def lca_capped(capped_steps: int, root: str = "lca") -> dict[str, float]:
    """``lca/capped_steps``: how many steps so far ``rule="adaptive"`` accepted at
    ``max_intervals`` with their error above the target (cumulative, like ``lca/skipped_steps``)."""
    return {f"{root}/{LCA_CAPPED_STEPS}": float(capped_steps)}


def lca_part_cumulative(cumulative_parts: Mapping[str, float], root: str = "lca") -> dict[str, float]:
    """``lca/part_cumulative/<part>`` and ``lca/part_cumulative/<part>/<module>`` from a
    flat mapping keyed ``<part>`` or ``<part>/<module>``."""
    return {f"{root}/part_cumulative/{key}": value for key, value in cumulative_parts.items()}


def lca_histograms(values: Mapping[str, Any], root: str = "lca") -> dict[str, Any]:
    return {f"{root}/hist/{module}": tensor for module, tensor in values.items()}


# --------------------------------------------------------------------------- NFA

from learnscope.records import NFARecord  # noqa: E402  (kept beside the NFA tags)



def nfa_scalars(record: NFARecord, root: str = "nfa") -> dict[str, float]:
    """``nfa/<layer>/<metric>`` for every measured metric, and the run's ``nfa/skipped`` count."""
    out = {
        f"{root}/{layer}/{metric}": value
        for layer, metrics in record.metrics.items()
        for metric, value in metrics.items()
    }
    out[f"{root}/skipped"] = float(record.skipped)
    if record.probe_stochastic is not None:
        out[f"{root}/probe_stochastic"] = float(record.probe_stochastic)
    return out


def nfa_skipped(skipped: int, root: str = "nfa") -> dict[str, float]:
    """The scalar written when a whole measurement is skipped."""
    return {f"{root}/skipped": float(skipped)}


def nfa_histograms(record: NFARecord, root: str = "nfa") -> dict[str, Tensor]:
    """``nfa/<layer>/spectrum``: eigenvalues of G compressed to range(W)."""
    return {f"{root}/{layer}/spectrum": spectrum for layer, spectrum in record.spectra.items()}


def nfa_images(record: NFARecord, root: str = "nfa") -> dict[str, dict[str, Tensor]]:
    """``nfa/<layer>/matrices``: the matrices to draw side by side (WᵀW, AGOP^α, ...)."""
    return {f"{root}/{layer}/matrices": matrices for layer, matrices in record.matrices.items()}
