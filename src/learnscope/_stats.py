"""Per-step statistics of the allocations ``A = k ⊙ Δ``, without materialising A.

Every measured step needs, per parameter tensor, the helped / hurt / non-zero counts
and the raw power sums Σa, Σa², Σa³, Σa⁴ (for the total, the layer sums and the
kurtosis). They are computed from ``k`` and ``Δ`` in slices, so no parameter-sized
temporary is ever alive (the slices bound them to 0.5 MiB), or, with
``compile_statistics=True``, in one fused ``torch.compile`` kernel per tensor that
reads k and Δ once.

:class:`StreamingHistogram` builds the same histogram as TensorBoard's
``SummaryWriter.add_histogram(values)`` (its default exponential buckets) from
slices, so histogram steps do not need the concatenated allocations either.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch
from torch import Tensor

from learnscope.records import Counts, Moments

_SLICE = 1 << 15  # elements per slice: float64 temporaries of 256 KiB, cache-resident
_HISTOGRAM_SLICE = 1 << 14  # histogram steps are rare: smaller slices, smaller temporaries


def _edges() -> list[float]:
    """TensorBoard's default histogram bucket edges (``SummaryWriter.default_bins``)."""
    v, buckets = 1e-12, []
    while v < 1e20:
        buckets.append(v)
        v *= 1.1
    return [-b for b in reversed(buckets)] + [0.0] + buckets


_EDGES = _edges()


class StreamingHistogram:
    """A histogram accumulated slice by slice, equal to ``add_histogram`` of the
    concatenated (finite) values: same buckets, counts, min, max, sum and sum of
    squares (float64). Non-finite values are left out, as learnscope's logging does."""

    def __init__(self) -> None:
        self.counts: Tensor | None = None
        self.num = 0
        self.sum = 0.0
        self.sum_squares = 0.0
        self.min = math.inf
        self.max = -math.inf
        self._edges: Tensor | None = None

    def add(self, values: Tensor) -> None:
        flat = values.detach().reshape(-1)
        for start in range(0, flat.numel(), _HISTOGRAM_SLICE):
            piece = flat[start : start + _HISTOGRAM_SLICE].double()
            if not bool(torch.isfinite(piece).all()):
                piece = piece[torch.isfinite(piece)]
            if piece.numel() == 0:
                continue
            if self._edges is None or self._edges.device != piece.device:
                self._edges = torch.tensor(_EDGES, dtype=torch.float64, device=piece.device)
            # np.histogram's buckets [e_i, e_i+1), the last one closed; outside values are dropped
            index = torch.bucketize(piece, self._edges, right=True)
            index = torch.where(piece == self._edges[-1], index - 1, index)
            counts = torch.bincount(index, minlength=len(_EDGES) + 1)
            self.counts = counts if self.counts is None else self.counts + counts
            lo, hi = torch.aminmax(piece)
            stats = torch.stack([piece.sum(), torch.dot(piece, piece), lo, hi]).tolist()
            self.num += piece.numel()
            self.sum += stats[0]
            self.sum_squares += stats[1]
            self.min = min(self.min, stats[2])
            self.max = max(self.max, stats[3])

    def buckets(self) -> tuple[list[float], list[int]] | None:
        """(bucket right limits, counts), trimmed to the support as TensorBoard's
        ``make_histogram`` does; None when no value was added."""
        if self.num == 0 or self.counts is None:
            return None
        counts = self.counts[1 : len(_EDGES)].cpu().numpy()  # the len(edges) − 1 real buckets
        limits = np.asarray(_EDGES)
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
            tag, min=self.min, max=self.max, num=self.num, sum=self.sum, sum_squares=self.sum_squares,
            bucket_limits=limits, bucket_counts=counts, global_step=step,
        )


def _from_sums(numel: int, net: float, nonzero: float, s1: float, s2: float, s3: float, s4: float) -> tuple[Counts, Moments]:
    helped, hurt = int(round((nonzero - net) / 2)), int(round((nonzero + net) / 2))
    return Counts(helped, hurt, helped + hurt, numel), Moments(numel, s1, s2, s3, s4)


def product_stats(k: Tensor, delta: Tensor | None = None, histogram: StreamingHistogram | None = None) -> tuple[Counts, Moments]:
    """Counts and raw moments of ``a = k ⊙ delta`` (or of ``k`` itself when ``delta`` is
    None), slice by slice: signs give helped / hurt / non-zero (helped = (nz − Σsign)/2,
    exact), float64 dots give the moments. ``histogram`` also receives every slice of a."""
    flat_k = k.detach().reshape(-1)
    flat_d = None if delta is None else delta.detach().reshape(-1)
    values = []
    for start in range(0, flat_k.numel(), _SLICE):
        piece = flat_k[start : start + _SLICE]
        if flat_d is not None:
            piece = piece * flat_d[start : start + _SLICE]
        if histogram is not None:
            histogram.add(piece)
        sign = torch.sign(piece).float()  # exact counts also for bf16 / fp16 allocations
        p64 = piece.double()
        sq = p64 * p64
        values.append(torch.stack([
            sign.sum().double(), torch.dot(sign, sign).double(), p64.sum(), sq.sum(), torch.dot(sq, p64), torch.dot(sq, sq)
        ]))
    if not values:
        return Counts(0, 0, 0, 0), Moments(0, 0.0, 0.0, 0.0, 0.0)
    return _from_sums(flat_k.numel(), *torch.stack(values).sum(0).tolist())


def _fused_sums(k: Tensor, delta: Tensor) -> Tensor:
    a = (k * delta).reshape(-1)
    sign = torch.sign(a).float()
    a64 = a.double()
    sq = a64 * a64
    return torch.stack([
        sign.sum().double(), (sign * sign).sum().double(), a64.sum(), sq.sum(), (sq * a64).sum(), (sq * sq).sum()
    ])


_KERNEL: Any = None  # the compiled _fused_sums, shared by every callback in the process


def _kernel() -> Any:
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = torch.compile(_fused_sums, dynamic=True)
    return _KERNEL


class ProductStats:
    """``product_stats`` of many tensors; ``compiled=True`` runs one fused kernel per
    tensor (``torch.compile``, compiled once per process for all shapes), falling back
    to the eager slices with one warning if compiling fails (e.g. no C++ compiler)."""

    def __init__(self, compiled: bool) -> None:
        self.compiled = compiled

    def __call__(self, k: Tensor, delta: Tensor, histogram: StreamingHistogram | None = None) -> tuple[Counts, Moments]:
        if not self.compiled or histogram is not None or k.numel() < _SLICE:
            return product_stats(k, delta, histogram)
        try:
            sums = _kernel()(k.detach(), delta.detach()).tolist()
        except Exception as err:  # a missing toolchain or an unsupported dtype / device
            self.compiled = False
            warnings.warn(
                f"learnscope: compile_statistics=True but torch.compile failed ({type(err).__name__}: {err}); "
                "using the eager statistics instead. Training goes on.",
                RuntimeWarning,
                stacklevel=2,
            )
            return product_stats(k, delta)
        return _from_sums(k.numel(), *sums)
