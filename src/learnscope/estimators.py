"""LCA step estimators: one class per way of measuring an optimizer step θ_t → θ_{t+1}.

* :class:`AppliedGradientFirstOrder` (the cheap mode): ``A = g ⊙ Δ`` with the gradient
  the optimizer applied; no probe pass.
* :class:`ProbePathIntegral`: ``A = k ⊙ Δ`` with ``k`` the path-averaged gradient of a
  probe loss by a quadrature rule (:func:`learnscope.functional.lca.allocate_step`).
* :class:`Ablation`: a main estimator plus the other corners of {minibatch, probe}
  loss × {first order, the rule}, composed from the two above.

Each estimator owns its buffers: the θ_t copies, the reusable end-point evaluation.
The callback calls, for every optimizer step, :meth:`StepEstimator.before_update`;
for a measured step, :meth:`~StepEstimator.begin` in the optimizer's pre-step hook,
:meth:`~StepEstimator.after_update` in its post-step hook, and, once θ_{t+1} is final,
:meth:`~StepEstimator.finish`, then :meth:`~StepEstimator.release` (and
:meth:`~StepEstimator.accept` when the step's record was kept).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor

from learnscope import _compat, tags
from learnscope._probe import ProbeError, ProbeLosses, ProbeObjective, ShardedObjective
from learnscope.config import LCAConfig
from learnscope.functional import decompose, sharded
from learnscope.functional.lca import (
    Evaluation,
    LazyDelta,
    StepAllocation,
    allocate_step,
    first_order_step,
    step_delta,
)
from learnscope.records import CornerStats, LCAStepRecord

__all__ = [
    "Ablation",
    "AppliedGradientFirstOrder",
    "Measurement",
    "ProbePathIntegral",
    "ShardedSteps",
    "StepEstimator",
    "StepEvent",
    "build_estimator",
    "check_sharded_config",
    "corner_name",
]

Params = Mapping[str, Tensor]


@dataclass(eq=False)
class StepEvent:
    """One real optimizer update, from its pre-step hook to its measurement.

    ``start`` holds θ_t of ``names`` (the parameters this optimizer moves);
    ``record`` the optimizer's state for the decomposition (None: decompose off);
    ``applied_gradient`` the gradient the optimizer used, read right after the update;
    ``start_evaluation`` the probe loss and gradient at θ_t when already known;
    ``minibatches`` the ``(batch, batch_idx)`` micro-batches of the step."""

    step: int
    optimizer: torch.optim.Optimizer
    names: list[str]
    start: dict[str, Tensor] = field(default_factory=dict)
    record: decompose.StepRecord | None = None
    applied_gradient: dict[str, Tensor] | None = None
    start_evaluation: Evaluation | None = None
    minibatches: list[tuple[Any, int]] = field(default_factory=list)
    done: bool = False


@dataclass
class Measurement:
    """A measured step: the main allocation, and the ablation's corners (if any)."""

    allocation: StepAllocation
    corners: dict[str, CornerStats] = field(default_factory=dict)


corner_name = tags.lca_ablation_corner  # ``<data>_<rule>``: probe_first_order, batch_simpson, ...


def _applied_gradient(params: Params, names: list[str]) -> dict[str, Tensor]:
    gradients = {n: params[n].grad for n in names}
    return {n: torch.zeros_like(params[n]) if g is None else g.detach() for n, g in gradients.items()}


class StepEstimator:
    """How one optimizer step is measured (see the module docstring for the call order)."""

    #: Whether ``after_update`` must keep the gradient the optimizer applied.
    needs_applied_gradient = False
    #: Whether the step's micro-batches must be kept for ``finish``.
    needs_minibatches = False
    #: Whether the measurement evaluates ΔL = L(θ_{t+1}) − L(θ_t) (else ``delta_loss`` is NaN).
    evaluates_loss = False

    def before_update(self, params: Params) -> None:
        """Any optimizer step is about to move θ (measured or not)."""

    def begin(self, event: StepEvent, params: Params) -> None:
        """Keep θ_t of ``event.names``."""
        event.start = {n: params[n].detach().clone() for n in event.names}

    def after_update(self, event: StepEvent, params: Params) -> None:
        """The update has been applied (``params`` hold θ_{t+1} unless another optimizer steps later)."""
        if self.needs_applied_gradient:
            # Lightning runs the closure (forward, backward) inside optimizer.step, after the
            # pre-hook: the gradient the optimizer applied exists only from here on.
            event.applied_gradient = _applied_gradient(params, event.names)

    def finish(self, event: StepEvent, live: Params) -> Measurement:
        """Measure the step; ``live`` holds θ_{t+1} of every tracked parameter."""
        raise NotImplementedError

    def release(self, event: StepEvent) -> None:
        """The measurement is over (kept or skipped): buffers may be reused."""

    def accept(self, measurement: Measurement, params: Params) -> None:
        """The step's record was kept (finite)."""

    def discard(self) -> None:
        """A step was skipped: drop anything carried to the next step."""

    def reduce_record(self, record: LCAStepRecord) -> None:
        """Complete the step's record over ranks (sharded parameters only; see :class:`ShardedSteps`)."""

    def reset(self) -> None:
        """The fit ended: free every buffer."""


class AppliedGradientFirstOrder(StepEstimator):
    """``A = g ⊙ Δ`` with ``g`` the gradient the optimizer applied (no probe pass).

    With ``keep_start=False`` the θ_t copies become Δ when Δ is first read, and are
    reused for the next step's θ_t (no allocation, no page faults); the per-step
    statistics read θ_t and θ_{t+1} directly, so Δ is formed only where something needs
    it (decomposition, per-unit sums, ``observe``)."""

    needs_applied_gradient = True

    def __init__(self, *, keep_start: bool = False) -> None:
        self.keep_start = keep_start
        self._free: dict[tuple[str, ...], dict[str, Tensor]] = {}  # θ_t buffers to reuse, per optimizer

    def begin(self, event: StepEvent, params: Params) -> None:
        buffers = self._free.pop(tuple(event.names), None)
        live = [params[n].detach() for n in event.names]
        if buffers is None or not all(
            b.shape == p.shape and b.dtype == p.dtype and b.device == p.device for b, p in zip(buffers.values(), live)
        ):
            super().begin(event, params)
            return
        for buffer, param in zip(buffers.values(), live):
            buffer.copy_(param)
        event.start = buffers

    def finish(self, event: StepEvent, live: Params) -> Measurement:
        assert event.applied_gradient is not None
        delta = LazyDelta(event.start, live, in_place=not self.keep_start)
        return Measurement(first_order_step(event.applied_gradient, delta))

    def release(self, event: StepEvent) -> None:
        if not self.keep_start:  # nothing keeps the θ_t copies (now Δ) past the measurement
            self._free[tuple(event.names)] = event.start

    def reset(self) -> None:
        self._free = {}


class ProbePathIntegral(StepEstimator):
    """``A = k ⊙ Δ`` with ``k`` the path-averaged gradient of a probe loss.

    ``data="probe"``: the fixed probe set; the end point's evaluation is reused as the
    next step's start when no parameter changed in between (checked with the tensors'
    version counters). ``data="batch"``: the step's own micro-batches. With
    ``keep_start=False`` the θ_t copies become Δ (``simpson``)."""

    evaluates_loss = True

    def __init__(self, losses: ProbeLosses, config: LCAConfig, *, data: str, keep_start: bool = False) -> None:
        self.losses, self.config, self.data, self.keep_start = losses, config, data, keep_start
        self.needs_minibatches = data == "batch"
        self._cache: Evaluation | None = None
        self._cache_versions: tuple[int, ...] | None = None
        self._reusable: Evaluation | None = None

    def before_update(self, params: Params) -> None:
        cache, self._cache = self._cache, None  # any step moves θ: the cache is used now or never
        fresh = self.agree(cache is not None and self._cache_versions == _versions(params))
        self._reusable = cache if fresh else None

    @staticmethod
    def agree(fresh: bool) -> bool:
        """Whether every rank may reuse its cached end point (sharded: a collective, see
        :class:`ShardedSteps`; FSDP needs every rank to run the same forwards)."""
        return fresh

    def begin(self, event: StepEvent, params: Params) -> None:
        super().begin(event, params)
        event.start_evaluation, self._reusable = self._reusable, None

    def objective(self, event: StepEvent, start: Params) -> ProbeObjective | ShardedObjective:
        """The step's probe loss, after the once-per-run determinism self-check at θ_t."""
        objective = self.losses.objective(self.data, event.minibatches)
        self.losses.check_once(objective, start)
        return objective

    def finish(self, event: StepEvent, live: Params) -> Measurement:
        start = {**live, **event.start}
        config = self.config
        allocation = allocate_step(
            self.objective(event, start),
            start,
            live,
            **config.quadrature,
            start_evaluation=event.start_evaluation,
            compute_total=False,  # the summary sums A anyway
            start_is_workspace=not self.keep_start,
        )
        return Measurement(allocation)

    def accept(self, measurement: Measurement, params: Params) -> None:
        if self.data == "probe" and measurement.allocation.end is not None:
            self._cache, self._cache_versions = measurement.allocation.end, _versions(params)

    def discard(self) -> None:
        self._cache = None

    def reset(self) -> None:
        self._cache = self._reusable = None


def _versions(params: Params) -> tuple[int, ...]:
    return tuple(_compat.tensor_version(p) for p in params.values())


CornerFn = Callable[[StepEvent, StepAllocation], CornerStats]


class Ablation(StepEstimator):
    """The main estimator's allocation, plus the other corners of {batch, probe} loss ×
    {first order, ``rule``}, each summarised by ``corner`` into its helped fraction and
    parts (``<data>_<rule>``, see :func:`corner_name`)."""

    needs_applied_gradient = True
    needs_minibatches = True

    def __init__(self, main: StepEstimator, losses: ProbeLosses, config: LCAConfig, corner: CornerFn) -> None:
        self.main, self.losses, self.config, self.corner = main, losses, config, corner
        self.evaluates_loss = main.evaluates_loss

    def before_update(self, params: Params) -> None:
        self.main.before_update(params)

    def begin(self, event: StepEvent, params: Params) -> None:
        self.main.begin(event, params)

    def finish(self, event: StepEvent, live: Params) -> Measurement:
        data, rule = self.config.data, self.config.rule
        corners: dict[str, CornerStats] = {}
        start = {**live, **event.start}
        if isinstance(self.main, ProbePathIntegral) and rule != "first_order":
            if event.start_evaluation is None:
                event.start_evaluation = self.main.objective(event, start)(start)
            # before the integral reuses the start gradient's buffers as workspace
            first = first_order_step(event.start_evaluation.gradient, step_delta(event.start, live))
            corners[corner_name(data, "first_order")] = self.corner(event, first)
        measurement = self.main.finish(event, live)
        corners[corner_name(data, rule)] = self.corner(event, measurement.allocation)
        self._other_corners(event, start, live, corners)
        measurement.corners = corners
        return measurement

    def _other_corners(self, event: StepEvent, start: Params, live: Params, corners: dict[str, CornerStats]) -> None:
        config = self.config
        if event.applied_gradient is not None and corner_name("batch", "first_order") not in corners:
            first = first_order_step(event.applied_gradient, step_delta(event.start, live))
            corners[corner_name("batch", "first_order")] = self.corner(event, first)
        if config.rule != "first_order":
            other = "probe" if config.data == "batch" else "batch"
            integral = allocate_step(
                self.losses.objective(other, event.minibatches), start, live, **config.quadrature, compute_total=False
            )
            corners[corner_name(other, config.rule)] = self.corner(event, integral)
        if corner_name("probe", "first_order") not in corners:
            first = allocate_step(
                self.losses.objective("probe"),
                start,
                live,
                rule="first_order",
                evaluate_end=False,
                compute_total=False,
            )
            corners[corner_name("probe", "first_order")] = self.corner(event, first)

    def release(self, event: StepEvent) -> None:
        self.main.release(event)

    def accept(self, measurement: Measurement, params: Params) -> None:
        self.main.accept(measurement, params)

    def discard(self) -> None:
        self.main.discard()

    def reset(self) -> None:
        self.main.reset()


class ShardedSteps(StepEstimator):
    """``inner`` on this rank's local shards of FSDP2-sharded parameters (docs/fsdp.md).

    θ_t, Δ, k and the applied gradient are local shards (``DTensor.to_local()``): memory
    scales with the shard, not the model. Probe losses are evaluated through the sharded
    module (:class:`learnscope._probe.ShardedObjective`), so every rank runs the same
    forwards. The step's record, computed from the local shards, is summed over ranks in
    one all-reduce of a small float64 vector (:meth:`reduce_record`); histograms stay
    this rank's sample. The reuse of the end point is agreed by all ranks (one all-reduce
    of one integer per optimizer step), so no rank skips an evaluation the others run."""

    def __init__(
        self, inner: StepEstimator, local: dict[str, Tensor], all_reduce: Callable[[Tensor, str], Tensor]
    ) -> None:
        self.inner, self.all_reduce = inner, all_reduce
        self.local = local  # name → the view of this rank's shard, shared with the summariser
        self.needs_applied_gradient = inner.needs_applied_gradient
        self.needs_minibatches = inner.needs_minibatches
        self.evaluates_loss = inner.evaluates_loss
        if isinstance(inner, ProbePathIntegral):
            inner.agree = self._agree  # type: ignore[method-assign]

    def _agree(self, fresh: bool) -> bool:
        return bool(self.all_reduce(torch.tensor([int(fresh)], dtype=torch.float64), "min")[0])

    def before_update(self, params: Params) -> None:
        # in place: the summariser holds this dict; FSDP may re-pad a shard (``reset_sharded_param``)
        self.local.update(sharded.local_views(params))
        self.inner.before_update(self.local)

    def begin(self, event: StepEvent, params: Params) -> None:
        self.inner.begin(event, self.local)

    def after_update(self, event: StepEvent, params: Params) -> None:
        if self.needs_applied_gradient:
            event.applied_gradient = {n: sharded.local_gradient(params[n]) for n in event.names}
        if event.record is not None:
            _localise(event.record, {params[n]: self.local[n] for n in self.local})

    def finish(self, event: StepEvent, live: Params) -> Measurement:
        return self.inner.finish(event, self.local)

    def release(self, event: StepEvent) -> None:
        self.inner.release(event)

    def accept(self, measurement: Measurement, params: Params) -> None:
        self.inner.accept(measurement, self.local)

    def discard(self) -> None:
        self.inner.discard()

    def reset(self) -> None:
        self.inner.reset()

    def reduce_record(self, record: LCAStepRecord) -> None:
        """Sum the record's additive fields over ranks in place (ΔL is already global)."""
        fields = _additive_fields(record)
        total = self.all_reduce(torch.tensor([v for _, v in fields], dtype=torch.float64), "sum")
        for (setter, _), value in zip(fields, total.tolist()):
            setter(value)


def _localise(record: decompose.StepRecord, views: Mapping[Tensor, Tensor]) -> None:
    """Re-key a captured optimizer step from the sharded parameters to the views of their local
    shards, with each gradient and state tensor's local shard: the decomposition is elementwise,
    so it then runs unchanged on this rank's shard. (Reads ``StepRecord``'s fields; a public
    ``StepRecord.mapped`` in :mod:`learnscope.functional.decompose` would replace this.)"""
    record._group_of = {views.get(p, p): g for p, g in record._group_of.items()}
    record._first_step = {views.get(p, p): f for p, f in record._first_step.items()}
    entries = {}
    for param, entry in record._params.items():
        if entry.grad is not None:
            grad, state = sharded.local(entry.grad), {k: sharded.local(v) for k, v in entry.state.items()}
            versions = (_compat.tensor_version(grad), *(_compat.tensor_version(t) for t in state.values()))
            entry = dataclasses.replace(entry, grad=grad, state=state, versions=versions)
        entries[views.get(param, param)] = entry
    record._params = entries


def _additive_fields(record: LCAStepRecord) -> list[tuple[Callable[[float], None], float]]:
    """Every additive number of a step record, with a setter, in an order every rank shares
    (sorted module and part names; the same parameters and parts on every rank)."""
    out: list[tuple[Callable[[float], None], float]] = [(partial(setattr, record, "total"), record.total)]
    out += _dataclass_fields(record.counts) + _dataclass_fields(record.moments)
    for module in sorted(record.layers):
        out.append((partial(record.layers.__setitem__, module), record.layers[module]))
        out += _dataclass_fields(record.layer_counts[module]) + _dataclass_fields(record.layer_moments[module])
    for parts in [record.parts, *(record.layer_parts[m] for m in sorted(record.layer_parts))]:
        out += [(partial(parts.__setitem__, key), parts[key]) for key in sorted(parts)]
    return out


def _dataclass_fields(obj: Any) -> list[tuple[Callable[[float], None], float]]:
    """(setter, value) of each numeric field of a Counts or Moments (ints stay ints)."""

    def setter(name: str, kind: type, value: float) -> None:
        setattr(obj, name, kind(round(value)) if kind is int else value)

    return [
        (partial(setter, name, type(getattr(obj, name))), float(getattr(obj, name)))
        for name in obj.__dataclass_fields__
    ]


def check_sharded_config(config: LCAConfig) -> None:
    """Fail in ``setup`` on the flags :class:`ShardedSteps` does not support (docs/fsdp.md)."""
    unsupported = {
        "rule='adaptive'": config.rule == "adaptive" and not config.cheap,  # per-rank error sums would disagree
        "ablation=True": config.ablation,
        "unit_allocations=True": config.unit_allocations,  # a unit's weights lie on one rank's shard
        "parameter_counts=True": config.parameter_counts,  # per-parameter tensors live on the shards
    }
    refused = [flag for flag, on in unsupported.items() if on]
    if refused:
        raise ProbeError(
            f"LossChangeAllocation under ModelParallelStrategy (FSDP2) does not support {', '.join(refused)}; "
            "supported there: rule 'first_order', 'trapezoid' or 'simpson', probe 'train', 'val', a DataLoader "
            "or 'batch', decompose, histograms (from rank 0's shard); see docs/fsdp.md."
        )


def build_estimator(
    config: LCAConfig,
    losses: ProbeLosses,
    corner: CornerFn,
    *,
    sharded: Params | None = None,
    local: dict[str, Tensor] | None = None,
    all_reduce: Callable[[Tensor, str], Tensor] | None = None,
) -> StepEstimator:
    """The estimator of a config: the cheap first order, or a probe path integral, and
    the ablation around either (which keeps θ_t: its corners need it after the main one).
    ``sharded``: the FSDP2-sharded trainable parameters and ``local`` the views of their
    local shards (:func:`learnscope.functional.sharded.local_views`); the estimator then works
    on those (:class:`ShardedSteps`), reducing with ``all_reduce(tensor, op)``."""
    keep_start = config.ablation
    main: StepEstimator
    if config.cheap:
        main = AppliedGradientFirstOrder(keep_start=keep_start)
    else:
        main = ProbePathIntegral(losses, config, data=config.data, keep_start=keep_start)
    if sharded is not None:
        assert all_reduce is not None and local is not None
        losses.sharded = sharded
        return ShardedSteps(main, local, all_reduce)
    return Ablation(main, losses, config, corner) if config.ablation else main
