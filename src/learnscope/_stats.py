"""Per-step statistics of the allocations ``A = k ⊙ Δ``, without materialising A.

Every measured step needs, per parameter tensor, the helped / hurt / non-zero counts
and the raw power sums Σa, Σa², Σa³, Σa⁴ (for the total, the layer sums and the
kurtosis). By default (:class:`RowSums`) they come from a few passes over float32
rows: each tensor's ``a`` is written into rows of :data:`_ROW` entries of a reused
chunk buffer (a tensor starts on a row boundary; the rest of its last row is zero),
and each pass reduces every row at once. Σa and the counts are exact (Σa summed in
float64 as before; the signs summed in float32, exact integers per row); Σa², Σa³,
Σa⁴ are float32 sums of ``b = a·2⁻ᵉ``, each row scaled by the power of two of its
largest |a| (|b| < 1, so no power overflows and the largest terms never underflow),
accurate to ~1e-7 relative, and scaled back in float64. ``compile_statistics=True``
uses one fused ``torch.compile`` kernel per group of tensors, in float64, instead.
The float64 slices of :func:`product_sums` remain for other dtypes and as the reference.

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
from learnscope._rows import ROW as _ROW
from learnscope._rows import KeptBuffers, rows_for
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


# --------------------------------------------------------------------------- float32 rows (the default)

# Rows per chunk on CPU: 2¹⁷ entries (its float32 planes ≈ 2 MiB, reused by every chunk);
# elsewhere (CUDA) 2²² entries: each pass is one kernel launch.
_CHUNK_ROWS = 1 << 9
_DEVICE_CHUNK_ROWS = 1 << 14
_BIG_PIECE = 1 << 14  # pieces at least this long get their own ops; shorter ones share _foreach_ calls
#: Scaled allocations b = a·2ˢ are trusted while 2⁻²⁴ ≤ max|b| ≤ 2²⁴: then b⁴ ≤ 2⁹⁶ (no overflow, even
#: summed over 2²⁴ entries), and the largest b⁴ ≥ 2⁻⁹⁶, so what underflows (each < 2⁻¹⁴⁹) is < 2⁻⁵³ of it.
_SAFE = 24
_SHIFTS = (-126, 120)  # 2ˢ stays a normal float32 number; allocations beyond 2^±144 take the float64 slices

#: One piece of a tensor in a chunk: (tensor index, start, end) of its flat entries, and the
#: view of the chunk buffer it is written to (shaped like the tensor when the piece is all of it).
_Piece = tuple[int, int, int, Tensor]


class _Chunk:
    """Rows ``first:first + rows`` of a layout: its pieces and its views of the layout's buffers."""

    def __init__(
        self, layout: _Layout, first: int, rows: int, spans: list[tuple[int, int, int, int]], shapes: list[tuple]
    ) -> None:
        self.rows, self.first_row = rows, first
        self.down: Tensor | None = None  # per row, 2^min(s, 0) when some tensor here is scaled down
        self.values = layout.values[: rows * _ROW].view(rows, _ROW)
        self.planes = layout.planes[:, :rows]
        self.table = layout.table[:, first : first + rows]
        self.first = layout.wide[5, first : first + rows]
        flat = layout.values
        self.pieces: list[_Piece] = []
        self.pads: list[Tensor] = []  # the rest of each piece's last row: zeros
        for index, start, end, offset in spans:
            stop = offset + end - start
            whole = end - start == math.prod(shapes[index])
            self.pieces.append(
                (index, start, end, flat[offset:stop].view(shapes[index]) if whole else flat[offset:stop])
            )
            if (end - start) % _ROW:
                self.pads.append(flat[stop : offset + rows_for(end - start) * _ROW])


class _Layout:
    """A list of flat tensors in chunk rows: each tensor starts on a row, the rest of its last
    row is zero; the chunks share one float32 buffer and its planes. Also each row's tensor,
    the per-row results, and each tensor's scale exponent s (b = a·2ˢ; None until a step
    has been read back)."""

    def __init__(self, shapes: list[tuple], chunk_rows: int, device: torch.device) -> None:
        sizes = [math.prod(shape) for shape in shapes]
        chunks: list[list[tuple[int, int, int, int]]] = []
        owners: list[int] = []
        used = chunk_rows  # rows used in the last chunk
        for index, size in enumerate(sizes):
            start = 0
            while start < size:
                if used == chunk_rows:
                    chunks.append([])
                    used = 0
                end = min(size, start + (chunk_rows - used) * _ROW)
                chunks[-1].append((index, start, end, used * _ROW))
                rows = rows_for(end - start)
                owners += [index] * rows
                used, start = used + rows, end
        counts = [sum(rows_for(end - start) for _, start, end, _ in chunk) for chunk in chunks]
        width = max(counts, default=0)
        self.values = torch.zeros(width * _ROW, device=device)
        self.planes = torch.zeros(3, width, _ROW, device=device)
        self.table = torch.zeros(5, len(owners), device=device)  # per row: see _reduce
        self.wide = torch.zeros(6, len(owners), dtype=torch.float64, device=device)  # the table, and Σb
        self.owner = torch.tensor(owners, dtype=torch.long, device=device)
        firsts = [sum(counts[:i]) for i in range(len(counts))]
        self.chunks = [_Chunk(self, first, rows, spans, shapes) for first, rows, spans in zip(firsts, counts, chunks)]
        self.count = len(sizes)
        self.shifts: list[int] | None = None
        self.unscale = torch.ones(6, len(sizes), dtype=torch.float64, device=device)  # 2⁻ᵖˢ per row of _combine

    def scale_by(self, shifts: list[int]) -> None:
        """Use ``shifts`` from the next step on: a = b·2⁻ˢ⁺ (s⁺ = max(s, 0): b is scaled up only, so
        exactly), and the powers of c = b·2^min(s, 0) (scaled down per row where s < 0)."""
        self.shifts = shifts
        powers = [[2.0 ** (-p * s) for s in shifts] for p in (0, 4, 0, 2, 3)]
        powers.append([2.0 ** -max(s, 0) for s in shifts])
        self.unscale = torch.tensor(powers, dtype=torch.float64).to(self.unscale.device)
        down = torch.tensor([2.0 ** min(s, 0) for s in shifts], device=self.owner.device)[self.owner]
        for chunk in self.chunks:
            rows = down[chunk.first_row : chunk.first_row + chunk.rows]
            chunk.down = rows.unsqueeze(1) if bool((rows < 1).any()) else None


class RowSums:
    """``[Σsign, Σsign², Σa, Σa², Σa³, Σa⁴]`` of ``a = k ⊙ Δ`` for many float32 tensors, from
    float32 rows (see the module docstring).

    Each tensor's ``b = a·2ˢ`` is written into the rows (``a`` bitwise ``k * (end − start)``,
    then scaled exactly: 2ˢ ≥ 1 is a power of two, so no entry is rounded or lost); Σa is
    Σb·2⁻ˢ summed in float64, the signs are b's, and Σbᵖ are float32 row sums scaled back by
    2⁻ᵖˢ in float64. s comes from the previous step's Σa⁴ (max|a| ≤ (Σa⁴)^¼), as a loss scale
    follows the gradients; :meth:`settle` checks it against this step's sums and names the
    tensors whose b left the safe range, to be recomputed in float64. The layouts of the
    tensor lists seen, with their buffers, are kept (no allocation per step)."""

    def __init__(self) -> None:
        self._layouts: KeptBuffers[_Layout] = KeptBuffers()

    @torch.no_grad()
    def __call__(self, ks: Sequence[Tensor], deltas: Sequence[Delta | None]) -> Tensor | None:
        """One float64 row of sums per pair, on the tensors' device, without a device sync;
        None before the first :meth:`settle` of this list (no scale yet)."""
        layout = self._layout(ks)
        if layout.shifts is None:
            return None
        scales = [2.0 ** max(shift, 0) for shift in layout.shifts]
        for chunk in layout.chunks:
            _fill(chunk, scales, ks, deltas)
            _reduce(chunk)
        return _combine(layout)

    def settle(self, ks: Sequence[Tensor], rows: Sequence[Sequence[float]], scaled: bool) -> list[int]:
        """Set each tensor's next scale from its read-back sums ``rows``; when they were ``scaled``
        (this class's), return the indices whose b left the safe range (or overflowed): their
        sums must be recomputed in float64, then settled again with ``scaled=False``."""
        layout = self._layout(ks)
        shifts = layout.shifts or [0] * len(ks)
        redo = []
        for i, (_, nonzero, total, _, _, fourth) in enumerate(rows):
            if nonzero == 0:
                continue
            if not (math.isfinite(total) and math.isfinite(fourth) and fourth > 0):
                redo.append(i)
                continue
            high = math.log2(fourth) / 4  # log2 max|a| ≤ high ≤ log2 max|a| + ¼ log2(non-zero count)
            low = high - math.log2(nonzero) / 4
            if scaled and not -_SAFE <= low + shifts[i] <= high + shifts[i] <= _SAFE:
                redo.append(i)
            shifts[i] = min(_SHIFTS[1], max(_SHIFTS[0], math.floor(-high)))
        layout.scale_by(shifts)
        return redo if scaled else []

    def _layout(self, ks: Sequence[Tensor]) -> _Layout:
        device = ks[0].device
        shapes = [tuple(k.shape) for k in ks]
        chunk_rows = _CHUNK_ROWS if device.type == "cpu" else _DEVICE_CHUNK_ROWS
        return self._layouts.get((device, *shapes), lambda: _Layout(shapes, chunk_rows, device))


def _fill(chunk: _Chunk, scales: list[float], ks: Sequence[Tensor], deltas: Sequence[Delta | None]) -> None:
    """Write the chunk's b = a·2ˢ, and zeros to the end of each piece's last row."""
    small = _SmallPieces()
    for index, start, end, view in chunk.pieces:
        k, delta = ks[index], deltas[index]
        operands: tuple[Tensor, ...] = delta if isinstance(delta, tuple) else (k if delta is None else delta,)
        factor = None if delta is None else k
        if view.dim() == 1 and end - start != k.numel():  # a tensor split between chunks: its flat slice
            operands = tuple(_flat(t)[start:end] for t in operands)
            factor = None if factor is None else _flat(factor)[start:end]
        if end - start >= _BIG_PIECE:
            _scaled_product(view, operands, factor, scales[index])
        else:
            small.add(view, operands, factor, scales[index])
    if chunk.pads:
        torch._foreach_zero_(chunk.pads)
    small.run()


def _scaled_product(view: Tensor, operands: tuple[Tensor, ...], factor: Tensor | None, scale: float) -> None:
    """``view = 2ˢ·(end − start)·k`` (or ``2ˢ·delta·k``, ``2ˢ·k``): Δ rounded as ``step_delta``'s,
    then fl(2ˢΔ·k) = 2ˢ·fl(Δ·k) exactly (a power of two; only where Δ·k is below float32's
    normal range, < 1.2e-38, is the scaled product the more precise one)."""
    if len(operands) == 2:  # (start, end)
        torch.sub(operands[1], operands[0], out=view)
    else:
        view.copy_(operands[0])
    if factor is not None:
        torch.addcmul(_ZERO.get(view.device), view, factor, value=scale, out=view)
    elif scale != 1.0:
        view.mul_(scale)


class _Zeros:
    """A 0-dim zero per device (``addcmul``'s broadcast input)."""

    def __init__(self) -> None:
        self._zeros: dict[torch.device, Tensor] = {}

    def get(self, device: torch.device) -> Tensor:
        zero = self._zeros.get(device)
        if zero is None:
            zero = self._zeros[device] = torch.zeros((), device=device)
        return zero


_ZERO = _Zeros()


class _SmallPieces:
    """Short pieces of a chunk: their products formed by a few ``_foreach_`` calls."""

    def __init__(self) -> None:
        self.views: list[Tensor] = []
        self.ends: list[Tensor] = []
        self.starts: dict[int, Tensor] = {}  # position in views → start (Δ = end − start)
        self.factors: dict[int, Tensor] = {}  # position in views → k
        self.scales: list[float] = []

    def add(self, view: Tensor, operands: tuple[Tensor, ...], factor: Tensor | None, scale: float) -> None:
        if len(operands) == 2:  # (start, end)
            self.starts[len(self.views)] = operands[0]
        if factor is not None:
            self.factors[len(self.views)] = factor
        self.views.append(view)
        self.ends.append(operands[-1])
        self.scales.append(scale)

    def run(self) -> None:
        if not self.views:
            return
        torch._foreach_copy_(self.views, self.ends)
        for extra, op in ((self.starts, torch._foreach_sub_), (self.factors, torch._foreach_mul_)):
            if extra:  # Δ = end − start, then a = Δ·k: bitwise step_delta's and k·Δ
                op([self.views[i] for i in extra], list(extra.values()))
        torch._foreach_mul_(self.views, self.scales)  # exact: powers of two, up from a


def _reduce(chunk: _Chunk) -> None:
    """Per row of b, into the layout's table: [‖sign‖, ‖c²‖, Σsign, Σc², Σc³] in float32 (c = b, or b
    scaled down), Σb in float64."""
    values, planes, table = chunk.values, chunk.planes, chunk.table
    torch.sum(values, 1, dtype=torch.float64, out=chunk.first)
    torch.sign(values, out=planes[0])
    powers = values
    if chunk.down is not None:  # allocations above 2²⁴ here: their powers from c = b·2ˢ (s < 0)
        powers = torch.mul(values, chunk.down, out=planes[2])
    torch.mul(powers, powers, out=planes[1])
    torch.mul(planes[1], powers, out=planes[2])
    torch.sum(planes, 2, out=table[2:5])  # Σsign, Σb², Σb³
    torch.linalg.vector_norm(planes[0], dim=1, out=table[0])  # √(non-zero count), rounded back later
    torch.linalg.vector_norm(planes[1], dim=1, out=table[1])  # √Σb⁴


def _combine(layout: _Layout) -> Tensor:
    """Rows to tensors, ``(6, tensors)`` float64: [Σsign², Σb⁴, Σsign, Σb², Σb³, Σb] summed per
    tensor, the powers of b scaled back by 2⁻ᵖˢ (:data:`_TABLE_ORDER` gives the usual order)."""
    wide = layout.wide
    wide[:5].copy_(layout.table)
    wide[0].square_().round_()  # the non-zero count: exact (a row's ≤ 256, its √ rounded to float32)
    wide[1].square_()
    per_tensor = torch.zeros(6, layout.count, dtype=torch.float64, device=wide.device)
    return per_tensor.index_add_(1, layout.owner, wide).mul_(layout.unscale)


#: Where [Σsign, Σsign², Σa, Σa², Σa³, Σa⁴] sit in ``_combine``'s rows.
_TABLE_ORDER = (2, 0, 5, 3, 4, 1)


_EXACT_COUNTS = 1 << 24  # entries per compiled piece: float32 sums of signs are exact up to 2²⁴
_GROUP = 16  # tensors per compiled call: one call's overhead (~40 µs) for many small tensors,
# and one graph for every group of this length (the last, shorter group compiles a second one)


class ProductStats:
    """``product_stats`` of many tensors: float32 rows (:class:`RowSums`) for float32 tensors,
    the float64 slices of :func:`product_sums` for other dtypes. ``compiled=True`` sums groups
    of tensors with one fused float64 kernel (``torch.compile``, compiled once per process for
    every size) instead, falling back to the eager path with one warning if compiling fails
    (e.g. no C++ compiler). ``rows=False``: the float64 slices for every tensor (their
    temporaries are a few small slices, where the rows keep ≈ 2.5 MiB of chunk buffers)."""

    def __init__(self, compiled: bool, rows: bool = True) -> None:
        self.compiled = compiled
        self._rows = RowSums() if rows else None

    def __call__(self, k: Tensor, delta: Delta, histogram: StreamingHistogram | None = None) -> tuple[Counts, Moments]:
        return self.many([k], [delta], [histogram])[0]

    def many(
        self, ks: list[Tensor], deltas: list[Delta], histograms: list[StreamingHistogram | None] | None = None
    ) -> list[tuple[Counts, Moments]]:
        """Counts and moments of every ``k ⊙ delta`` pair; a delta may be ``(start, end)`` (Δ =
        end − start, never formed). ``histograms`` receive every slice of their pair's ``a``
        (an extra pass, on the steps that draw histograms only)."""
        for k, delta, histogram in zip(ks, deltas, histograms or []):
            if histogram is not None:
                for _, piece in product_slices(k, delta):
                    histogram.add(piece)
        if self.compiled:
            rows = self._compiled(ks, deltas)
            if rows is not None:
                return [_from_sums(k.numel(), *row) for k, row in zip(ks, rows)]
        return self.eager(ks, deltas)

    def eager(self, ks: Sequence[Tensor], deltas: Sequence[Delta | None]) -> list[tuple[Counts, Moments]]:
        """The eager statistics, read back in one device sync (two on a step whose scales are
        off): float32 rows for the float32 tensors on the first tensor's device, float64
        slices for the rest, and for any tensor the rows could not scale safely."""
        if self._rows is None:
            return many_product_stats(ks, deltas)
        fast = [i for i, (k, d) in enumerate(zip(ks, deltas)) if _in_rows(k, d, ks[0].device)]
        block = self._rows([ks[i] for i in fast], [deltas[i] for i in fast]) if fast else None
        taken = set(fast) if block is not None else set()
        exact = [i for i in range(len(ks)) if i not in taken]
        read = to_python([block, *(product_sums(ks[i], deltas[i]) for i in exact)])
        values = _assemble(read, sorted(taken), exact, len(ks))
        if fast:
            self._settle(fast, ks, deltas, values, scaled=block is not None)
        return [_from_sums(k.numel(), *row) for k, row in zip(ks, values)]

    def _settle(
        self,
        fast: list[int],
        ks: Sequence[Tensor],
        deltas: Sequence[Delta | None],
        values: list[list[float]],
        scaled: bool,
    ) -> None:
        """Next step's scales of the rows' tensors ``fast``; where this step's scales were off (the
        allocations moved by more than 2²⁴), their ``values`` recomputed in float64 (one more sync)."""
        assert self._rows is not None
        rows_k = [ks[i] for i in fast]
        redo = self._rows.settle(rows_k, [values[i] for i in fast], scaled=scaled)
        if redo:
            again = to_python([product_sums(ks[fast[j]], deltas[fast[j]]) for j in redo])
            for j, row_values in zip(redo, again):
                values[fast[j]] = row_values
            self._rows.settle(rows_k, [values[i] for i in fast], scaled=False)

    def _compiled(self, ks: list[Tensor], deltas: list[Delta]) -> list[list[float]] | None:
        """The fused kernel's sums per pair; None when compiling failed (warned once)."""
        rows = [[0.0] * 6 for _ in ks]
        for between, todo in _pieces(ks, deltas).items():
            kernel = _fused_sums_between if between else _fused_sums
            for first in range(0, len(todo), _GROUP):
                group = todo[first : first + _GROUP]
                operands = list(zip(*(piece for _, piece in group)))
                sums = call_compiled(kernel, *operands, purpose="compile_statistics is on")
                if sums is None:  # compiling failed (warned once): the eager statistics from here on
                    self.compiled = False
                    return None
                for (i, _), row in zip(group, sums.tolist()):
                    rows[i] = [a + b for a, b in zip(rows[i], row)]
        return rows


def _assemble(read: list[list[float]], rows: list[int], exact: list[int], count: int) -> list[list[float]]:
    """Per pair, [Σsign, Σsign², Σa, Σa², Σa³, Σa⁴]: ``read[0]`` is the rows' flattened
    ``(6, len(rows))`` table of the pairs ``rows``, ``read[1:]`` the float64 sums of ``exact``."""
    values: list[list[float]] = [[] for _ in range(count)]
    for row, i in enumerate(rows):
        values[i] = [read[0][where * len(rows) + row] for where in _TABLE_ORDER]
    for i, row_values in zip(exact, read[1:]):
        values[i] = row_values
    return values


def _in_rows(k: Tensor, delta: Delta | None, device: torch.device) -> bool:
    """Whether the float32 rows take this pair: float32 (so Σa in float64 stays exact), non-empty,
    on ``device``."""
    operands = delta if isinstance(delta, tuple) else (delta,) if delta is not None else ()
    return (
        k.numel() > 0
        and k.device == device
        and all(t.dtype == torch.float32 and t.device == device for t in (k, *operands))
    )


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
