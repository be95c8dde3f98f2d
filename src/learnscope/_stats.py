"""Per-step statistics of the allocations ``A = k ⊙ Δ``, without materialising A.

Every measured step needs, per parameter tensor, the helped / hurt / non-zero counts
and the raw power sums Σa, Σa², Σa³, Σa⁴ (for the total, the layer sums and the
kurtosis). They are computed from ``k`` and ``Δ`` in slices, so no parameter-sized
temporary is ever alive (the slices bound them to about 1 MiB), or, with
``compile_statistics=True``, in one fused ``torch.compile`` kernel per group of
tensors that reads k and Δ once.

:class:`StreamingHistogram` builds the same histogram as TensorBoard's
``SummaryWriter.add_histogram(values)`` (its default exponential buckets) from
slices, so histogram steps do not need the concatenated allocations either.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from learnscope._compile import call_compiled
from learnscope._readback import to_python
from learnscope.records import Counts, Moments

_SLICE = 1 << 15  # elements per slice on CPU: float64 temporaries of 256 KiB, cache-resident
# Elements per slice elsewhere (CUDA): each eager op is a kernel launch, so slices of 2¹⁵ would
# launch ~13 kernels per 32 k parameters; 2²⁰ keeps the float64 temporaries at 8 MiB each.
_DEVICE_SLICE = 1 << 20
_HISTOGRAM_SLICE = 1 << 16  # a sorted float32 copy of 256 KiB and its float64 view of 512 KiB


def _edges() -> list[float]:
    """TensorBoard's default histogram bucket edges (``SummaryWriter.default_bins``)."""
    v, buckets = 1e-12, []
    while v < 1e20:
        buckets.append(v)
        v *= 1.1
    return [-b for b in reversed(buckets)] + [0.0] + buckets


_EDGES = _edges()
_EDGES_ARRAY = np.asarray(_EDGES)


class StreamingHistogram:
    """A histogram accumulated slice by slice, equal to ``add_histogram`` of the
    concatenated (finite) values: same buckets, counts, min, max, sum and sum of
    squares (float64). Non-finite values are left out, as learnscope's logging does."""

    def __init__(self) -> None:
        self.counts: np.ndarray | None = None
        self.num = 0
        self.sum = 0.0
        self.sum_squares = 0.0
        self.min = math.inf
        self.max = -math.inf

    def add(self, values: Tensor) -> None:
        flat = values.detach().reshape(-1)
        if flat.dtype not in (torch.float32, torch.float64):  # numpy has no bfloat16; float32 holds fp16/bf16 exactly
            flat = flat.float()
        for start in range(0, flat.numel(), _HISTOGRAM_SLICE):
            # Sorted once, in the values' own dtype: min, max and every bucket count come from the sorted
            # slice. The counts are np.histogram's (TensorBoard's make_histogram): buckets [e_i, e_i+1), the
            # last one closed, values outside dropped, found by the same binary searches it makes.
            ordered = np.sort(flat[start : start + _HISTOGRAM_SLICE].cpu().numpy())
            if ordered.size and not (np.isfinite(ordered[0]) and np.isfinite(ordered[-1])):
                ordered = ordered[np.isfinite(ordered)]  # ±inf sort to the ends, NaN to the end
            if ordered.size == 0:
                continue
            wide = ordered.astype(np.float64, copy=False)
            positions = np.append(
                np.searchsorted(wide, _EDGES_ARRAY[:-1], "left"), np.searchsorted(wide, _EDGES_ARRAY[-1], "right")
            )
            counts = np.diff(positions)
            self.counts = counts if self.counts is None else self.counts + counts
            self.num += wide.size
            self.sum += float(wide.sum())
            self.sum_squares += float(np.dot(wide, wide))
            self.min = min(self.min, float(wide[0]))
            self.max = max(self.max, float(wide[-1]))

    def buckets(self) -> tuple[list[float], list[int]] | None:
        """(bucket right limits, counts), trimmed to the support as TensorBoard's
        ``make_histogram`` does; None when no value was added."""
        if self.num == 0 or self.counts is None:
            return None
        counts, limits = self.counts, _EDGES_ARRAY
        if counts.sum() == 0:  # every value beyond ±1e20: one bucket holding them, as a fallback
            return [float(self.max)], [int(self.num)]
        nonzero = np.flatnonzero(counts)
        start, end = int(nonzero[0]), int(nonzero[-1]) + 1
        kept = counts[start - 1 : end] if start > 0 else np.concatenate([[0], counts[:end]])
        return limits[start : end + 1].tolist(), [int(c) for c in kept]

    def write(self, writer: Any, tag: str, step: int) -> None:
        """``add_histogram_raw`` on a SummaryWriter (nothing when empty)."""
        buckets = self.buckets()
        if buckets is None:
            return
        limits, counts = buckets
        writer.add_histogram_raw(
            tag,
            min=self.min,
            max=self.max,
            num=self.num,
            sum=self.sum,
            sum_squares=self.sum_squares,
            bucket_limits=limits,
            bucket_counts=counts,
            global_step=step,
        )


def _from_sums(
    numel: int, net: float, nonzero: float, s1: float, s2: float, s3: float, s4: float
) -> tuple[Counts, Moments]:
    helped, hurt = round((nonzero - net) / 2), round((nonzero + net) / 2)
    return Counts(helped, hurt, helped + hurt, numel), Moments(numel, s1, s2, s3, s4)


#: Δ as a tensor, or as ``(start, end)`` with Δ = end − start formed slice by slice (never whole).
Delta = Tensor | tuple[Tensor, Tensor]


def _flat(tensor: Tensor) -> Tensor:
    return tensor.detach().reshape(-1)


def _slice_size(tensor: Tensor) -> int:
    return _SLICE if tensor.device.type == "cpu" else _DEVICE_SLICE


def product_slices(k: Tensor, delta: Delta | None = None) -> Iterator[tuple[slice, Tensor]]:
    """``a = k ⊙ delta`` (or ``k`` itself when ``delta`` is None) over the flattened
    tensors, one slice at a time: ``(the slice, a[slice])``, so that no parameter-sized
    temporary is alive. ``delta`` may be ``(start, end)``: each slice of Δ is then
    end − start (bitwise what ``step_delta`` writes)."""
    flat_k = _flat(k)
    flat_d = _flat(delta) if isinstance(delta, Tensor) else None
    flat_s, flat_e = (_flat(delta[0]), _flat(delta[1])) if isinstance(delta, tuple) else (None, None)
    size = _slice_size(flat_k)
    for start in range(0, flat_k.numel(), size):
        where = slice(start, start + size)
        piece = flat_k[where]
        if flat_d is not None:
            piece = piece * flat_d[where]
        elif flat_s is not None and flat_e is not None:
            piece = piece * (flat_e[where] - flat_s[where])
        yield where, piece


def product_sums(k: Tensor, delta: Delta | None = None, histogram: StreamingHistogram | None = None) -> Tensor:
    """[Σsign, Σsign², Σa, Σa², Σa³, Σa⁴] of ``a = k ⊙ delta`` (or of ``k`` itself when
    ``delta`` is None): float64, on k's device, without a device sync. Slice by slice:
    signs give helped / hurt / non-zero (helped = (nz − Σsign)/2, exact), float64 dots
    give the moments. ``delta`` may be ``(start, end)``: each slice of Δ is then
    end − start (bitwise what ``step_delta`` writes). ``histogram`` also receives every
    slice of a."""
    values = []
    for _, piece in product_slices(k, delta):
        if histogram is not None:
            histogram.add(piece)
        sign = torch.sign(piece).float()  # exact counts also for bf16 / fp16 allocations
        p64 = piece.double()
        sq = p64 * p64
        values.append(
            torch.stack(
                [
                    sign.sum().double(),
                    torch.dot(sign, sign).double(),
                    p64.sum(),
                    sq.sum(),
                    torch.dot(sq, p64),
                    torch.dot(sq, sq),
                ]
            )
        )
    if not values:
        return torch.zeros(6, dtype=torch.float64, device=k.device)
    return values[0] if len(values) == 1 else torch.stack(values).sum(0)


def product_stats(
    k: Tensor, delta: Delta | None = None, histogram: StreamingHistogram | None = None
) -> tuple[Counts, Moments]:
    """Counts and raw moments of ``a = k ⊙ delta`` (see ``product_sums``)."""
    return _from_sums(k.numel(), *product_sums(k, delta, histogram).tolist())


def many_product_stats(
    ks: Sequence[Tensor], deltas: Sequence[Delta | None], histograms: list[StreamingHistogram | None] | None = None
) -> list[tuple[Counts, Moments]]:
    """``product_stats`` of every pair, read back to Python in one device sync."""
    hists = histograms or [None] * len(ks)
    rows = to_python([product_sums(k, d, h) for k, d, h in zip(ks, deltas, hists)])
    return [_from_sums(k.numel(), *row) for k, row in zip(ks, rows)]


def _sums_row(a: Tensor) -> Tensor:
    sign = torch.sign(a).float()
    a64 = a.double()
    sq = a64 * a64
    return torch.stack(
        [sign.sum().double(), (sign * sign).sum().double(), a64.sum(), sq.sum(), (sq * a64).sum(), (sq * sq).sum()]
    )


def _fused_sums(ks: list[Tensor], deltas: list[Tensor]) -> Tensor:
    """[Σsign, Σsign², Σa, Σa², Σa³, Σa⁴] of a = k ⊙ Δ for each pair of 1-D tensors:
    one row per pair, fused by the compiler into one pass over each pair."""
    return torch.stack([_sums_row(k * delta) for k, delta in zip(ks, deltas)])


def _fused_sums_between(ks: list[Tensor], starts: list[Tensor], ends: list[Tensor]) -> Tensor:
    """``_fused_sums`` with Δ = end − start computed in the same pass (Δ is never written)."""
    return torch.stack([_sums_row(k * (end - start)) for k, start, end in zip(ks, starts, ends)])


_EXACT_COUNTS = 1 << 24  # entries per compiled piece: float32 sums of signs are exact up to 2²⁴
_GROUP = 16  # tensors per compiled call: one call's overhead (~40 µs) for many small tensors,
# and one graph for every group of this length (the last, shorter group compiles a second one)


class ProductStats:
    """``product_stats`` of many tensors. ``compiled=True`` sums groups of tensors with one
    fused kernel (``torch.compile``, compiled once per process for every size), falling
    back to the eager slices with one warning if compiling fails (e.g. no C++ compiler)."""

    def __init__(self, compiled: bool) -> None:
        self.compiled = compiled

    def __call__(self, k: Tensor, delta: Tensor, histogram: StreamingHistogram | None = None) -> tuple[Counts, Moments]:
        return self.many([k], [delta], [histogram])[0]

    def many(
        self, ks: list[Tensor], deltas: list[Delta], histograms: list[StreamingHistogram | None] | None = None
    ) -> list[tuple[Counts, Moments]]:
        """Counts and moments of every ``k ⊙ delta`` pair (histograms: eager, slice by slice).
        A delta may be ``(start, end)`` (Δ = end − start, read in the same pass)."""
        if not self.compiled or (histograms is not None and any(h is not None for h in histograms)):
            return many_product_stats(ks, deltas, histograms)
        rows = [[0.0] * 6 for _ in ks]
        for between, todo in _pieces(ks, deltas).items():
            kernel = _fused_sums_between if between else _fused_sums
            for first in range(0, len(todo), _GROUP):
                group = todo[first : first + _GROUP]
                operands = list(zip(*(piece for _, piece in group)))
                sums = call_compiled(kernel, *operands, purpose="compile_statistics is on")
                if sums is None:  # compiling failed (warned once): the eager statistics from here on
                    self.compiled = False
                    return many_product_stats(ks, deltas)
                for (i, _), row in zip(group, sums.tolist()):
                    rows[i] = [a + b for a, b in zip(rows[i], row)]
        return [_from_sums(k.numel(), *rows[i]) for i, k in enumerate(ks)]


def _pieces(ks: list[Tensor], deltas: list[Delta]) -> dict[bool, list[tuple[int, list[Tensor]]]]:
    """(tensor index, flat operands) pieces of at most ``_EXACT_COUNTS`` entries each, so
    that the kernel's float32 sums of signs stay exact (the pieces' rows add up per
    tensor), keyed by whether Δ is given as ``(start, end)``."""
    pieces: dict[bool, list[tuple[int, list[Tensor]]]] = {False: [], True: []}
    for i, (k, d) in enumerate(zip(ks, deltas)):
        between = isinstance(d, tuple)
        flat = [_flat(k), *((_flat(d[0]), _flat(d[1])) if isinstance(d, tuple) else (_flat(d),))]
        if flat[0].numel() <= _EXACT_COUNTS:  # one piece: the tensors themselves, no slicing
            pieces[between].append((i, flat))
            continue
        for start in range(0, flat[0].numel(), _EXACT_COUNTS):
            pieces[between].append((i, [t[start : start + _EXACT_COUNTS] for t in flat]))
    return pieces
