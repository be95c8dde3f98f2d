"""The synchronisation test (our operationalisation, see learnscope.report.sync)."""

from __future__ import annotations

import numpy as np
import pytest

from learnscope.report import sync
from learnscope.report.sync import (
    SyncError,
    align_on_common_steps,
    local_minima,
    moving_average,
    synchronisation_test,
)

LENGTH = 200


def independent_series(seed: int, layers: int = 3, length: int = LENGTH) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"net.{k}": rng.standard_normal(length) for k in range(layers)}


def planted_series(seed: int, layers: int = 3, length: int = LENGTH, dips: int = 15) -> dict[str, np.ndarray]:
    """Independent noise plus deep dips on the same steps in every layer."""
    rng = np.random.default_rng(seed)
    steps = rng.choice(np.arange(10, length - 10), size=dips, replace=False)
    series = independent_series(seed + 1000, layers, length)
    for values in series.values():
        values[steps] -= 4.0
    return series


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_coincident_minima_are_significant(seed):
    result = synchronisation_test(planted_series(seed), n_draws=999, seed=seed)
    assert result.p_value < 0.05
    assert result.observed > result.null_mean + 3 * result.null_std


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_independent_series_are_not_significant(seed):
    result = synchronisation_test(independent_series(seed), n_draws=999, seed=seed)
    assert result.p_value > 0.05


def test_false_positive_rate_is_near_the_level_on_independent_series():
    p_values = np.array(
        [synchronisation_test(independent_series(seed), n_draws=199, seed=seed).p_value for seed in range(100)]
    )
    assert np.mean(p_values <= 0.05) <= 0.12
    assert 0.35 < np.median(p_values) < 0.65


def test_p_value_is_a_valid_probability_with_the_plus_one_correction():
    draws = 99
    result = synchronisation_test(planted_series(0), n_draws=draws)
    exceed = np.count_nonzero(result.null_distribution >= result.observed)
    assert result.p_value == (1 + exceed) / (1 + draws)
    assert 1 / (1 + draws) <= result.p_value <= 1
    assert result.null_distribution.shape == (draws,)
    assert result.null_mean == pytest.approx(result.null_distribution.mean())


def test_statistic_counts_minima_pairs_within_the_tolerance():
    series = independent_series(5)
    for tolerance in (0, 1, 3):
        result = synchronisation_test(series, tolerance=tolerance, n_draws=10)
        minima = list(result.minima_steps.values())
        brute_force = sum(
            int(abs(a - b) <= tolerance)
            for i in range(len(minima))
            for j in range(i + 1, len(minima))
            for a in minima[i]
            for b in minima[j]
        )
        assert result.observed == brute_force


def test_same_seed_gives_the_same_null_and_p_value():
    first = synchronisation_test(independent_series(3), seed=7, n_draws=300)
    second = synchronisation_test(independent_series(3), seed=7, n_draws=300)
    np.testing.assert_array_equal(first.null_distribution, second.null_distribution)
    assert first.p_value == second.p_value


def test_minima_are_reported_in_step_units_and_coincidences_found():
    values = np.zeros(20)
    values[[6, 13]] = -1.0
    steps = np.arange(20) * 10  # LCA measured every 10 global steps
    result = synchronisation_test({"a": values, "b": values.copy()}, steps=steps, window=2, n_draws=50)
    assert result.minima_steps["a"].tolist() == [60, 130]
    assert result.coincident_steps.tolist() == [60, 130]
    assert result.observed == 2


def test_local_minima_are_strict_and_exclude_the_ends():
    values = np.array([0.0, 5, 1, 5, 5, 2, 2, 5, 5, 3, 5, -9])
    assert np.flatnonzero(local_minima(values, window=1)).tolist() == [2, 9]  # tie at 5-6: no minimum; end: none


def test_moving_average_is_centred_and_does_not_shrink_the_ends():
    np.testing.assert_allclose(moving_average(np.ones(7), 3), np.ones(7))
    np.testing.assert_allclose(moving_average(np.array([0.0, 3, 0, 0]), 3), [1.5, 1, 1, 0])
    with pytest.raises(ValueError, match="odd"):
        moving_average(np.ones(5), 2)


def test_smoothing_removes_single_step_noise_minima():
    rng = np.random.default_rng(0)
    trend = np.sin(np.linspace(0, 6 * np.pi, 150))
    series = {f"l{k}": trend + 0.3 * rng.standard_normal(150) for k in range(2)}
    raw = synchronisation_test(series, smooth=1, n_draws=10)
    smoothed = synchronisation_test(series, smooth=9, n_draws=10)
    assert sum(map(len, smoothed.minima_steps.values())) < sum(map(len, raw.minima_steps.values()))


def test_one_layer_is_a_clear_error():
    with pytest.raises(SyncError, match="at least 2 layer series, got 1"):
        synchronisation_test({"net.0": np.arange(50.0)})


def test_too_short_series_is_a_clear_error():
    with pytest.raises(SyncError, match=r"too short.*4 finite steps, need at least 7 for window=2"):
        synchronisation_test({"a": np.arange(4.0), "b": np.arange(4.0)}, window=2)


def test_series_of_different_lengths_are_refused():
    with pytest.raises(ValueError, match="same length"):
        synchronisation_test({"a": np.zeros(20), "b": np.zeros(21)})


def test_series_without_minima_give_p_one():
    ramps = {"a": np.arange(30.0), "b": np.arange(30.0)}
    result = synchronisation_test(ramps, n_draws=20)
    assert result.observed == 0 and result.p_value == 1.0


def test_non_finite_steps_are_dropped_and_counted():
    series = independent_series(1, length=60)
    series["net.1"][[3, 40]] = np.nan
    result = synchronisation_test(series, n_draws=20)
    assert result.dropped_steps == 2 and len(result.steps) == 58
    assert 3 not in result.steps and 40 not in result.steps


def test_align_on_common_steps_keeps_shared_steps_only():
    steps, aligned = align_on_common_steps({"a": ([0, 1, 2, 3], [1.0, 2, 3, 4]), "b": ([1, 2, 3, 4], [5.0, 6, 7, 8])})
    assert steps.tolist() == [1, 2, 3]
    assert aligned["a"].tolist() == [2, 3, 4] and aligned["b"].tolist() == [5, 6, 7]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"window": 0}, "window"),
        ({"tolerance": -1}, "tolerance"),
        ({"n_draws": 0}, "n_draws"),
        ({"smooth": 4}, "smooth"),
    ],
)
def test_invalid_parameters_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        synchronisation_test(independent_series(0), **kwargs)


# --- fine p-values and the shared driver (issue #18) -------------------------------------------


def planted_in_subsets(seed: int, layers: int = 5, length: int = 400, dips: int = 60, hit: int = 3):
    """Independent noise; on each of ``dips`` steps, a deep dip in a random ``hit`` of the layers
    (synchronised minima that are not one driver common to every layer)."""
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((layers, length))
    for step in rng.choice(np.arange(10, length - 10), size=dips, replace=False):
        values[rng.choice(layers, size=hit, replace=False), step] -= 6.0
    return {f"net.{k}": values[k] for k in range(layers)}


def shared_driver_series(seed: int, layers: int = 5, length: int = 200, noise: float = 0.1):
    """Every layer = one driver + small independent noise (the FC net of the issue)."""
    rng = np.random.default_rng(seed)
    driver = rng.standard_normal(length)
    return {f"net.{k}": driver + noise * rng.standard_normal(length) for k in range(layers)}


def brute_force_shift_tail(minima: np.ndarray, tolerance: int, observed: float) -> float:
    """P(S_null ≥ S) by shifting the indicators themselves over every joint offset (layer 0 fixed)."""
    layers, length = minima.shape
    hits = total = 0
    for offsets in np.ndindex(*([length] * (layers - 1))):
        shifted = [minima[0]] + [np.roll(minima[k + 1], offsets[k]) for k in range(layers - 1)]
        positions = [np.flatnonzero(row) for row in shifted]
        count = sum(
            int(min(abs(a - b), length - abs(a - b)) <= tolerance)
            for i in range(layers)
            for j in range(i + 1, layers)
            for a in positions[i]
            for b in positions[j]
        )
        hits += count >= observed
        total += 1
    return hits / total


@pytest.mark.parametrize("tolerance", [0, 1])
def test_exact_p_value_equals_a_brute_force_enumeration_of_shifts(tolerance):
    series = planted_series(4, layers=3, length=24, dips=4)
    result = synchronisation_test(series, tolerance=tolerance, window=1, n_draws=10)
    assert result.fine_method == sync.EXACT
    minima = local_minima(result.smoothed, 1).astype(int)
    assert result.fine_p_value == pytest.approx(brute_force_shift_tail(minima, tolerance, result.observed), abs=1e-12)


def test_convolution_p_value_has_the_exact_mean_and_is_close_to_the_exact_tail():
    series = independent_series(2, layers=4, length=40)
    exact = synchronisation_test(series, n_draws=10, tolerance=1)
    approx = synchronisation_test(series, n_draws=10, tolerance=1, max_enumeration=10)
    assert exact.fine_method == sync.EXACT and approx.fine_method == sync.CONVOLUTION
    assert approx.fine_p_value == pytest.approx(exact.fine_p_value, rel=0.15, abs=0.02)


@pytest.mark.parametrize(
    ("layers", "remove_driver", "method"),
    [(3, False, "EXACT"), (5, False, "CONVOLUTION"), (3, True, "EXACT"), (5, True, "NORMAL")],
)
def test_fine_p_value_agrees_with_monte_carlo_where_both_resolve(layers, remove_driver, method):
    draws = 20000 if not remove_driver else 4000
    length = 200 if not remove_driver else 40
    for seed in range(3):
        series = independent_series(seed, layers=layers, length=length)
        result = synchronisation_test(series, n_draws=draws, seed=seed, tolerance=1, remove_driver=remove_driver)
        assert result.fine_method == getattr(sync, method)
        error = np.sqrt(result.p_value * (1 - result.p_value) / draws)
        slack = 0.0 if method == "EXACT" else 0.15 * result.p_value  # the approximations' own error
        assert abs(result.fine_p_value - result.p_value) <= 4 * error + slack + 1 / draws


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_minima_give_a_tiny_fine_p_in_both_versions(seed):
    series = planted_in_subsets(seed)
    raw = synchronisation_test(series, n_draws=499, seed=seed)
    removed = synchronisation_test(series, n_draws=499, seed=seed, remove_driver=True)
    assert raw.fine_p_value < 1e-6 and removed.fine_p_value < 1e-6
    assert raw.p_value == removed.p_value == 1 / 500  # the Monte-Carlo p sits at its floor


def test_independent_series_give_uniform_fine_p_values_in_both_versions():
    raw = np.array([synchronisation_test(independent_series(s), n_draws=1, seed=s).fine_p_value for s in range(200)])
    removed = np.array(
        [
            synchronisation_test(independent_series(s, layers=4, length=100), n_draws=199, seed=s, remove_driver=True)
            for s in range(200)
        ]
    )
    removed_p = np.array([r.fine_p_value for r in removed])
    for p_values in (raw, removed_p):
        assert 0.02 <= np.mean(p_values < 0.05) <= 0.10
        assert 0.35 < np.median(p_values) < 0.65


def test_a_shared_driver_is_significant_raw_and_not_once_removed():
    raw, removed = [], []
    for seed in range(10):
        series = shared_driver_series(seed)
        raw.append(synchronisation_test(series, n_draws=199, seed=seed).fine_p_value)
        removed.append(synchronisation_test(series, n_draws=199, seed=seed, remove_driver=True).fine_p_value)
    assert max(raw) < 1e-6
    assert np.mean(np.array(removed) > 0.05) >= 0.8


def test_remove_shared_driver_cancels_a_common_driver_and_sums_to_zero():
    rng = np.random.default_rng(0)
    driver, noise = rng.standard_normal(50), rng.standard_normal((3, 50))
    values = np.array([2.0, -1.0, 0.5])[:, None] * driver + np.array([1.0, 3.0, -2.0])[:, None]
    np.testing.assert_allclose(sync.remove_shared_driver(values[[0, 2]]), 0.0, atol=1e-12)  # same sign: cancels
    removed = sync.remove_shared_driver(values + noise)
    np.testing.assert_allclose(removed.sum(axis=0), 0.0, atol=1e-12)
    z = (noise[0] - noise[0].mean()) / noise[0].std()
    flat = sync.remove_shared_driver(np.stack([noise[0], np.ones(50), np.ones(50)]))
    np.testing.assert_allclose(flat[0], z - z / 3, atol=1e-12)


def test_removing_the_driver_needs_three_layers():
    with pytest.raises(SyncError, match="at least 3 layer series, got 2"):
        synchronisation_test(independent_series(0, layers=2), remove_driver=True)


def test_p_value_text_names_the_method_and_floors_at_1e_12():
    driven = synchronisation_test(shared_driver_series(0), n_draws=99)
    assert driven.fine_p_value < 1e-12
    assert sync.format_p_value(driven).startswith("p < 1e-12 (pairwise-independent convolution, approx.)")
    assert sync.format_p_value(driven).endswith("; Monte Carlo p = 0.01 (99 draws)")
    three = synchronisation_test(planted_series(0), n_draws=99)
    text = sync.format_p_value(three)
    assert text.startswith(f"p = {1 / LENGTH**2:.2g} (exact over shifts, the smallest p")
