"""The framework-free LCA core against direct loss evaluation."""

import math

import pytest
import torch

from learnscope.functional import allocate_step, gradient_evaluator
from models import digits


def _softmax_regression():
    x, y = digits(torch.float64)
    x, y = x[:512], y[:512]

    def loss_fn(p):
        return torch.nn.functional.cross_entropy(x @ p["w"] + p["b"], y)

    g = torch.Generator().manual_seed(1)
    start = {
        "w": 0.1 * torch.randn(64, 10, generator=g, dtype=torch.float64),
        "b": torch.zeros(10, dtype=torch.float64),
    }
    end = {"w": start["w"] + 0.2 * torch.randn(64, 10, generator=g, dtype=torch.float64), "b": start["b"] + 0.1}
    return loss_fn, start, end


def test_simpson_is_exact_for_a_quadratic_loss():
    a = torch.randn(20, 5, dtype=torch.float64)
    target = torch.randn(20, dtype=torch.float64)

    def loss_fn(p):
        return ((a @ p["w"] - target) ** 2).mean()

    start, end = {"w": torch.zeros(5, dtype=torch.float64)}, {"w": torch.ones(5, dtype=torch.float64)}
    step = allocate_step(gradient_evaluator(loss_fn), start, end, rule="simpson")
    direct = float(loss_fn(end) - loss_fn(start))
    assert step.delta_loss == pytest.approx(direct, rel=1e-12)
    assert step.total == pytest.approx(direct, rel=1e-10)
    assert step.splits == 2


def test_allocations_sum_to_the_total_and_errors_shrink_with_the_rule():
    loss_fn, start, end = _softmax_regression()
    errors = {}
    for rule in ("first_order", "trapezoid", "simpson"):
        step = allocate_step(gradient_evaluator(loss_fn), start, end, rule=rule)
        summed = sum(float(a.sum()) for a in step.allocations.values())
        assert summed == pytest.approx(step.total, rel=1e-10)
        assert step.delta_loss == pytest.approx(float(loss_fn(end) - loss_fn(start)), rel=1e-12)
        errors[rule] = step.abs_error
    assert errors["simpson"] < errors["trapezoid"] < errors["first_order"]


def test_adaptive_meets_its_tolerance_with_few_splits_and_reports_them():
    loss_fn, start, end = _softmax_regression()
    simpson = allocate_step(gradient_evaluator(loss_fn), start, end, rule="simpson")
    adaptive = allocate_step(gradient_evaluator(loss_fn), start, end, rule="adaptive", tolerance=1e-5)
    assert simpson.abs_error > 1e-5
    assert adaptive.abs_error <= 1e-5
    assert adaptive.splits in (4, 8, 16)  # stopped before the cap of 32


def test_adaptive_stops_at_the_cap_and_records_it():
    loss_fn, start, end = _softmax_regression()
    end = {k: start[k] + 30 * (end[k] - start[k]) for k in start}
    step = allocate_step(gradient_evaluator(loss_fn), start, end, rule="adaptive", tolerance=1e-15, max_intervals=8)
    assert step.splits == 8
    assert math.isfinite(step.total)


def test_reusing_the_start_evaluation_gives_the_same_allocation():
    loss_fn, start, end = _softmax_regression()
    evaluate = gradient_evaluator(loss_fn)
    fresh = allocate_step(evaluate, start, end, rule="simpson")
    reused = allocate_step(evaluate, start, end, rule="simpson", start_evaluation=evaluate(start))
    for name in start:
        assert torch.equal(fresh.allocation(name), reused.allocation(name))


def test_helped_parameters_have_negative_allocation_on_a_descent_step():
    loss_fn, start, _ = _softmax_regression()
    evaluate = gradient_evaluator(loss_fn)
    g = evaluate(start).gradient
    end = {k: start[k] - 1e-3 * g[k] for k in start}
    step = allocate_step(evaluate, start, end, rule="first_order")
    for name in start:
        assert bool((step.allocation(name) <= 0).all())
    assert step.delta_loss < 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rule="rk4"), "rule must be one of"),
        (dict(tolerance=0.0), "tolerance must be"),
        (dict(max_intervals=12), "max_intervals must be"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    loss_fn, start, end = _softmax_regression()
    with pytest.raises(ValueError, match=match):
        allocate_step(gradient_evaluator(loss_fn), start, end, **kwargs)
