"""Server-side downsampling: a run's steps grouped into at most ``limit`` columns.

A long run has more steps than a chart has pixels. The steps that carry data are
grouped into at most :data:`MAX_COLUMNS` runs of consecutive steps (equal counts of
steps, so no column is empty), and each series is reduced per column in the way that
keeps its meaning:

* ``sum``: allocations (the column's value is the allocation of all its steps,
  ``Σ_{s ∈ column} LCA_s``: additive, so the heatmap's row still sums to the total);
* ``last``: cumulative series and NFA measurements (the value at the column's last step);
* ``mean``: fractions (helped fraction).

This module imports the standard library and NumPy (a TensorBoard dependency) only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = ["MAX_COLUMNS", "Columns", "Reduction", "finite"]

#: the most columns (points) a series of the tab ever has
MAX_COLUMNS = 500
Reduction = Literal["sum", "last", "mean"]


def finite(value: float) -> float | None:
    """``value``, or None (JSON null) when it is NaN or infinite."""
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class Columns:
    """Consecutive groups of steps: column ``i`` holds the steps ``first[i] … last[i]``."""

    first: tuple[int, ...]
    last: tuple[int, ...]

    @classmethod
    def over(cls, steps: Iterable[int] | np.ndarray, limit: int = MAX_COLUMNS) -> Columns:
        """Columns over the distinct ``steps``: one per step when there are at most
        ``limit``, else ``limit`` groups of ⌈n/limit⌉ or ⌊n/limit⌋ consecutive steps."""
        array = steps if isinstance(steps, np.ndarray) else np.fromiter(steps, dtype=np.int64)
        distinct = np.unique(array).tolist()
        n = len(distinct)
        if n <= limit:
            return cls(tuple(distinct), tuple(distinct))
        bounds = [(i * n) // limit for i in range(limit + 1)]
        first = tuple(distinct[bounds[i]] for i in range(limit))
        last = tuple(distinct[bounds[i + 1] - 1] for i in range(limit))
        return cls(first, last)

    @property
    def downsampled(self) -> bool:
        """Whether any column holds more than one step."""
        return self.first != self.last

    def __len__(self) -> int:
        return len(self.first)

    def reduce(
        self, steps: Sequence[int] | np.ndarray, values: Sequence[float] | np.ndarray, how: Reduction
    ) -> list[float | None]:
        """One value per column (None where a column has no finite value of the series);
        ``steps`` ascending."""
        if not len(self):
            return []
        step = np.asarray(steps, dtype=np.int64)
        value = np.asarray(values, dtype=np.float64)
        column = np.searchsorted(np.asarray(self.first), step, side="right") - 1
        keep = (column >= 0) & np.isfinite(value)
        keep &= step <= np.asarray(self.last, dtype=np.int64)[column.clip(0)]
        column, value = column[keep], value[keep]
        counts = np.bincount(column, minlength=len(self))
        out: np.ndarray
        if how == "last":  # the value at the highest step of each column (steps ascending)
            ends = np.flatnonzero(np.r_[column[1:] != column[:-1], True]) if len(column) else column
            out = np.zeros(len(self))
            out[column[ends]] = value[ends]
        else:
            out = np.bincount(column, weights=value, minlength=len(self))
            if how == "mean":
                out = out / np.maximum(counts, 1)
        return [x if c else None for x, c in zip(out.tolist(), counts.tolist())]

    def increments(
        self, steps: Sequence[int] | np.ndarray, cumulative: Sequence[float] | np.ndarray
    ) -> list[float | None]:
        """Each column's increase of a cumulative series of which only some steps were kept:
        the series at each column's last step, linear between kept points (0 before the
        first column), differenced. Exact between kept points; the columns sum to the last
        kept value."""
        step = np.asarray(steps, dtype=np.float64)
        value = np.asarray(cumulative, dtype=np.float64)
        keep = np.isfinite(value)
        if not len(self) or not keep.any():
            return [None] * len(self)
        xp = np.r_[self.first[0] - 1, step[keep]]
        at_ends = np.interp(np.asarray(self.last, dtype=np.float64), xp, np.r_[0.0, value[keep]])
        return np.diff(at_ends, prepend=0.0).tolist()

    def as_json(self) -> dict[str, object]:
        return {"first": list(self.first), "last": list(self.last), "downsampled": self.downsampled}
