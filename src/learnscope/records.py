"""Measurements as small typed records.

The callbacks produce these; the TensorBoard sink (:mod:`learnscope.tags`), the
offline report and any other consumer read them. Nothing here knows about tags.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor


def add_into(target: dict[str, float], values: Mapping[str, float]) -> None:
    """``target[key] += value`` for every entry of ``values`` (missing keys start at 0)."""
    for key, value in values.items():
        target[key] = target.get(key, 0.0) + value


def _add_fields(into: Any, other: Any) -> None:
    """Add every field of the dataclass ``other`` into ``into`` (same class, no slots)."""
    # through the instance dicts: called per tensor per step, getattr / setattr cost more
    mine = into.__dict__
    for name, value in other.__dict__.items():
        mine[name] += value


@dataclass
class Counts:
    """How many allocations were negative (helped), positive (hurt), non-zero, in all."""

    helped: int = 0
    hurt: int = 0
    nonzero: int = 0
    total: int = 0

    def add(self, other: Counts) -> None:
        _add_fields(self, other)

    @property
    def helped_fraction(self) -> float:
        return self.helped / self.total if self.total else math.nan

    @property
    def hurt_fraction(self) -> float:
        return self.hurt / self.total if self.total else math.nan

    @property
    def helped_fraction_nonzero(self) -> float:
        return self.helped / self.nonzero if self.nonzero else math.nan


@dataclass
class Moments:
    """Raw power sums ``n, s_p = Σ aᵖ`` (p = 1..4) of the allocations, enough for the
    mean, variance, skewness and kurtosis. Central moments come from them in float64:
    μ = s₁/n, m₂ = s₂/n − μ², m₃ = s₃/n − 3μ s₂/n + 2μ³,
    m₄ = s₄/n − 4μ s₃/n + 6μ² s₂/n − 3μ⁴."""

    n: int = 0
    s1: float = 0.0
    s2: float = 0.0
    s3: float = 0.0
    s4: float = 0.0

    def add(self, other: Moments) -> None:
        _add_fields(self, other)

    def over(self, n: int) -> Moments:
        """The moments of the same values with exact zeros dropped, for ``n`` non-zero
        values: zeros add nothing to any power sum, so only the count changes."""
        return Moments(n, self.s1, self.s2, self.s3, self.s4)

    def _central(self) -> tuple[float, float, float] | None:
        """(m₂, m₃, m₄), the population central moments; None when undefined (n < 2, m₂ ≤ 0)."""
        if self.n < 2:
            return None
        n, mean = self.n, self.s1 / self.n
        m2 = self.s2 / n - mean**2
        if m2 <= 0:
            return None
        m3 = self.s3 / n - 3 * mean * self.s2 / n + 2 * mean**3
        m4 = self.s4 / n - 4 * mean * self.s3 / n + 6 * mean**2 * self.s2 / n - 3 * mean**4
        return m2, m3, m4

    @property
    def excess_kurtosis(self) -> float:
        """``m₄ / m₂² − 3 = n Σ(a−μ)⁴ / (Σ(a−μ)²)² − 3`` (0 for a normal distribution; NaN when undefined)."""
        central = self._central()
        return math.nan if central is None else central[2] / central[0] ** 2 - 3.0

    @property
    def skewness(self) -> float:
        """``m₃ / m₂^{3/2} = √n Σ(a−μ)³ / (Σ(a−μ)²)^{3/2}`` (the population skewness g₁;
        0 for a symmetric distribution, negative when the long tail is on the helping side;
        NaN when undefined)."""
        central = self._central()
        return math.nan if central is None else central[1] / central[0] ** 1.5

    def as_list(self) -> list[float]:
        """``[n, s₁, s₂, s₃, s₄]`` (for checkpoints)."""
        return [float(self.n), self.s1, self.s2, self.s3, self.s4]

    @classmethod
    def from_list(cls, values: Sequence[float]) -> Moments:
        n, s1, s2, s3, s4 = values
        return cls(int(n), float(s1), float(s2), float(s3), float(s4))


@dataclass
class CornerStats:
    """One corner of the three-factor ablation: its helped counts and part sums."""

    counts: Counts = field(default_factory=Counts)
    parts: dict[str, float] = field(default_factory=dict)

    def add(self, other: CornerStats) -> None:
        self.counts.add(other.counts)
        add_into(self.parts, other.parts)


@dataclass
class LCAStepRecord:
    """Loss change allocation of one measured optimizer step (or of several steps
    that share one ``global_step``, merged by summing).

    ``delta_loss`` and ``abs_error`` are None when the loss after the step was not
    evaluated (the cheap mode: minibatch probe with the first-order rule).
    """

    step: int
    total: float
    delta_loss: float | None
    splits: int
    counts: Counts
    moments: Moments
    layers: dict[str, float] = field(default_factory=dict)
    layer_counts: dict[str, Counts] = field(default_factory=dict)
    layer_moments: dict[str, Moments] = field(default_factory=dict)
    parts: dict[str, float] = field(default_factory=dict)
    layer_parts: dict[str, dict[str, float]] = field(default_factory=dict)
    units: dict[str, Tensor] = field(default_factory=dict)
    #: tensor_series=True: Σ A of each parameter tensor of the reported modules, by qualified name
    tensors: dict[str, float] = field(default_factory=dict)
    histograms: dict[str, Any] | None = None  # module → StreamingHistogram
    #: parameter_counts=True, on histogram steps: the per-parameter helped fractions over
    #: training, of every parameter and per module (StreamingHistograms)
    param_helped: Any | None = None
    layer_param_helped: dict[str, Any] = field(default_factory=dict)
    ablation: dict[str, CornerStats] = field(default_factory=dict)
    #: The determinism self-check's verdict, on the first measured step only (None elsewhere).
    probe_stochastic: bool | None = None

    @property
    def abs_error(self) -> float | None:
        return None if self.delta_loss is None else abs(self.delta_loss - self.total)

    def _merge_layers(self, other: LCAStepRecord) -> None:
        """Add the per-module sums, counts and power sums of ``other``."""
        add_into(self.layers, other.layers)
        add_into(self.tensors, other.tensors)
        for name, counts in other.layer_counts.items():
            self.layer_counts.setdefault(name, Counts()).add(counts)
        for name, moments in other.layer_moments.items():
            self.layer_moments.setdefault(name, Moments()).add(moments)

    def merge(self, other: LCAStepRecord) -> None:
        self.total += other.total
        if self.delta_loss is not None and other.delta_loss is not None:
            self.delta_loss += other.delta_loss
        else:
            self.delta_loss = None
        self.splits = max(self.splits, other.splits)
        self.counts.add(other.counts)
        self.moments.add(other.moments)
        self._merge_layers(other)
        add_into(self.parts, other.parts)
        for name, parts in other.layer_parts.items():
            add_into(self.layer_parts.setdefault(name, {}), parts)
        for name, values in other.units.items():
            self.units[name] = self.units[name] + values if name in self.units else values
        if other.histograms:
            self.histograms = {**(self.histograms or {}), **other.histograms}
        if other.param_helped is not None:  # made after this record's: counts every tensor so far
            self.param_helped, self.layer_param_helped = other.param_helped, other.layer_param_helped
        if other.probe_stochastic is not None:
            self.probe_stochastic = bool(self.probe_stochastic) or other.probe_stochastic
        for corner, stats in other.ablation.items():
            self.ablation.setdefault(corner, CornerStats()).add(stats)


@dataclass
class NFARecord:
    """Neural Feature Ansatz measurement of every measured layer at one step.

    ``step`` is ``trainer.global_step``: the number of optimizer updates the
    measured weights have received. ``metrics[layer]`` holds the finite values of
    :func:`learnscope.functional.nfa.nfa_metrics` (undefined ones, such as
    ``cnfa_pearson_a1`` before the first update, are left out); ``spectra[layer]``
    the eigenvalues of G compressed to range(W) (:func:`~learnscope.functional.nfa.range_spectrum`);
    ``grams[layer]`` G itself (k×k, float64). ``estimator`` is ``"exact"`` or
    ``"hutchinson"`` (G is then an unbiased estimate). ``readout`` names the layer
    whose output is the model output, where the α = 1 metrics are left out.
    ``matrices[layer]``, filled only when images are due, maps ``"nfm"`` to WᵀW and
    ``"agop_a<α>"`` to AGOP^α (d×d, float64). ``skipped`` is the run's count of
    measurements skipped so far for non-finite values.
    """

    step: int
    metrics: dict[str, dict[str, float]]
    spectra: dict[str, Tensor]
    grams: dict[str, Tensor]
    estimator: str
    readout: str | None = None
    skipped: int = 0
    matrices: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    #: the determinism self-check's verdict, on the first measurement only (None elsewhere)
    probe_stochastic: bool | None = None
