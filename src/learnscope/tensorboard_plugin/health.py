"""The health banner: whether a run's LCA numbers can be trusted, and why not.

Read from the run-level scalars' last values: ``lca/cumulative_relative_error``
(|Σ_t Σᵢ Aᵢ − Σ_t ΔL| / |Σ_t ΔL|), ``lca/capped_steps``, ``lca/skipped_steps`` and
``lca/probe_stochastic``. Standard library only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from learnscope.tensorboard_plugin.columns import finite

__all__ = ["MAX_RELATIVE_ERROR", "health"]

#: above this cumulative relative error the allocations do not add up to the loss change
MAX_RELATIVE_ERROR = 0.01


def health(last: Mapping[str, float], sampled: Sequence[str] = ()) -> dict[str, object]:
    """``{"status": "ok" | "bad" | "unchecked", "reasons": [...], "values": {...}}``.

    Args:
        last: the last value of each run-level metric written (by metric name).
        sampled: modules whose per-step series TensorBoard did not keep whole.
    """
    reasons = []
    error = last.get("cumulative_relative_error")
    if error is not None and not error <= MAX_RELATIVE_ERROR:  # NaN counts as bad
        reasons.append(
            f"cumulative relative error {error:.3g} > {MAX_RELATIVE_ERROR:g}: "
            "the allocations do not add up to the loss change (use a finer rule or rule='adaptive')"
        )
    for metric, why in (
        ("capped_steps", "steps accepted at max_intervals with their error above the target"),
        ("skipped_steps", "steps not measured (non-finite values or a skipped update): totals miss them"),
        ("probe_stochastic", "the probe loss draws random numbers in eval mode: allocations are noisy"),
    ):
        value = last.get(metric)
        if value is not None and not (math.isfinite(value) and value <= 0):
            reasons.append(f"{metric.replace('_', ' ')} = {value:g}: {why}")
    notes = []
    if error is None:
        notes.append("no quadrature error measured (first-order mode): Σ A is not checked against ΔL")
    if sampled:
        notes.append(
            f"TensorBoard kept a sample of the steps of {len(sampled)} per-step series (start it with "
            "--samples_per_plugin scalars=0 to keep all): their heatmap columns are the increase of the "
            "cumulative series over each column (linear between its kept steps); totals are exact"
        )
    status = "bad" if reasons else ("unchecked" if error is None else "ok")
    return {
        "status": status,
        "reasons": reasons,
        "notes": notes,
        "values": {metric: finite(value) for metric, value in last.items()},
    }
