"""The NFA rotation null: its per-draw values, their standard error, the batched Haar draws."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch

from learnscope.functional.nfa import (
    NULL_DRAWS,
    NULL_MAX_DRAWS,
    NULL_MIN_DRAWS,
    NULL_SE_TARGET,
    haar_orthogonal,
    haar_orthogonal_batch,
    nfa_metrics,
    rotation_null,
)

DTYPE = torch.float64


def layer(k: int = 12, d: int = 9, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight W (k×d) and a G correlated with WWᵀ, so that the null is not trivial."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(k, d, generator=generator, dtype=DTYPE)
    root = torch.randn(k, k, generator=generator, dtype=DTYPE)
    return weight, weight @ weight.mT + 0.3 * root @ root.mT / k


def reference_pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def reference_power(matrix: torch.Tensor, alpha: float) -> torch.Tensor:
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    return (eigenvectors * eigenvalues.clamp_min(0) ** alpha) @ eigenvectors.mT


def test_per_draw_values_are_the_pearsons_of_the_rotated_grams_and_give_the_logged_mean_and_se():
    weight, gram = layer()
    alphas, draws = (1.0, 0.5), 7
    per_draw = rotation_null(weight, gram, alphas=alphas, draws=draws, generator=torch.Generator().manual_seed(3))
    assert per_draw.shape == (draws, 2) and per_draw.dtype == DTYPE
    rotations = haar_orthogonal_batch(draws, 12, generator=torch.Generator().manual_seed(3))
    nfm = weight.mT @ weight
    for i, q in enumerate(rotations):  # the d×d matrices formed: Pearson(WᵀW, (Wᵀ QGQᵀ W)^α)
        for j, alpha in enumerate(alphas):
            expected = reference_pearson(nfm, reference_power(weight.mT @ q @ gram @ q.mT @ weight, alpha))
            # The null's draws run in float32 (nfa._NULL_DTYPE): a per-draw error far below its 0.01 SE target.
            assert float(per_draw[i, j]) == pytest.approx(expected, abs=2e-5)
    metrics = nfa_metrics(weight, gram, alphas=alphas, null_draws=draws, generator=torch.Generator().manual_seed(3))
    for j, suffix in enumerate(("a1", "a0.5")):
        values = per_draw[:, j].tolist()
        assert metrics[f"null_{suffix}"] == pytest.approx(statistics.fmean(values), abs=1e-14)
        assert metrics[f"null_se_{suffix}"] == pytest.approx(statistics.stdev(values) / math.sqrt(draws), rel=1e-10)
        assert metrics[f"null_se_{suffix}"] > 1e-4
        assert metrics[f"excess_{suffix}"] == pytest.approx(metrics[f"pearson_{suffix}"] - metrics[f"null_{suffix}"])


def test_one_draw_has_no_standard_error():
    weight, gram = layer()
    metrics = nfa_metrics(weight, gram, null_draws=1)
    assert math.isnan(metrics["null_se_a1"]) and math.isfinite(metrics["null_a1"])


def test_batched_draws_are_successive_haar_orthogonal_draws():
    source, reference_source = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    batch = haar_orthogonal_batch(5, 9, generator=source)
    for q in batch:
        assert torch.allclose(q, haar_orthogonal(9, generator=reference_source), rtol=0, atol=1e-13)
    assert torch.equal(source.get_state(), reference_source.get_state())


def test_batched_draws_are_haar():
    k, draws = 6, 4000
    q = haar_orthogonal_batch(draws, k, generator=torch.Generator().manual_seed(5))
    identity = torch.eye(k, dtype=DTYPE)
    assert torch.allclose(q @ q.mT, identity.expand(draws, k, k), rtol=0, atol=1e-12)
    # Haar: each entry has mean 0 and E[Q_ij²] = 1/k (var(Q_ij²) = 2/(k(k+2)) − 1/k² per draw)
    assert float(q.mean(dim=0).abs().max()) < 4 * math.sqrt(1 / k / draws)
    squares = q[:, 0, 0] ** 2
    sigma = math.sqrt((3 / (k * (k + 2)) - 1 / k**2) / draws)
    assert abs(float(squares.mean()) - 1 / k) < 4 * sigma
    # without the sign fix, QR's Q has a positive-biased diagonal; Haar's diagonal has mean 0
    assert abs(float(torch.diagonal(q, dim1=-2, dim2=-1).mean())) < 4 * math.sqrt(1 / k / (draws * k))


def test_default_draw_null_agrees_with_a_many_draw_reference_within_three_standard_errors():
    weight, gram = layer(k=20, d=15, seed=6)
    metrics = nfa_metrics(weight, gram)  # NULL_DRAWS ("auto") draws
    draws = metrics["null_draws"]
    many = rotation_null(weight, gram, draws=2000, generator=torch.Generator().manual_seed(7))
    reference_mean = many.mean(dim=0)
    reference_se = many.std(dim=0) / math.sqrt(2000)
    for j, suffix in enumerate(("a1", "a0.5")):
        se = metrics[f"null_se_{suffix}"]
        # the logged SE estimates the per-draw spread / √(draws used)
        assert se == pytest.approx(float(reference_se[j]) * math.sqrt(2000 / draws), rel=0.6)
        assert abs(metrics[f"null_{suffix}"] - float(reference_mean[j])) < 3 * math.hypot(se, float(reference_se[j]))


@pytest.mark.parametrize(("k", "d", "seed"), [(20, 15, 6), (50, 50, 5), (24, 8, 7)])
def test_auto_draws_until_the_true_standard_error_is_below_target(k, d, seed):
    """ "auto" takes the generator's next n draws (a prefix of a fixed-count run), with n
    between the bounds; the TRUE standard error at n (the per-draw std of 2000 draws / √n)
    is ≤ 0.01 unless the cap was hit, in which case the logged SE says so; and it does not
    draw far more than the true spread needs."""
    assert NULL_DRAWS == "auto"
    weight, gram = layer(k=k, d=d, seed=seed)
    true_std = float(rotation_null(weight, gram, draws=2000, generator=torch.Generator().manual_seed(99)).std(0).max())
    metrics = nfa_metrics(weight, gram, generator=torch.Generator().manual_seed(5))
    n = int(metrics["null_draws"])
    assert NULL_MIN_DRAWS <= n <= NULL_MAX_DRAWS
    fixed = rotation_null(weight, gram, draws=n, generator=torch.Generator().manual_seed(5))
    assert metrics["null_a1"] == pytest.approx(float(fixed[:, 0].mean()), abs=1e-12)
    auto = rotation_null(weight, gram, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(auto, fixed, rtol=0, atol=2e-5)  # the same draws, batched differently (float32)
    if n < NULL_MAX_DRAWS:
        assert true_std / math.sqrt(n) <= NULL_SE_TARGET
        assert n <= max(NULL_MIN_DRAWS, 4 * (true_std / NULL_SE_TARGET) ** 2)
    else:
        assert max(metrics["null_se_a1"], metrics["null_se_a0.5"]) > 0.8 * NULL_SE_TARGET


def test_auto_stops_at_the_minimum_when_the_spread_is_small():
    weight, gram = layer(k=50, d=50, seed=5)  # per-draw std ≈ 0.010: the bound from 4 draws, 2.3 × 0.010 / 2, is 0.0115
    assert nfa_metrics(weight, gram)["null_draws"] == NULL_MIN_DRAWS


def test_an_int_null_draws_is_exact_and_logged():
    weight, gram = layer()
    assert nfa_metrics(weight, gram, null_draws=3)["null_draws"] == 3
    assert "null_draws" not in nfa_metrics(weight, gram, null_draws=0)


def test_rotation_null_checks_its_arguments():
    weight, gram = layer()
    with pytest.raises(ValueError, match='draws must be an int >= 0 or "auto"'):
        rotation_null(weight, gram, draws=-1)
    with pytest.raises(ValueError, match='null_draws must be an int >= 0 or "auto"'):
        nfa_metrics(weight, gram, null_draws="many")
    with pytest.raises(ValueError, match="draws must be an int >= 1"):
        haar_orthogonal_batch(0, 3)


def test_nfa_figure_draws_the_null_with_its_196_se_bars():
    from matplotlib.collections import LineCollection
    from matplotlib.figure import Figure

    from learnscope.report.figures import _draw_against_null
    from learnscope.report.reader import ScalarSeries

    def series(tag, steps, values):
        return ScalarSeries(tag, np.asarray(steps, dtype=np.int64), np.asarray(values, float), np.zeros(len(steps)))

    metrics = {
        "pearson_a1": series("nfa/l/pearson_a1", [0, 10, 20], [0.5, 0.7, 0.8]),
        "null_a1": series("nfa/l/null_a1", [0, 10, 20], [0.4, 0.45, 0.5]),
        "null_se_a1": series("nfa/l/null_se_a1", [10, 20], [0.01, 0.02]),  # not at step 0
    }
    axes = Figure().subplots()
    assert _draw_against_null(axes, metrics, 1.0, "#1f77b4")
    bars = [c for c in axes.collections if isinstance(c, LineCollection)]
    assert len(bars) == 1
    segments = [np.asarray(s) for s in bars[0].get_segments()]
    drawn = np.array([(s[0, 0], s[0, 1], s[1, 1]) for s in segments])
    expected = np.array([(10, 0.45 - 1.96 * 0.01, 0.45 + 1.96 * 0.01), (20, 0.5 - 1.96 * 0.02, 0.5 + 1.96 * 0.02)])
    assert np.allclose(drawn, expected, rtol=0, atol=1e-12)
