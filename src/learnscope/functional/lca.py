r"""Loss Change Allocation as a path integral (Lan et al., NeurIPS 2019).

For one optimizer step :math:`\theta_t \to \theta_{t+1}` with
:math:`\Delta = \theta_{t+1} - \theta_t` and a fixed loss :math:`L`::

    L(θ_{t+1}) − L(θ_t) = ∫_0^1 ∇L(θ_t + sΔ) · Δ ds = Σ_i A_i,
    A_i = Δ_i · k_i,    k = ∫_0^1 ∇L(θ_t + sΔ) ds   (the path-averaged gradient).

``A_i`` is parameter *i*'s allocation: negative means it helped (lowered the loss).
The quadrature rules approximate ``k``:

* ``first_order``: k ≈ g(0)
* ``trapezoid``:   k ≈ (g(0) + g(1)) / 2
* ``simpson``:     k ≈ (g(0) + 4 g(½) + g(1)) / 6   (the paper's "RK4")
* ``adaptive``:    composite Simpson with n = 2, 4, ..., ``max_intervals`` sub-intervals,
  reusing every point already computed, until the per-step error
  ``|L(θ_{t+1}) − L(θ_t) − Σ_i A_i|`` is at most ``max(tolerance,
  relative_tolerance·|L(θ_{t+1}) − L(θ_t)|)``. A step that reaches ``max_intervals``
  with its error still above that is accepted and flagged ``capped``: on a rough path
  (ReLU/max-pool kinks crossed by a large step, see docs/accuracy.md) composite
  Simpson converges slowly, so more intervals may not help.

Nothing here knows about Lightning: the loss is any function of a parameter dict.

Example::

    >>> import torch
    >>> from learnscope.functional import allocate_step, gradient_evaluator
    >>> x, y = torch.randn(64, 3), torch.randn(64)
    >>> def loss_fn(p):
    ...     return ((x @ p["w"] - y) ** 2).mean()
    >>> start = {"w": torch.zeros(3)}
    >>> end = {"w": torch.tensor([0.1, -0.2, 0.05])}
    >>> step = allocate_step(gradient_evaluator(loss_fn), start, end, rule="simpson")
    >>> abs(step.total - step.delta_loss) < 1e-6   # Simpson is exact for a quadratic loss
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from learnscope._validate import check_choice, check_optional_positive_float, check_positive_float

__all__ = [
    "RULES",
    "AccumulatingEvaluator",
    "Evaluation",
    "Evaluator",
    "LazyDelta",
    "StepAllocation",
    "accepted_error",
    "allocate_step",
    "check_max_intervals",
    "check_relative_tolerance",
    "check_rule",
    "check_tolerance",
    "first_order_step",
    "gradient_evaluator",
    "step_delta",
]

RULES = ("first_order", "trapezoid", "simpson", "adaptive")

Params = Mapping[str, Tensor]


@dataclass
class Evaluation:
    """The loss and its gradient at one point of parameter space."""

    loss: float
    gradient: dict[str, Tensor]


class Evaluator(Protocol):
    """``evaluate(params) -> Evaluation``: the loss and its gradient at ``params``."""

    def __call__(self, params: Params, /) -> Evaluation: ...


@runtime_checkable
class AccumulatingEvaluator(Protocol):
    """An evaluator that can also add a scaled gradient into buffers the caller owns.

    ``accumulate_into(params, out, alpha)`` adds ``alpha·∇L(params)`` into ``out`` in
    place (one tensor per entry, same shapes) and returns ``L(params)``. ``simpson``
    uses it to build ``k`` in one set of buffers, without a buffer for the midpoint
    gradient (:class:`learnscope._probe.ProbeObjective` implements it)."""

    def __call__(self, params: Params, /) -> Evaluation: ...

    def accumulate_into(self, params: Params, out: dict[str, Tensor], alpha: float) -> float: ...


def gradient_evaluator(loss_fn: Callable[[dict[str, Tensor]], Tensor]) -> Evaluator:
    """Wrap ``loss_fn(params) -> scalar`` into an evaluator returning loss and gradient.

    The parameters handed to ``loss_fn`` are fresh leaves sharing storage with the
    inputs (no copy); the inputs' own ``requires_grad`` and ``.grad`` are untouched.
    """

    def evaluate(params: Params) -> Evaluation:
        leaves = {name: p.detach().requires_grad_(True) for name, p in params.items()}
        with torch.inference_mode(False), torch.enable_grad():
            loss = loss_fn(leaves)
            grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        gradient = {name: torch.zeros_like(leaf) if g is None else g for (name, leaf), g in zip(leaves.items(), grads)}
        return Evaluation(float(loss.detach()), gradient)

    return evaluate


@dataclass
class StepAllocation:
    """Result of integrating one step.

    Attributes:
        path_gradient: ``k``, the rule's estimate of the path-averaged gradient.
        delta: ``Δ = θ_{t+1} − θ_t``.
        loss_start: ``L(θ_t)``.
        loss_end: ``L(θ_{t+1})``, or None when the end point was not evaluated.
        splits: sub-intervals used (1 for first_order and trapezoid, 2 for simpson,
            up to ``max_intervals`` for adaptive).
        end: the evaluation at ``θ_{t+1}`` (reusable as the next step's start), or None.
        total: ``Σ_i A_i`` in float64.
        capped: ``adaptive`` stopped at ``max_intervals`` sub-intervals with its error
            ``|ΔL − Σ A|`` above the accepted error (False for the other rules).
        accepted_error: the error ``adaptive`` accepted, ``max(tolerance,
            relative_tolerance·|ΔL|)`` (NaN for the other rules).
    """

    path_gradient: dict[str, Tensor]
    delta: Mapping[str, Tensor]  # a dict, or a LazyDelta formed tensor by tensor
    loss_start: float | None
    loss_end: float | None
    splits: int
    end: Evaluation | None
    total: float = field(default=math.nan)
    capped: bool = False
    accepted_error: float = math.nan

    def allocation(self, name: str) -> Tensor:
        """Per-parameter allocations ``A = k ⊙ Δ`` of one tensor (computed on demand)."""
        return self.path_gradient[name] * self.delta[name]

    @property
    def allocations(self) -> dict[str, Tensor]:
        return {name: self.allocation(name) for name in self.delta}

    @property
    def delta_loss(self) -> float:
        if self.loss_end is None or self.loss_start is None:
            return math.nan
        return self.loss_end - self.loss_start

    @property
    def abs_error(self) -> float:
        return abs(self.delta_loss - self.total)


def _dot(a: Params, b: Params) -> float:
    """Σ_i a_i b_i over all tensors, accumulated in float64 on each device (one sync per
    device, not per tensor)."""
    sums: dict[torch.device, Tensor] = {}
    for name, x in a.items():
        term = (x * b[name]).sum(dtype=torch.float64)
        sums[term.device] = sums[term.device] + term if term.device in sums else term
    return sum(float(value) for value in sums.values())


def step_delta(start: Params, end: Params, *, in_place: bool = False) -> dict[str, Tensor]:
    """Δ = end − start; ``in_place``: written into start's own buffers (−start + end is
    bitwise end − start), except where start and end are the same tensor (Δ = 0)."""
    if not in_place:
        return {name: end[name] - start[name] for name in start}
    return {name: torch.zeros_like(s) if s is end[name] else s.neg_().add_(end[name]) for name, s in start.items()}


class LazyDelta(Mapping[str, Tensor]):
    """Δ = end − start per tensor, formed on first access (``step_delta`` one tensor at a time).

    Until a tensor's Δ is read, ``operands(name)`` gives ``(start, end)`` instead, so a
    consumer that only reduces over Δ (the per-step statistics) can read θ_t and θ_{t+1}
    directly and Δ is never written. With ``in_place`` the first read writes Δ into
    start's own buffer (θ_t is then gone): read every ``operands`` first.
    """

    def __init__(self, start: Params, end: Params, *, in_place: bool = False) -> None:
        self._start, self._end, self._in_place = start, end, in_place
        self._formed: dict[str, Tensor] = {}

    def __getitem__(self, name: str) -> Tensor:
        delta = self._formed.get(name)
        if delta is None:
            delta = step_delta({name: self._start[name]}, self._end, in_place=self._in_place)[name]
            self._formed[name] = delta
        return delta

    def __iter__(self) -> Iterator[str]:
        return iter(self._start)

    def __len__(self) -> int:
        return len(self._start)

    def operands(self, name: str) -> Tensor | tuple[Tensor, Tensor]:
        """Δ if already formed, else ``(start, end)`` with Δ = end − start."""
        formed = self._formed.get(name)
        return formed if formed is not None else (self._start[name], self._end[name])


def _lerp(start: Params, delta: Params, s: float) -> dict[str, Tensor]:
    return {name: torch.add(start[name], delta[name], alpha=s) for name in start}


def check_max_intervals(max_intervals: object) -> int:
    """``max_intervals`` if it is a power of two >= 2, else a ValueError naming it."""
    if not (
        isinstance(max_intervals, int)
        and not isinstance(max_intervals, bool)
        and max_intervals >= 2
        and max_intervals & (max_intervals - 1) == 0
    ):
        raise ValueError(f"max_intervals must be a power of two >= 2 (2, 4, 8, 16, 32, ...), got {max_intervals!r}")
    return max_intervals


def check_relative_tolerance(relative_tolerance: object) -> float | None:
    """``relative_tolerance`` if it is None or a positive finite number, else a ValueError naming it."""
    return check_optional_positive_float("relative_tolerance", relative_tolerance)


def accepted_error(tolerance: float, relative_tolerance: float | None, delta_loss: float) -> float:
    """The per-step error ``adaptive`` accepts: ``max(tolerance, relative_tolerance·|ΔL|)``."""
    if relative_tolerance is None or not math.isfinite(delta_loss):
        return tolerance
    return max(tolerance, relative_tolerance * abs(delta_loss))


def check_rule(rule: object) -> str:
    """``rule`` if it is one of :data:`RULES`, else a ValueError naming it."""
    return check_choice("rule", rule, RULES)


def check_tolerance(tolerance: object) -> float:
    """``tolerance`` if it is a positive finite number, else a ValueError naming it."""
    return check_positive_float("tolerance", tolerance)


def first_order_step(
    gradient: Mapping[str, Tensor], delta: Mapping[str, Tensor], *, compute_total: bool = False
) -> StepAllocation:
    """The first-order allocation ``A = g ⊙ Δ`` with a known gradient ``g`` at θ_t (the
    gradient the optimizer applied, say): no evaluation, so ``loss_start``/``loss_end``
    are None and ``delta_loss`` is NaN. ``delta`` may be a :class:`LazyDelta`.
    ``compute_total``: form ``total = Σ g·Δ`` (else NaN, for a caller that sums anyway)."""
    path_gradient = {name: gradient[name] for name in delta}
    total = _dot(path_gradient, delta) if compute_total else math.nan
    return StepAllocation(
        path_gradient=path_gradient,
        delta=delta,
        loss_start=None,
        loss_end=None,
        splits=1,
        end=None,
        total=total,
    )


def allocate_step(
    evaluate: Evaluator,
    start: Params,
    end: Params,
    *,
    rule: str = "simpson",
    tolerance: float = 1e-3,
    max_intervals: int = 32,
    relative_tolerance: float | None = None,
    start_evaluation: Evaluation | None = None,
    evaluate_end: bool = True,
    compute_total: bool = True,
    start_is_workspace: bool = False,
) -> StepAllocation:
    """Allocate the loss change of the step ``start → end`` to every parameter.

    Args:
        evaluate: maps a parameter dict to an :class:`Evaluation` (loss and gradient
            with respect to every entry). See :func:`gradient_evaluator`. An
            :class:`AccumulatingEvaluator` lets ``simpson`` build ``k`` in place.
        start: ``θ_t``. end: ``θ_{t+1}`` (same keys and shapes).
        rule: one of ``RULES``.
        tolerance: absolute per-step error target of the ``adaptive`` rule.
        max_intervals: cap on the ``adaptive`` rule's sub-intervals, a power of two
            >= 2 (paper: 32); past it the estimate is accepted, ``splits`` records the
            cap and ``capped`` says whether the error was still above the target.
        relative_tolerance: ``adaptive`` accepts a step when ``|ΔL − Σ A| <=
            max(tolerance, relative_tolerance·|ΔL|)``; None (default): ``tolerance`` only.
        start_evaluation: the evaluation at ``start`` if already known (for example
            the previous step's ``end``). Its gradient buffers are reused as workspace
            and overwritten: pass ownership, keep no other reference.
        compute_total: whether to form ``total = Σ_i k_i Δ_i`` (one pass over the
            parameters); a caller that sums the allocations anyway passes False and
            ``total`` is NaN.
        start_is_workspace: the caller hands over ``start``'s buffers (copies it owns):
            ``simpson`` then forms Δ in them in place instead of in new buffers, and
            ``start`` holds Δ afterwards. An entry that is the same tensor object as its
            ``end`` entry (a parameter that did not move) is never written.
        evaluate_end: for ``first_order`` only, whether to evaluate ``L(θ_{t+1})``
            (and its gradient, for reuse). The other rules always need it.

    Returns:
        A :class:`StepAllocation`; ``Σ A`` is ``total``, ``delta_loss`` the actual change.
    """
    check_rule(rule)
    check_tolerance(tolerance)
    check_max_intervals(max_intervals)
    check_relative_tolerance(relative_tolerance)
    if set(start) != set(end):
        raise ValueError("start and end must hold the same parameter names")
    first = start_evaluation if start_evaluation is not None else evaluate(start)
    if rule == "simpson" and isinstance(evaluate, AccumulatingEvaluator):
        return _accumulated_simpson(evaluate, start, end, first, start_is_workspace, compute_total)
    delta = {name: end[name] - start[name] for name in start}
    if rule == "first_order":
        last = evaluate(end) if evaluate_end else None
        return _result(first.gradient, delta, first, last, 1, compute_total)
    return _quadrature(
        evaluate, start, end, delta, first, rule, tolerance, relative_tolerance, max_intervals, compute_total
    )


def _quadrature(
    evaluate: Evaluator,
    start: Params,
    end: Params,
    delta: dict[str, Tensor],
    first: Evaluation,
    rule: str,
    tolerance: float,
    relative_tolerance: float | None,
    max_intervals: int,
    compute_total: bool,
) -> StepAllocation:
    """``trapezoid``, ``simpson`` and ``adaptive``, with k built in place in the start
    gradient's buffers: the trapezoid T_1 first, then Richardson's recurrence."""
    last = evaluate(end)
    trapezoid = first.gradient
    for name, g in trapezoid.items():
        g.add_(last.gradient[name]).mul_(0.5)
    if rule == "trapezoid":
        return _result(trapezoid, delta, first, last, 1, compute_total)
    target = accepted_error(tolerance, relative_tolerance, last.loss - first.loss) if rule == "adaptive" else math.nan
    path_gradient, splits, error = _simpson(
        evaluate,
        start,
        delta,
        trapezoid,
        first.loss,
        last.loss,
        adaptive=rule == "adaptive",
        target=target,
        max_intervals=max_intervals,
    )
    capped = rule == "adaptive" and not error <= target  # NaN counts as above
    return _result(path_gradient, delta, first, last, splits, compute_total, capped=capped, accepted=target)


def _result(
    k: dict[str, Tensor],
    delta: dict[str, Tensor],
    first: Evaluation,
    last: Evaluation | None,
    splits: int,
    compute_total: bool,
    *,
    capped: bool = False,
    accepted: float = math.nan,
) -> StepAllocation:
    return StepAllocation(
        path_gradient=k,
        delta=delta,
        loss_start=first.loss,
        loss_end=None if last is None else last.loss,
        splits=splits,
        end=last,
        total=_dot(k, delta) if compute_total else math.nan,
        capped=capped,
        accepted_error=accepted,
    )


def _accumulated_simpson(
    evaluate: AccumulatingEvaluator,
    start: Params,
    end: Params,
    first: Evaluation,
    start_is_workspace: bool,
    compute_total: bool,
) -> StepAllocation:
    """``simpson`` with k = g0/6 + 4·g_½/6 + g1/6 built in g0's buffers, g_½ added chunk by
    chunk (no midpoint buffer), Δ formed only at the end: peak θ_t, point, k, one chunk's
    gradient."""
    k = first.gradient
    for g in k.values():
        g.mul_(1.0 / 6.0)
    midpoint = {name: torch.lerp(start[name], end[name], 0.5) for name in start}
    evaluate.accumulate_into(midpoint, k, 4.0 / 6.0)
    del midpoint  # before the end point's gradient is allocated
    last = evaluate(end)
    for name, g in k.items():
        g.add_(last.gradient[name], alpha=1.0 / 6.0)
    delta = step_delta(start, end, in_place=start_is_workspace)
    return _result(k, delta, first, last, 2, compute_total)


def _simpson(
    evaluate: Evaluator,
    start: Params,
    delta: Params,
    trapezoid: dict[str, Tensor],
    loss_start: float,
    loss_end: float,
    *,
    adaptive: bool,
    target: float,
    max_intervals: int,
) -> tuple[dict[str, Tensor], int, float]:
    """Composite Simpson by Richardson's recurrence, reusing all points; returns k, the
    sub-intervals and (adaptive only, else NaN) the error ``|ΔL − S·Δ|`` of the result.

    With ``T_m`` the trapezoid and ``M_m`` the midpoint average over m panels:
    ``S_{2m} = (T_m + 2 M_m) / 3`` and ``T_{2m} = (T_m + M_m) / 2``. Only the scalar
    ``S·Δ`` is needed to test the error, so vectors are combined once at the end.
    """
    delta_loss = loss_end - loss_start
    panels, error = 1, math.nan
    while True:
        midpoint = _midpoint_average(evaluate, start, delta, panels)
        if adaptive:  # also at the cap: whether the accepted step met its target
            error = abs(delta_loss - (_dot(trapezoid, delta) + 2.0 * _dot(midpoint, delta)) / 3.0)
            if 2 * panels < max_intervals and not error <= target:  # NaN: split further
                for name, t in trapezoid.items():
                    t.add_(midpoint[name]).mul_(0.5)
                panels *= 2
                continue
        for name, t in trapezoid.items():
            t.add_(midpoint[name], alpha=2.0).div_(3.0)
        return trapezoid, 2 * panels, error


def _midpoint_average(evaluate: Evaluator, start: Params, delta: Params, panels: int) -> dict[str, Tensor]:
    """M_m: the gradient averaged over the m panel midpoints s = (j + ½)/m."""
    average: dict[str, Tensor] | None = None
    for j in range(panels):
        point = evaluate(_lerp(start, delta, (j + 0.5) / panels))
        if average is None:
            average = point.gradient
        else:
            for name, g in average.items():
                g.add_(point.gradient[name])
    assert average is not None
    if panels > 1:
        for g in average.values():
            g.div_(panels)
    return average
