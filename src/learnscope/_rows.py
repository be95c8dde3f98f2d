"""Many tensors packed into rows of one reused buffer, so that a few whole-buffer passes
replace a few small ops per tensor: the row width, how many rows an entry count takes, and
the small cache that keeps the buffers of the last few lists of tensors seen (a training
run presents the same lists step after step). Used by the per-step statistics
(``_stats.RowSums``) and the decomposition's deferred dots (``decompose._deferred_dots``)."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

#: Entries per row: float32 sums of ±1 over a row stay exact integers, and of products or
#: powers stay accurate to ~1e-7 relative.
ROW = 256

#: How many lists of tensors a :class:`KeptBuffers` keeps (a callback sees a few: the main
#: list, the ablation corners, the small tensors of a step).
KEPT = 4

T = TypeVar("T")


def rows_for(entries: int) -> int:
    """Rows of :data:`ROW` entries that ``entries`` take (the last one may be partly used)."""
    return -(-entries // ROW)


class KeptBuffers(Generic[T]):
    """The buffers built by ``build()`` for the last :data:`KEPT` keys asked for; all are
    dropped when a new key would exceed that (no buffer is built per step)."""

    def __init__(self) -> None:
        self._kept: dict[Hashable, T] = {}

    def get(self, key: Hashable, build: Callable[[], T]) -> T:
        kept = self._kept.get(key)
        if kept is None:
            if len(self._kept) >= KEPT:
                self._kept.clear()
            kept = self._kept[key] = build()
        return kept
