r"""Are the layers' LCA time series synchronised?

Lan et al. (2019) report that per-layer LCA time series have local minima on the
same iterations far more often than chance ("learning is synchronised across
layers"). Their exact test is not public. **What follows is learnscope's own
operationalisation**, chosen to be simple and to make the null hypothesis
explicit; numbers from it are not comparable one-to-one with the paper's.

Given L ≥ 2 layer series x_l(t) on a common grid of T measured steps
(t = 0 … T−1, index units, not global steps):

1. **Smoothing** (optional): a centred moving average of odd width ``smooth``
   (1 = none), normalised by the number of points inside the series near the
   edges, so the ends are not pulled towards 0.
2. **Local minima**: t is a minimum of layer l when x_l(t) < x_l(s) strictly for
   every s ≠ t with |s − t| ≤ ``window``. Points closer than ``window`` to either
   end are never minima (their neighbourhood is incomplete). Ties are not minima.
   Indicator m_l(t) ∈ {0, 1}.
3. **Statistic**: the number of pairs of minima from two different layers that
   lie within ``tolerance`` steps of each other, summed over layer pairs:

       S = Σ_{l<k} #{(t, u) : m_l(t) = m_k(u) = 1, d(t, u) ≤ tolerance}

   with d the circular distance on 0 … T−1 (identical to |t − u| for minima
   away from the ends). ``tolerance = 0`` counts minima on exactly the same step.
4. **Null**: each layer's minima indicator is shifted circularly by its own
   uniform random offset s_l, independent across layers, and S is recomputed.
   Shifting keeps each layer's number of minima and their spacing (the series'
   own autocorrelation), and destroys only their alignment *across* layers.
   Shifting layers l and k by s_l and s_k gives S_lk = c_lk[(s_l − s_k) mod T],
   with c_lk the circular cross-correlation of the indicators (FFT), so
   S_null = Σ_{l<k} c_lk[(s_l − s_k) mod T].
5. **p-values** (one-sided, more coincidences than chance), two of them:

   - *Monte Carlo*: ``n_draws`` draws of the offsets (NumPy generator seeded by
     ``seed``), with the +1 correction that keeps it a valid p-value:
     p_MC = (1 + #{draws with S_null ≥ S}) / (1 + n_draws) ∈ [1/(n_draws+1), 1].
   - *fine* (:func:`fine_p_value`), resolved far below 1/(n_draws+1):
     **exact over shifts** when the T^(L−1) joint offsets (s_1 = 0 fixed, the
     statistic depends on differences only) number at most
     ``max_enumeration``: p = #{offsets with S_null ≥ S} / T^(L−1) ≥ 1/T^(L−1);
     otherwise the **pairwise-independent convolution**: under the null every
     difference s_l − s_k is uniform and any two of them are independent, so
     the pair terms are uncorrelated and the convolution of the L(L−1)/2 exact
     per-pair laws of c_lk[uniform] has the null's exact mean and variance; its
     higher moments ignore the dependence of triples (s_l − s_k, s_k − s_m,
     s_l − s_m) and it is an approximation, labelled as one. The convolution
     is direct (sums of non-negative terms, no FFT), so a tail of 1e−12 keeps
     its relative precision.

   For the driver-removed version (below) the null is not a sum over pairs;
   its fine p is exact over all T^L joint shifts when they are few
   enough, else the **normal approximation** to its Monte-Carlo null
   (mean and spread of the draws, continuity-corrected, ``math.erfc``).

**Shared driver** (``remove_driver=True``, :func:`remove_shared_driver`):
when every layer follows one driver (an easy batch lowers every layer's LCA;
in an FC net on digits the layer series correlate 0.97), minima coincide
because of the driver alone. The driver-removed test standardises each
series, z_l = (x_l − mean x_l) / std x_l, and finds the minima of
u_l(t) = z_l(t) − (1/L) Σ_k z_k(t), each layer's deviation from the layers'
mean: a driver common to the z_l cancels. Its null shifts each z_l by its own
offset and applies the same map, so the anti-correlation the map creates
(Σ_l u_l = 0) is in the null as in the data and independent layers keep a
calibrated test. Anything common to all layers is removed with the driver,
including minima planted in every layer at once: this version counts only
minima that some layers share beyond the layers' common movement. It needs
L ≥ 3 layers (with 2, u_1 = −u_2).

**Per-step series only.** The test asks whether layers' per-iteration minima
coincide. LossChangeAllocation writes its per-layer series by default once per logging
window, as the window's sum (``lca/window_steps`` > 1): minima of window sums are a
different, coarser question whose p-values are not comparable, and a run of a few
hundred steps has too few windows to test. :func:`require_per_step` refuses such series
with a message naming the remedy (``per_step_series=True``); the report calls it.

Caveats: steps are treated as evenly spaced (measure LCA at a fixed interval);
anything that moves every layer at once produces real coincidences that this
test will (correctly) call synchronisation, including a shared minibatch when
the LCA loss is the training batch (``probe="batch"``: an easy batch lowers
every layer's LCA), epoch boundaries and learning-rate drops. The circular
shift assumes the minima process is roughly stationary over the run.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

#: Steps or values of a series: a list, or a NumPy array (what the report's reader returns).
Steps = Sequence[int] | np.ndarray
Values = Sequence[float] | np.ndarray
_Key = TypeVar("_Key", bound=Hashable)  # a layer name, or a unit index

__all__ = [
    "SyncError",
    "SyncResult",
    "align_on_common_steps",
    "describe_test",
    "fine_p_value",
    "format_p_value",
    "local_minima",
    "moving_average",
    "remove_shared_driver",
    "require_per_step",
    "synchronisation_test",
]

#: Most joint offsets the exact fine p-value enumerates (T^(L−1)); beyond it, the convolution.
MAX_ENUMERATION = 4_000_000
#: Fine p-values below this are printed as "p < 1e-12".
P_FLOOR = 1e-12
EXACT = "exact over shifts"
CONVOLUTION = "pairwise-independent convolution, approx."
NORMAL = "normal approx. to the Monte-Carlo null"


class SyncError(ValueError):
    """The series cannot be tested (too few layers, too short)."""


@dataclass(frozen=True, eq=False)
class SyncResult:
    """Outcome of :func:`synchronisation_test`.

    Attributes:
        layers: layer names, in input order.
        steps: the common step grid (length T).
        smoothed: the smoothed series, shape (L, T).
        minima_steps: per layer, the steps (values of ``steps``) of its minima.
        coincident_steps: steps where some layer has a minimum and at least one
            other layer has one within ``tolerance``.
        observed: the statistic S on the real alignment.
        null_distribution: S for each circular-shift draw (length ``n_draws``).
        null_mean, null_std: mean and standard deviation of the null.
        p_value: one-sided Monte-Carlo p-value with the +1 correction.
        dropped_steps: steps removed because some layer was not finite there.
        fine_p_value: the same one-sided p-value, exact over the shifts or from
            the pairwise-independent convolution (see ``fine_method``), resolved
            far below ``1 / (n_draws + 1)``.
        fine_method: :data:`EXACT`, :data:`CONVOLUTION` (raw) or :data:`NORMAL`
            (driver removed).
        driver_removed: the minima are those of :func:`remove_shared_driver`'s
            series (the shared driver removed) rather than of the raw values.
    """

    layers: tuple[str, ...]
    steps: np.ndarray
    smoothed: np.ndarray
    minima_steps: dict[str, np.ndarray]
    coincident_steps: np.ndarray
    observed: float
    null_distribution: np.ndarray
    null_mean: float
    null_std: float
    p_value: float
    smooth: int
    window: int
    tolerance: int
    n_draws: int
    seed: int
    dropped_steps: int = 0
    fine_p_value: float = float("nan")
    fine_method: str = ""
    driver_removed: bool = False

    @property
    def excess_ratio(self) -> float:
        """Observed coincidences over the number expected by chance (inf when
        the null mean is 0 and something was observed, NaN when both are 0)."""
        if self.null_mean == 0:
            return float("inf") if self.observed > 0 else float("nan")
        return self.observed / self.null_mean


def moving_average(values: np.ndarray, width: int) -> np.ndarray:
    """Centred moving average of odd ``width`` along the last axis; near the ends
    the average is over the points that exist (no zero padding)."""
    if width < 1 or width % 2 == 0:
        raise ValueError(f"smooth must be an odd integer >= 1, got {width}")
    values = np.asarray(values, dtype=np.float64)
    if width == 1:
        return values.copy()
    kernel = np.ones(width)
    ones = np.ones(values.shape[-1])
    counts = np.convolve(ones, kernel, mode="same")
    flat = values.reshape(-1, values.shape[-1])
    smoothed = np.stack([np.convolve(row, kernel, mode="same") for row in flat]) / counts
    return smoothed.reshape(values.shape)


def local_minima(values: np.ndarray, window: int) -> np.ndarray:
    """Boolean mask of strict local minima along the last axis: x(t) < x(s) for
    all 0 < |s − t| ≤ ``window``; the ``window`` points at each end are never
    minima."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    values = np.asarray(values, dtype=np.float64)
    mask = np.zeros(values.shape, dtype=bool)
    length = values.shape[-1]
    if length < 2 * window + 1:
        return mask
    windows = np.lib.stride_tricks.sliding_window_view(values, 2 * window + 1, axis=-1)
    centre = windows[..., window]
    neighbours = np.concatenate([windows[..., :window], windows[..., window + 1 :]], axis=-1)
    mask[..., window : length - window] = centre < neighbours.min(axis=-1)
    return mask


def align_on_common_steps(
    series: Mapping[_Key, tuple[Steps, Values]],
) -> tuple[np.ndarray, dict[_Key, np.ndarray]]:
    """Restrict ``{layer: (steps, values)}`` to the steps every layer has.

    A step logged twice in one series keeps its last value.
    """
    if not series:
        return np.zeros(0, dtype=np.int64), {}
    per_layer = {}
    for name, (steps, values) in series.items():
        # dict keeps the last value of a repeated step
        per_layer[name] = dict(zip(np.asarray(steps, dtype=np.int64).tolist(), np.asarray(values, dtype=float)))
    common = sorted(set.intersection(*(set(d) for d in per_layer.values())))
    grid = np.array(common, dtype=np.int64)
    return grid, {name: np.array([d[s] for s in common], dtype=np.float64) for name, d in per_layer.items()}


def _circular_dilate(indicator: np.ndarray, tolerance: int) -> np.ndarray:
    """Σ_{|o| ≤ tolerance} indicator[(t + o) mod T] along the last axis."""
    dilated = indicator.copy()
    for offset in range(1, tolerance + 1):
        dilated += np.roll(indicator, offset, axis=-1) + np.roll(indicator, -offset, axis=-1)
    return dilated


def _circular_cross_correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """c[k] = Σ_u a[u] b[(u + k) mod T], rounded (a, b are counts)."""
    c = np.fft.irfft(np.conj(np.fft.rfft(a)) * np.fft.rfft(b), n=len(a))
    return np.rint(c)


def _check_settings(*, smooth: int, window: int, tolerance: int, n_draws: int) -> None:
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    if n_draws < 1:
        raise ValueError(f"n_draws must be >= 1, got {n_draws}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if smooth < 1 or smooth % 2 == 0:
        raise ValueError(f"smooth must be an odd integer >= 1, got {smooth}")


def _finite_grid(
    series: Mapping[str, Values], layers: tuple[str, ...], steps: Steps | None, window: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """The series stacked (L, T) on the steps where every layer is finite, those steps,
    and how many were dropped; SyncError when too few layers or steps are left."""
    if len(layers) < 2:
        raise SyncError(
            f"synchronisation needs at least 2 layer series, got {len(layers)}"
            + (f" ({layers[0]!r})" if layers else "")
        )
    arrays = [np.asarray(series[name], dtype=np.float64).ravel() for name in layers]
    if len({len(a) for a in arrays}) != 1:
        raise ValueError(
            "all series must have the same length (align them with align_on_common_steps); got lengths "
            + ", ".join(f"{name}: {len(a)}" for name, a in zip(layers, arrays))
        )
    values = np.stack(arrays)
    step_grid = np.arange(values.shape[1]) if steps is None else np.asarray(steps, dtype=np.int64)
    if len(step_grid) != values.shape[1]:
        raise ValueError(f"steps has length {len(step_grid)}, the series {values.shape[1]}")
    finite = np.isfinite(values).all(axis=0)
    values, step_grid = values[:, finite], step_grid[finite]
    needed = 2 * window + 3
    if values.shape[1] < needed:
        raise SyncError(
            f"series too short for the synchronisation test: {values.shape[1]} finite steps, "
            f"need at least {needed} for window={window}"
        )
    return values, step_grid, int((~finite).sum())


def _pair_correlations(minima: np.ndarray, dilated: np.ndarray) -> dict[tuple[int, int], np.ndarray]:
    """c_lk for every layer pair l < k: c_lk[d] = S_lk when layer l is shifted d
    further than layer k (integer counts, length T)."""
    layers = minima.shape[0]
    return {
        (i, j): _circular_cross_correlation(minima[i], dilated[j]).astype(np.int64)
        for i in range(layers)
        for j in range(i + 1, layers)
    }


def _coincidence_counts(
    correlations: Mapping[tuple[int, int], np.ndarray], layers: int, n_draws: int, seed: int
) -> tuple[float, np.ndarray]:
    """The statistic S on the real alignment and under each circular-shift draw."""
    length = len(next(iter(correlations.values())))
    rng = np.random.default_rng(seed)
    shifts = rng.integers(0, length, size=(n_draws, layers))
    observed = 0.0
    null = np.zeros(n_draws, dtype=np.float64)
    for (i, j), correlation in correlations.items():
        # Shifting layer i by s_i and layer j by s_j gives c_ij[(s_i - s_j) mod T].
        observed += correlation[0]
        null += correlation[(shifts[:, i] - shifts[:, j]) % length]
    return float(observed), null


def _exact_tail(correlations: Mapping[tuple[int, int], np.ndarray], layers: int, observed: float) -> float:
    """P(S_null ≥ S) over all T^(L−1) joint offsets, layer 0 fixed at offset 0."""
    length = len(next(iter(correlations.values())))
    offsets = [np.zeros(1, dtype=np.int64)] + [np.arange(length)] * (layers - 1)
    grids = np.meshgrid(*offsets, indexing="ij", sparse=True)
    total = np.zeros([len(o) for o in offsets], dtype=np.int64)
    for (i, j), correlation in correlations.items():
        total += correlation[(grids[i] - grids[j]) % length]
    return float(np.count_nonzero(total >= observed)) / total.size


def _convolution_tail(correlations: Mapping[tuple[int, int], np.ndarray], observed: float) -> float:
    """P(Σ_pairs X_lk ≥ S) for independent X_lk ~ c_lk[uniform]: the exact per-pair
    laws convolved directly (no FFT, so small tails keep their relative precision)."""
    law = np.ones(1)
    for correlation in correlations.values():
        law = np.convolve(law, np.bincount(correlation) / len(correlation))
    start = max(int(np.ceil(observed - 1e-9)), 0)
    return float(min(law[start:].sum(), 1.0)) if start < len(law) else 0.0


def fine_p_value(
    correlations: Mapping[tuple[int, int], np.ndarray],
    layers: int,
    observed: float,
    max_enumeration: int = MAX_ENUMERATION,
) -> tuple[float, str]:
    """P(S_null ≥ S) under the circular-shift null and the method used:
    :data:`EXACT` when T^(L−1) ≤ ``max_enumeration``, else :data:`CONVOLUTION`.

    ``correlations`` maps each pair (l, k), l < k, to c_lk (integer counts, length T):
    S_null = Σ_{l<k} c_lk[(s_l − s_k) mod T] with s_l independent uniform offsets.
    """
    length = len(next(iter(correlations.values())))
    if float(length) ** (layers - 1) <= max_enumeration:
        return _exact_tail(correlations, layers, observed), EXACT
    return _convolution_tail(correlations, observed), CONVOLUTION


def format_p_value(result: SyncResult) -> str:
    """``p = 3.2e-05 (exact over shifts); Monte Carlo p = 0.0005 (1999 draws)``,
    the fine p printed as ``p < 1e-12`` below :data:`P_FLOOR`."""
    fine = result.fine_p_value
    if not np.isfinite(fine):
        return f"p = {result.p_value:.3g} (Monte Carlo, {result.n_draws} draws)"
    shown = f"p < {P_FLOOR:.0e}" if fine < P_FLOOR else f"p = {fine:.2g}"
    method = result.fine_method
    if (
        method == EXACT
        and not result.driver_removed
        and fine * float(len(result.steps)) ** (len(result.layers) - 1) < 1.5
    ):
        method += ", the smallest p the shift null gives: 1/T^(L-1)"
    return f"{shown} ({method}); Monte Carlo p = {result.p_value:.3g} ({result.n_draws} draws)"


def require_per_step(window_steps: Values | None) -> None:
    """Refuse per-layer series summed over logging windows.

    Args:
        window_steps: the run's ``lca/window_steps`` values (measured steps per point of the
            per-layer series); None (not logged) means one step per point.

    Raises:
        SyncError: some point holds more than one measured step.
    """
    counts = np.asarray([] if window_steps is None else window_steps, dtype=np.float64)
    if counts.size and bool(np.any(counts > 1)):
        raise SyncError(
            f"the per-layer LCA series are sums over logging windows (up to {int(counts.max())} measured steps per "
            "point, trainer.log_every_n_steps), not per-step series; the synchronisation test asks whether the "
            "layers' per-iteration minima coincide, which window sums cannot answer. Rerun with "
            "LossChangeAllocation(per_step_series=True)"
        )


def describe_test(result: SyncResult) -> str:
    """The statistic's definition with the result's settings, in one paragraph
    (both versions: raw and shared driver removed)."""
    smoothing = "no smoothing" if result.smooth == 1 else f"a centred moving average of width {result.smooth}"
    return (
        "on per-step series (one measured step per point; series summed over logging windows are refused): "
        f"a minimum is a measured step where a layer's LCA series, after {smoothing}, is strictly lower than every "
        f"other step within {result.window} measured steps (none within {result.window} of either end); counted: "
        f"pairs of minima of two different layers at most {result.tolerance} measured steps apart, summed over layer "
        "pairs; null: each layer shifted circularly by an independent uniform offset; shared driver removed: the same "
        "on u_l = z_l - mean over layers of z_k (z_l the layer's standardised series), the null shifting z_l before "
        "the same map; p (one-sided): exact = fraction of all joint shifts (T^(L-1) raw, T^L driver removed) with at "
        "least as many pairs; "
        "otherwise the convolution of the exact per-pair laws (raw; approximation, exact mean and variance) or the "
        "normal tail of the Monte-Carlo null (driver removed; approximation); Monte Carlo: "
        f"{result.n_draws} draws with the +1 correction"
    )


def remove_shared_driver(values: np.ndarray) -> np.ndarray:
    """Each layer's deviation from the layers' mean, on standardised series:
    z_l = (x_l − mean_t x_l) / std_t x_l, u_l(t) = z_l(t) − (1/L) Σ_k z_k(t),
    along the last axis of ``values`` (…, L, T).

    A driver that every layer follows (z_l ≈ c·d(t) + noise, the case of layer
    series that correlate 0.97 with each other) is the same in every z_l and
    cancels. The map is fixed (no fitted coefficient), so the null applies the
    same map to circularly shifted z_l and the anti-correlation it creates
    (Σ_l u_l = 0) is in the null as in the data."""
    z = _standardise(values)
    return z - z.mean(axis=-2, keepdims=True)


def _standardise(values: np.ndarray) -> np.ndarray:
    """(x − mean_t x) / std_t x along the last axis (a constant series: x − mean)."""
    values = np.asarray(values, dtype=np.float64)
    spread = values.std(axis=-1, keepdims=True)
    return (values - values.mean(axis=-1, keepdims=True)) / np.where(spread > 0, spread, 1.0)


def _minima_of(values: np.ndarray, smooth: int, window: int, tolerance: int) -> tuple[np.ndarray, ...]:
    """Smoothed series, minima indicators and their dilation by ``tolerance`` (…, L, T)."""
    smoothed = moving_average(values, smooth)
    minima = local_minima(smoothed, window).astype(np.float64)
    return smoothed, minima, _circular_dilate(minima, tolerance)


def _pair_statistic(minima: np.ndarray, dilated: np.ndarray) -> np.ndarray:
    """S = Σ_{l<k} Σ_t m_l(t) m̃_k(t) over the last two axes (…, L, T); the pair
    term is symmetric, so S = ½ Σ_l Σ_t m_l(t) (Σ_k m̃_k(t) − m̃_l(t))."""
    others = dilated.sum(axis=-2, keepdims=True) - dilated
    return 0.5 * np.rint((minima * others).sum(axis=(-2, -1)))


def _shifted_driver_removed(z: np.ndarray, shifts: np.ndarray, settings: tuple[int, int, int]) -> np.ndarray:
    """S of the driver-removed series with layer l shifted by shifts[:, l] (draws, L)."""
    length = z.shape[-1]
    counts = np.empty(len(shifts))
    for start in range(0, len(shifts), 256):  # bounded memory: 256 × L × T at a time
        chunk = shifts[start : start + 256]
        index = (np.arange(length)[None, None, :] - chunk[:, :, None]) % length
        shifted = np.take_along_axis(np.broadcast_to(z, (len(chunk), *z.shape)), index, axis=-1)
        _, minima, dilated = _minima_of(remove_shared_driver(shifted), *settings)
        counts[start : start + len(chunk)] = _pair_statistic(minima, dilated)
    return counts


def _driver_removed_fine_p(
    z: np.ndarray, observed: float, null: np.ndarray, settings: tuple[int, int, int], max_enumeration: int
) -> tuple[float, str]:
    """Exact over all T^L joint shifts when T^L·L·T ≤ 25·``max_enumeration`` (the minima
    are found again on each shifted series, whose ends are not circular, so a common
    shift is not a no-op); else the normal tail with the Monte-Carlo null's mean and
    spread (continuity-corrected)."""
    layers, length = z.shape
    if float(length) ** layers * layers * length <= 25.0 * max_enumeration:
        grids = np.meshgrid(*([np.arange(length)] * layers), indexing="ij")
        every = _shifted_driver_removed(z, np.stack([g.ravel() for g in grids], axis=1), settings)
        return float(np.count_nonzero(every >= observed)) / len(every), EXACT
    spread = float(null.std())
    if spread == 0:
        return (1.0 if observed <= null.mean() else 0.0), NORMAL
    score = (observed - 0.5 - float(null.mean())) / spread
    return float(0.5 * math.erfc(score / math.sqrt(2.0))), NORMAL


def _driver_removed_counts(
    values: np.ndarray, settings: tuple[int, int, int], n_draws: int, seed: int, max_enumeration: int
) -> tuple[np.ndarray, float, np.ndarray, float, str]:
    """Driver-removed series, S, its null (same shifts as the raw test: one offset per
    layer), and the fine p-value with its method."""
    if values.shape[0] < 3:
        raise SyncError(f"removing the shared driver needs at least 3 layer series, got {values.shape[0]}")
    z = _standardise(values)  # shifting commutes with standardising: do it once
    observed = float(_pair_statistic(*_minima_of(remove_shared_driver(z), *settings)[1:]))
    shifts = np.random.default_rng(seed).integers(0, values.shape[-1], size=(n_draws, values.shape[0]))
    null = _shifted_driver_removed(z, shifts, settings)
    fine, method = _driver_removed_fine_p(z, observed, null, settings, max_enumeration)
    return remove_shared_driver(z), observed, null, fine, method


def synchronisation_test(
    series: Mapping[str, Values],
    steps: Steps | None = None,
    *,
    smooth: int = 1,
    window: int = 2,
    tolerance: int = 0,
    n_draws: int = 2000,
    seed: int = 0,
    remove_driver: bool = False,
    max_enumeration: int = MAX_ENUMERATION,
) -> SyncResult:
    """Test whether the layers' local minima coincide more often than chance.

    See the module docstring for the definition (our operationalisation, not
    the paper's unpublished test).

    Args:
        series: ``{layer: values}``, every series the same length T, on the same
            steps (use :func:`align_on_common_steps` first when they are not).
        steps: the step of each index (default ``0 … T−1``), used only to
            report where the minima are.
        smooth: odd width of the centred moving average (1 = no smoothing).
        window: a minimum is strictly lower than every point within ``window``.
        tolerance: minima of two layers at most this many indices apart coincide.
        n_draws: number of circular-shift draws for the Monte-Carlo null.
        seed: seed of the NumPy generator for the draws.
        remove_driver: test each layer's deviation from the layers' mean of the
            standardised series (:func:`remove_shared_driver`; 3 layers or more).
        max_enumeration: most joint offsets the exact fine p-value enumerates.

    Raises:
        SyncError: fewer than 2 layers (3 with ``remove_driver``), or fewer than
            ``2 * window + 3`` finite steps (not enough interior points to find minima).
        ValueError: invalid parameters or series of different lengths.
    """
    _check_settings(smooth=smooth, window=window, tolerance=tolerance, n_draws=n_draws)
    layers = tuple(series)
    values, step_grid, dropped = _finite_grid(series, layers, steps, window)
    draws = (n_draws, seed)
    fields = _analyse(values, step_grid, layers, (smooth, window, tolerance), draws, remove_driver, max_enumeration)
    return SyncResult(
        layers=layers,
        steps=step_grid,
        smooth=smooth,
        window=window,
        tolerance=tolerance,
        n_draws=n_draws,
        seed=seed,
        dropped_steps=dropped,
        driver_removed=remove_driver,
        **fields,
    )


def _analyse(
    values: np.ndarray,
    step_grid: np.ndarray,
    layers: tuple[str, ...],
    settings: tuple[int, int, int],
    draws: tuple[int, int],
    remove_driver: bool,
    max_enumeration: int,
) -> dict[str, Any]:
    """The result's fields computed from the data: minima, S, its null, both p-values."""
    n_draws, seed = draws
    if remove_driver:
        values, observed, null, fine, method = _driver_removed_counts(values, settings, n_draws, seed, max_enumeration)
    smoothed, minima, dilated = _minima_of(values, *settings)
    if not remove_driver:
        correlations = _pair_correlations(minima, dilated)
        observed, null = _coincidence_counts(correlations, len(layers), n_draws, seed)
        fine, method = fine_p_value(correlations, len(layers), observed, max_enumeration)
    others = dilated.sum(axis=0)[None, :] - dilated  # minima of *other* layers near t
    coincident = ((minima > 0) & (others > 0)).any(axis=0)
    return {
        "smoothed": smoothed,
        "minima_steps": {name: step_grid[minima[k] > 0] for k, name in enumerate(layers)},
        "coincident_steps": step_grid[coincident],
        "observed": float(observed),
        "null_distribution": null,
        "null_mean": float(null.mean()),
        "null_std": float(null.std()),
        "p_value": (1.0 + float(np.count_nonzero(null >= observed))) / (1.0 + n_draws),
        "fine_p_value": fine,
        "fine_method": method,
    }
