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
   uniform random offset (``n_draws`` draws, NumPy generator seeded by
   ``seed``), and S is recomputed. Shifting keeps each layer's number of minima
   and their spacing (the series' own autocorrelation), and destroys only their
   alignment *across* layers. The null distribution is computed exactly for each
   draw from circular cross-correlations of the indicators (FFT), so draws are
   cheap.
5. **p-value** (one-sided, more coincidences than chance), with the +1
   correction that keeps it a valid p-value for a Monte-Carlo test:

       p = (1 + #{draws with S_null ≥ S}) / (1 + n_draws)  ∈ (0, 1].

Caveats: steps are treated as evenly spaced (measure LCA at a fixed interval);
anything that moves every layer at once produces real coincidences that this
test will (correctly) call synchronisation, including a shared minibatch when
the LCA loss is the training batch (``probe="batch"``: an easy batch lowers
every layer's LCA), epoch boundaries and learning-rate drops. The circular
shift assumes the minima process is roughly stationary over the run.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

#: Steps or values of a series: a list, or a NumPy array (what the report's reader returns).
Steps = Sequence[int] | np.ndarray
Values = Sequence[float] | np.ndarray
_Key = TypeVar("_Key", bound=Hashable)  # a layer name, or a unit index

__all__ = [
    "SyncError",
    "SyncResult",
    "align_on_common_steps",
    "local_minima",
    "moving_average",
    "synchronisation_test",
]


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
    dilated = indicator.copy()
    for offset in range(1, tolerance + 1):
        dilated += np.roll(indicator, offset) + np.roll(indicator, -offset)
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


def _coincidence_counts(minima: np.ndarray, dilated: np.ndarray, n_draws: int, seed: int) -> tuple[float, np.ndarray]:
    """The statistic S on the real alignment and under each circular-shift draw."""
    layers, length = minima.shape
    rng = np.random.default_rng(seed)
    shifts = rng.integers(0, length, size=(n_draws, layers))
    observed = 0.0
    null = np.zeros(n_draws, dtype=np.float64)
    for i in range(layers):
        for j in range(i + 1, layers):
            # Shifting layer i by s_i and layer j by s_j gives c_ij[(s_i - s_j) mod T].
            correlation = _circular_cross_correlation(minima[i], dilated[j])
            observed += correlation[0]
            null += correlation[(shifts[:, i] - shifts[:, j]) % length]
    return float(observed), null


def synchronisation_test(
    series: Mapping[str, Values],
    steps: Steps | None = None,
    *,
    smooth: int = 1,
    window: int = 2,
    tolerance: int = 0,
    n_draws: int = 2000,
    seed: int = 0,
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
        n_draws: number of circular-shift draws for the null.
        seed: seed of the NumPy generator for the draws.

    Raises:
        SyncError: fewer than 2 layers, or fewer than ``2 * window + 3`` finite
            steps (not enough interior points to find minima).
        ValueError: invalid parameters or series of different lengths.
    """
    _check_settings(smooth=smooth, window=window, tolerance=tolerance, n_draws=n_draws)
    layers = tuple(series)
    values, step_grid, dropped = _finite_grid(series, layers, steps, window)
    smoothed = moving_average(values, smooth)
    minima = local_minima(smoothed, window).astype(np.float64)  # (L, T)
    dilated = np.stack([_circular_dilate(row, tolerance) for row in minima])
    observed, null = _coincidence_counts(minima, dilated, n_draws, seed)
    p_value = (1.0 + float(np.count_nonzero(null >= observed))) / (1.0 + n_draws)
    others = dilated.sum(axis=0)[None, :] - dilated  # minima of *other* layers near t
    coincident = ((minima > 0) & (others > 0)).any(axis=0)

    return SyncResult(
        layers=layers,
        steps=step_grid,
        smoothed=smoothed,
        minima_steps={name: step_grid[minima[k] > 0] for k, name in enumerate(layers)},
        coincident_steps=step_grid[coincident],
        observed=float(observed),
        null_distribution=null,
        null_mean=float(null.mean()),
        null_std=float(null.std()),
        p_value=float(p_value),
        smooth=smooth,
        window=window,
        tolerance=tolerance,
        n_draws=n_draws,
        seed=seed,
        dropped_steps=dropped,
    )
