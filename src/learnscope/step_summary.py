"""From one measured step's per-parameter allocations to what is logged: the step's
record (counts, moments, per-module sums, optimizer parts, per-unit sums,
histograms), and the run's cumulative totals.

Nothing here knows about Lightning or about how the step was measured.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor

from learnscope._probe import warn
from learnscope._stats import Delta, ProductStats, StreamingHistogram, product_slices
from learnscope.functional import decompose
from learnscope.functional.lca import LazyDelta, StepAllocation
from learnscope.records import CornerStats, Counts, LCAStepRecord, Moments, add_into

__all__ = ["ParameterCounts", "RunTotals", "SeriesWindow", "StepSummariser", "charted_parts"]

#: Modules with at most this many output units get per-unit allocations (``unit_allocations``).
MAX_UNITS = 512


class StepSummariser:
    """Summarises one step's allocations ``A = k ⊙ Δ`` without materialising ``A``.

    Args:
        tracked: the trainable parameters by qualified name (θ_{t+1} when summarising).
        owner: each parameter's module name (``"root"`` for the top module's own).
        reported: the modules that get per-module sums, counts and histograms.
        stats: the per-tensor statistics (eager or compiled).
        unit_allocations: also sum ``A`` per output unit of modules with at most
            :data:`MAX_UNITS` units.
        tensor_series: also keep Σ A of each parameter tensor of the reported modules
            (``LCAStepRecord.tensors``, by qualified name).
    """

    def __init__(
        self,
        tracked: Mapping[str, Tensor],
        owner: Mapping[str, str],
        reported: set[str],
        stats: ProductStats,
        *,
        unit_allocations: bool,
        tensor_series: bool = False,
        owner_label: str = "LossChangeAllocation",
    ) -> None:
        self.tracked, self.owner, self.reported, self.stats = tracked, owner, reported, stats
        self.unit_allocations, self.tensor_series = unit_allocations, tensor_series
        self.owner_label = owner_label
        self._stale_warned = False

    def statistics(
        self,
        allocation: StepAllocation,
        names: Sequence[str],
        histograms: Sequence[StreamingHistogram | None] | None = None,
    ) -> list[tuple[Counts, Moments]]:
        """Counts and moments of A = k ⊙ Δ for each of ``names`` (histograms filled on the way)."""
        delta = allocation.delta
        operands = [delta.operands(n) if isinstance(delta, LazyDelta) else delta[n] for n in names]
        return self.stats.many([allocation.path_gradient[n] for n in names], operands, list(histograms or []) or None)

    def parts(
        self,
        record: decompose.StepRecord | None,
        names: Sequence[str],
        allocation: StepAllocation,
        totals: Sequence[float] | None = None,
    ) -> list[dict[str, float]]:
        """The part allocations of each of ``names`` (a few fused dot products per tensor,
        read back in one device sync); ``totals``: their Σ k ⊙ Δ when known, so the parts
        sum to exactly what the statistics logged. No ``record`` (decompose off): no parts."""
        splits: list[dict[str, float]] = [{} for _ in names]
        if record is None:
            return splits
        plans, planned = [], []
        for i, name in enumerate(names):
            try:
                plans.append(
                    decompose.plan_part_values(
                        allocation.path_gradient[name],
                        record,
                        self.tracked[name],
                        partial(allocation.delta.__getitem__, name),
                        total=None if totals is None else totals[i],
                        fused=self.stats.compiled,  # compile_statistics, unless compiling failed
                    )
                )
                planned.append(i)
            except RuntimeError as err:  # the gradient or optimizer state changed before we could read it
                if not self._stale_warned:
                    self._stale_warned = True
                    warn(f"{self.owner_label}: no optimizer parts for this step ({err}); the total is unaffected.")
        for i, values in zip(planned, decompose.part_values(plans)):
            splits[i] = values
        return splits

    def corner(
        self, names: Sequence[str], record: decompose.StepRecord | None, allocation: StepAllocation
    ) -> CornerStats:
        """An ablation corner's helped fraction and parts."""
        stats = CornerStats()
        splits = self.parts(record, names, allocation)
        for (counts, _), split in zip(self.statistics(allocation, names), splits):
            stats.counts.add(counts)
            add_into(stats.parts, split)
        return stats

    def summarise(
        self,
        step: int,
        names: Sequence[str],
        record: decompose.StepRecord | None,
        allocation: StepAllocation,
        *,
        histograms: bool,
        with_delta_loss: bool,
    ) -> LCAStepRecord:
        """The step's record; ``total`` is Σ A from the statistics (``allocation.total`` is not read).
        ``histograms``: fill one histogram per reported module (all its tensors)."""
        modules = dict.fromkeys(self.owner[name] for name in names if self.owner[name] in self.reported)
        by_module = {module: StreamingHistogram() for module in modules} if histograms else {}
        hists = [by_module.get(self.owner[name]) for name in names]
        statistics = self.statistics(allocation, names, hists)
        splits = self.parts(record, names, allocation, totals=[m.s1 for _, m in statistics])
        out = LCAStepRecord(
            step=step,
            total=0.0,
            delta_loss=allocation.delta_loss if with_delta_loss else None,
            splits=allocation.splits,
            counts=Counts(),
            moments=Moments(),
            histograms=by_module or None,
        )
        for name, (counts, moments), split in zip(names, statistics, splits):
            out.total += moments.s1
            self._add(out, name, counts, moments, split)
            if self.unit_allocations and self.owner[name] in self.reported:
                _add_units(out.units, self.owner[name], allocation, name)
        return out

    def part_tensors(
        self, record: decompose.StepRecord | None, allocation: StepAllocation, name: str
    ) -> dict[str, Tensor]:
        """The per-part allocation tensors ``k ⊙ Δ_part`` of one parameter (empty without a record)."""
        if record is None:
            return {}
        param, delta = self.tracked[name], allocation.delta[name]
        pieces = decompose.step_parts(record, param, delta, param.detach() - delta)
        k = allocation.path_gradient[name]
        return {part: k * piece for part, piece in pieces.items()}

    def _add(self, out: LCAStepRecord, name: str, counts: Counts, moments: Moments, split: dict[str, float]) -> None:
        """Add one parameter tensor's statistics and parts to the run-level and module sums."""
        out.counts.add(counts)
        out.moments.add(moments)
        add_into(out.parts, split)
        module = self.owner[name]
        if module not in self.reported:
            return
        out.layers[module] = out.layers.get(module, 0.0) + moments.s1
        if self.tensor_series:
            out.tensors[name] = out.tensors.get(name, 0.0) + moments.s1
        # get, then create if missing: ``setdefault(module, Counts())`` would build one per tensor
        module_counts, module_moments = out.layer_counts.get(module), out.layer_moments.get(module)
        if module_counts is None:
            module_counts = out.layer_counts[module] = Counts()
            module_moments = out.layer_moments[module] = Moments()
        assert module_moments is not None  # the two dicts gain their modules together
        module_counts.add(counts)
        module_moments.add(moments)
        if split:
            add_into(out.layer_parts.setdefault(module, {}), split)


def reported_modules(owner: Mapping[str, str], patterns: Sequence[str] | None) -> set[str]:
    """The modules that get per-module tags: every module owning a trainable parameter,
    or those matching a glob of ``patterns`` (a warning when none does)."""
    modules = sorted(set(owner.values()))
    if patterns is not None:
        modules = [m for m in modules if any(fnmatch.fnmatchcase(m, pattern) for pattern in patterns)]
        if not modules:
            warn(f"LossChangeAllocation: no trainable module matches modules={list(patterns)}")
    return set(modules)


def _add_units(units: dict[str, Tensor], module: str, allocation: StepAllocation, name: str) -> None:
    """Σ A per output unit (a unit's weights summed over inputs, plus its bias) in float64."""
    delta = allocation.delta[name]
    if delta.ndim < 1 or delta.shape[0] > MAX_UNITS:
        return
    a = allocation.allocation(name)
    per_unit = a.detach().double().reshape(a.shape[0], -1).sum(1).cpu()
    if module not in units:
        units[module] = per_unit
    elif units[module].shape == per_unit.shape:
        units[module] = units[module] + per_unit


class ParameterCounts:
    """Per parameter, the measured steps on which it helped (A < 0) and hurt (A > 0).

    Two int32 tensors per trainable parameter tensor, of its shape and on its device
    (8 bytes per parameter), and each tensor's count of measured steps T, so that a
    parameter's helped fraction over training is ``helped / T`` (Lan et al.'s per-parameter
    histogram). Updated from k and Δ slice by slice: ``A = k ⊙ Δ`` in the allocation's own
    dtype (bitwise ``StepAllocation.allocation``), with no parameter-sized temporary.
    """

    def __init__(self) -> None:
        self.helped: dict[str, Tensor] = {}
        self.hurt: dict[str, Tensor] = {}
        self.steps: dict[str, int] = {}

    def update(self, allocation: StepAllocation, names: Sequence[str]) -> None:
        """Count one measured step of the tensors ``names`` (Δ read as ``(start, end)`` when not formed)."""
        delta = allocation.delta
        for name in names:
            k = allocation.path_gradient[name]
            if name not in self.helped:
                self.helped[name] = torch.zeros(k.shape, dtype=torch.int32, device=k.device)
                self.hurt[name] = torch.zeros(k.shape, dtype=torch.int32, device=k.device)
            elif self.helped[name].device != k.device:  # restored from a checkpoint (saved on CPU)
                self.helped[name], self.hurt[name] = self.helped[name].to(k.device), self.hurt[name].to(k.device)
            d = delta.operands(name) if isinstance(delta, LazyDelta) else delta[name]
            _count_signs(k, d, self.helped[name], self.hurt[name])
            self.steps[name] = self.steps.get(name, 0) + 1

    def helped_fractions(
        self, owner: Mapping[str, str], reported: set[str]
    ) -> tuple[StreamingHistogram, dict[str, StreamingHistogram]]:
        """Histograms of helped / T over every counted parameter, and per reported module."""
        overall, modules = StreamingHistogram(), dict[str, StreamingHistogram]()
        for name, helped in self.helped.items():
            module = modules.setdefault(owner[name], StreamingHistogram()) if owner.get(name) in reported else None
            flat, steps = helped.view(-1), max(1, self.steps[name])
            # slice by slice: a float64 copy of a whole counter would be twice its parameter's bytes
            for start in range(0, flat.numel(), _FRACTION_SLICE):
                fraction = flat[start : start + _FRACTION_SLICE].double() / steps
                overall.add(fraction)
                if module is not None:
                    module.add(fraction)
        return overall, modules

    def copies(self) -> dict[str, tuple[Tensor, Tensor]]:
        return {name: (self.helped[name].clone(), self.hurt[name].clone()) for name in self.helped}

    def state_dict(self) -> dict[str, Any]:
        return {
            "helped": {name: t.cpu() for name, t in self.helped.items()},
            "hurt": {name: t.cpu() for name, t in self.hurt.items()},
            "steps": dict(self.steps),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore (the tensors move to their parameter's device at the next update)."""
        self.helped = {n: t.to(dtype=torch.int32) for n, t in state.get("helped", {}).items()}
        self.hurt = {n: t.to(dtype=torch.int32) for n, t in state.get("hurt", {}).items()}
        self.steps = {n: int(v) for n, v in state.get("steps", {}).items()}


_FRACTION_SLICE = 1 << 16  # counters per slice of the helped-fraction histograms (512 KiB of float64)


def _count_signs(k: Tensor, delta: Delta, helped: Tensor, hurt: Tensor) -> None:
    """``helped += (k ⊙ Δ < 0)``, ``hurt += (k ⊙ Δ > 0)``, slice by slice (:func:`product_slices`)."""
    flat_helped, flat_hurt = helped.view(-1), hurt.view(-1)
    for where, a in product_slices(k, delta):
        flat_helped[where] += a < 0
        flat_hurt[where] += a > 0


class SeriesWindow:
    """The per-layer step series of one logging window: its measured steps' records merged.

    Windows are ``[w·N, (w+1)·N)`` of ``global_step`` with N = ``trainer.log_every_n_steps``.
    Merging (:meth:`LCAStepRecord.merge`) sums each module's, part's, tensor's and unit's
    allocation over the window, and each module's counts and power sums, so that a
    window's helped fraction is Σ_t helped_t / Σ_t n_t and its skewness that of the pooled
    power sums: the statistic over the window's parameters × steps. The merged record's
    ``step`` is the window's last measured step.
    """

    def __init__(self) -> None:
        self.record: LCAStepRecord | None = None
        self.steps = 0  # measured steps merged so far
        self.index = -1  # w of the open window

    def holds(self, step: int, length: int) -> bool:
        """Whether ``step`` belongs to the open window (True when none is open)."""
        return self.record is None or step // length == self.index

    def add(self, record: LCAStepRecord, length: int) -> None:
        if self.record is None:
            self.record = LCAStepRecord(
                step=record.step, total=0.0, delta_loss=None, splits=0, counts=Counts(), moments=Moments()
            )
            self.index = record.step // length
        self.record.merge(record)
        self.record.step = record.step
        self.steps += 1

    def take(self) -> tuple[LCAStepRecord, int] | None:
        """The window's merged record and its number of measured steps; the window is then empty."""
        if self.record is None:
            return None
        taken = (self.record, self.steps)
        self.record, self.steps, self.index = None, 0, -1
        return taken


def charted_parts(cumulative_parts: Mapping[str, float], relative: float = 1e-4) -> tuple[str, ...]:
    """The optimizer parts worth a chart: those whose cumulative allocation over all modules
    exceeds ``relative`` × the largest part's in magnitude (an exactly modelled optimizer's
    ``residual`` is rounding, and SGD without weight decay has a ``weight_decay`` part of 0)."""
    run_level = {key: abs(value) for key, value in cumulative_parts.items() if "/" not in key}
    largest = max(run_level.values(), default=0.0)
    return tuple(part for part in decompose.PARTS if run_level.get(part, 0.0) > relative * largest > 0.0)


@dataclass
class RunTotals:
    """The run's cumulative LCA state, saved in checkpoints (``state_dict``).

    Attributes:
        cumulative: Σ over measured steps of each reported module's allocation.
        cumulative_parts: the same per part, keyed ``<part>`` and ``<part>/<module>``.
        cumulative_tensors: the same per parameter tensor (``tensor_series=True``), keyed by
            its qualified name (``net.0.weight``).
        sum_total: Σ_t Σ_i A over measured steps.
        sum_delta_loss: Σ_t ΔL over the steps whose loss change was evaluated.
        sum_total_with_loss: Σ_t Σ_i A over those same steps.
        measured_steps, skipped_steps, capped_steps: step counts.
        last_histogram_step: the step of the last histograms (their cadence resumes too).
        moments: the raw power sums n, Σa, Σa², Σa³, Σa⁴ of every allocation of every
            measured step (all parameters pooled), for ``lca/skewness_pooled`` and
            ``lca/excess_kurtosis_pooled``.
    """

    cumulative: dict[str, float] = field(default_factory=dict)
    cumulative_parts: dict[str, float] = field(default_factory=dict)
    cumulative_tensors: dict[str, float] = field(default_factory=dict)
    sum_total: float = 0.0
    sum_delta_loss: float = 0.0
    sum_total_with_loss: float = 0.0
    measured_steps: int = 0
    skipped_steps: int = 0
    capped_steps: int = 0
    last_histogram_step: int | None = None
    moments: Moments = field(default_factory=Moments)

    def add(self, record: LCAStepRecord) -> None:
        """Count one measured step."""
        self.measured_steps += 1
        self.sum_total += record.total
        if record.delta_loss is not None:
            self.sum_delta_loss += record.delta_loss
            self.sum_total_with_loss += record.total
        add_into(self.cumulative, record.layers)
        add_into(self.cumulative_tensors, record.tensors)
        self.moments.add(record.moments)
        add_into(self.cumulative_parts, record.parts)
        for module, parts in record.layer_parts.items():
            add_into(self.cumulative_parts, {f"{part}/{module}": value for part, value in parts.items()})

    def histogram_due(self, step: int, every: int) -> bool:
        """Histograms at most every ``every`` steps (``trainer.log_every_n_steps``)."""
        last = self.last_histogram_step
        return last is None or step - last >= max(1, every)

    @property
    def cumulative_relative_error(self) -> float:
        """``|Σ_t Σ_i A − Σ_t ΔL| / |Σ_t ΔL|`` over the steps whose ΔL was evaluated (NaN without any)."""
        if self.sum_delta_loss == 0.0:
            return math.nan
        return abs(self.sum_total_with_loss - self.sum_delta_loss) / abs(self.sum_delta_loss)

    def state_dict(self) -> dict[str, Any]:
        return {
            "cumulative": dict(self.cumulative),
            "sum_total": self.sum_total,
            "sum_delta_loss": self.sum_delta_loss,
            "sum_total_with_loss": self.sum_total_with_loss,
            "skipped_steps": self.skipped_steps,
            "capped_steps": self.capped_steps,
            "measured_steps": self.measured_steps,
            "cumulative_parts": dict(self.cumulative_parts),
            "cumulative_tensors": dict(self.cumulative_tensors),
            "last_histogram_step": self.last_histogram_step,
            "moments": self.moments.as_list(),
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> RunTotals:
        last, moments = state.get("last_histogram_step"), state.get("moments")
        return cls(
            cumulative=dict(state.get("cumulative", {})),
            cumulative_parts=dict(state.get("cumulative_parts", {})),
            cumulative_tensors=dict(state.get("cumulative_tensors", {})),
            sum_total=float(state.get("sum_total", 0.0)),
            sum_delta_loss=float(state.get("sum_delta_loss", 0.0)),
            sum_total_with_loss=float(state.get("sum_total_with_loss", 0.0)),
            measured_steps=int(state.get("measured_steps", 0)),
            skipped_steps=int(state.get("skipped_steps", 0)),
            capped_steps=int(state.get("capped_steps", 0)),
            last_histogram_step=None if last is None else int(last),
            # checkpoints written before the pooled moments existed start them afresh
            moments=Moments() if moments is None else Moments.from_list(moments),
        )
