"""The per-step statistics and the streaming histogram against direct computations."""

from __future__ import annotations

import math
import shutil

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch.utils.tensorboard.summary import make_histogram

from learnscope import LossChangeAllocation
from learnscope._stats import ProductStats, StreamingHistogram, product_stats
from learnscope.records import Counts
from models import Classifier, MemoryLogger, assert_bitwise_equal, digits_loader, mlp, state_of, trainer


def _allocations(dtype=torch.float32, n=200_000, seed=0):
    """k ⊙ Δ-like data with exact zeros (digits' always-blank pixels), both signs and a wide range."""
    digits = torch.as_tensor(load_digits().data, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    pixels = digits[torch.randint(0, len(digits), (n // 64 + 1,), generator=g)].reshape(-1)[:n]
    k = torch.randn(n, generator=g, dtype=dtype) * pixels * 1e-3
    delta = torch.randn(n, generator=g, dtype=dtype) * torch.logspace(-9, -2, n, dtype=dtype)
    return k, delta


def _direct(a: torch.Tensor):
    a64 = a.double()
    return (
        int((a < 0).sum()),
        int((a > 0).sum()),
        int((a != 0).sum()),
        [float(a64.sum()), float((a64**2).sum()), float((a64**3).sum()), float((a64**4).sum())],
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_product_stats_equal_a_direct_computation(dtype):
    k, delta = _allocations(dtype)
    a = k * delta
    counts, moments = product_stats(k, delta)
    helped, hurt, nonzero, sums = _direct(a)
    assert helped > 0 and hurt > 0 and nonzero < a.numel()  # the data exercises every count
    assert (counts.helped, counts.hurt, counts.nonzero, counts.total) == (helped, hurt, nonzero, a.numel())
    got = [moments.s1, moments.s2, moments.s3, moments.s4]
    for value, expected in zip(got, sums):
        assert value == pytest.approx(expected, rel=1e-9, abs=1e-300)
    # a = k when no Δ is given
    counts_k, moments_k = product_stats(a)
    assert counts_k == counts and moments_k.s2 == pytest.approx(moments.s2, rel=1e-12)


@pytest.mark.parametrize("slice_size", [1000, 1 << 20])
def test_product_stats_do_not_depend_on_the_slice_size(monkeypatch, slice_size):
    """CUDA takes slices of 2²⁰ entries (few kernel launches), CPU 2¹⁵; both equal the direct
    computation, and many tensors read back at once equal each read back alone."""
    import learnscope._stats as stats

    k, delta = _allocations(n=1_500_000)
    expected = product_stats(k, delta)
    monkeypatch.setattr(stats, "_slice_size", lambda tensor: slice_size)
    assert (1_500_000 + slice_size - 1) // slice_size > 1  # several slices, the last one partial
    counts, moments = product_stats(k, delta)
    helped, hurt, nonzero, sums = _direct(k * delta)
    assert (counts.helped, counts.hurt, counts.nonzero) == (helped, hurt, nonzero) and counts == expected[0]
    for value, direct in zip([moments.s1, moments.s2, moments.s3, moments.s4], sums):
        assert value == pytest.approx(direct, rel=1e-9, abs=1e-300)
    pieces = [(k[:10], delta[:10]), (k[10:700_000], delta[10:700_000]), (k[:0], delta[:0]), (k, (delta, 2 * delta))]
    together = stats.many_product_stats([p for p, _ in pieces], [d for _, d in pieces])
    assert together == [product_stats(p, d) for p, d in pieces]
    assert together[2] == (stats.Counts(0, 0, 0, 0), stats.Moments(0, 0.0, 0.0, 0.0, 0.0))


def _assert_rows_moments(moments, a: torch.Tensor) -> None:
    """The float32 rows' moments against float64 sums of the same float32 allocations ``a``:
    Σa as a float64 sum is (1e-12 of Σ|a|); Σa², Σa⁴ to 1e-6 relative; Σa³, which cancels,
    to 1e-6 of Σ|a|³ (what float32 terms allow)."""
    a64 = a.double().reshape(-1)
    assert moments.n == a.numel()
    assert moments.s1 == pytest.approx(float(a64.sum()), rel=1e-12, abs=1e-12 * float(a64.abs().sum()))
    assert moments.s2 == pytest.approx(float((a64**2).sum()), rel=1e-6, abs=1e-300)
    assert moments.s3 == pytest.approx(float((a64**3).sum()), abs=1e-6 * float((a64.abs() ** 3).sum()) + 1e-300)
    assert moments.s4 == pytest.approx(float((a64**4).sum()), rel=1e-6, abs=1e-300)


def _second_step(ks, deltas):
    """``ProductStats`` (eager) of the pairs on its second step: the first, in float64, sets the
    float32 rows' scales; the second runs in the rows."""
    stats = ProductStats(compiled=False)
    first = stats.many(ks, deltas)
    return first, stats.many(ks, deltas)


@pytest.mark.parametrize("magnitude", [1e-30, 1.0, 1e15])
def test_float32_rows_neither_underflow_nor_overflow(magnitude):
    """Allocations of 1e-30 (a⁴ = 1e-120, far below float32's range) and of 1e15 (a⁴ = 1e60,
    above it): the rows scale each tensor by a power of two before raising to powers, so the
    counts stay exact and the moments within 1e-6 of float64 sums of the same allocations."""
    k, delta = _allocations(n=303_007)
    k = k * (magnitude / float((k * delta).abs().max()))
    shapes = [(300, 700), (90_000,), (3, 1000), (7,)]  # several tensors, one across chunks, a short one
    ks, deltas, start = [], [], 0
    for shape in shapes:
        size = math.prod(shape)
        ks.append(k[start : start + size].reshape(shape))
        deltas.append(delta[start : start + size].reshape(shape))
        start += size
    first, rows = _second_step(ks, deltas)
    for kk, dd, (counts, moments), float64 in zip(ks, deltas, rows, first):
        a = kk * dd
        assert counts == float64[0] == Counts(int((a < 0).sum()), int((a > 0).sum()), int((a != 0).sum()), a.numel())
        assert all(math.isfinite(v) and v != 0 for v in (moments.s2, moments.s4))
        _assert_rows_moments(moments, a)


def test_float32_rows_rescale_when_the_allocations_jump():
    """The rows' scales come from the previous step: allocations 2³⁰ times larger (then smaller)
    than the last step's are caught, recomputed in float64, and the next step is scaled anew."""
    k, delta = _allocations(n=50_000)
    stats = ProductStats(compiled=False)
    for factor in (1.0, 1.0, 2.0**30, 2.0**30, 2.0**-30, 2.0**-30):
        ((counts, moments),) = stats.many([k * factor], [delta])
        a = k * factor * delta
        assert counts.helped == int((a < 0).sum()) and counts.nonzero == int((a != 0).sum())
        _assert_rows_moments(moments, a)


def test_float32_rows_count_exactly_past_float32_integers():
    """One tensor of 2²⁴ + 3 entries: a float32 sum of its signs would round; the rows' counts
    (float32 sums of at most 256 signs, added in float64) are exact."""
    n = (1 << 24) + 3
    k = torch.ones(n)
    k[:5] = -1.0
    k[5:7] = 0.0
    delta = torch.full((n,), 1e-4)
    _, (((counts, moments),)) = _second_step([k], [delta])
    assert (counts.helped, counts.hurt, counts.nonzero, counts.total) == (5, n - 7, n - 2, n)
    assert moments.s1 == pytest.approx((n - 12) * float(torch.tensor(1e-4)), rel=1e-12)


def test_float32_rows_moments_on_real_digits_training():
    """The allocations of real steps (an Adam-trained digits MLP, the applied gradient times the
    step): the rows' counts exact and moments within 1e-6 of float64 sums, step after step."""
    from learnscope.functional.lca import LazyDelta

    torch.manual_seed(0)
    model = mlp((64, 1200, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    stats = ProductStats(compiled=False)
    x, y = next(iter(digits_loader()))
    for _ in range(6):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        after = {n: p.detach() for n, p in model.named_parameters()}
        grads = [p.grad for p in model.parameters()]
        lazy = LazyDelta(before, after)
        got = stats.many(grads, [lazy.operands(n) for n in before])
        for g, n, (counts, moments) in zip(grads, before, got):
            a = g * (after[n] - before[n])
            assert counts == Counts(int((a < 0).sum()), int((a > 0).sum()), int((a != 0).sum()), a.numel())
            _assert_rows_moments(moments, a)  # step 0 in float64 (it sets the scales), then the rows


def _proto_fields(proto):
    return (proto.min, proto.max, proto.num, proto.sum, proto.sum_squares, list(proto.bucket_limit), list(proto.bucket))


def test_streaming_histogram_equals_tensorboards_histogram_of_the_concatenation():
    k, delta = _allocations(n=150_001)
    parts = [k[:70_000] * delta[:70_000], (k[70_000:] * delta[70_000:]).reshape(-1, 1)]
    streaming = StreamingHistogram()
    for part in parts:
        streaming.add(part)
    values = torch.cat([p.reshape(-1) for p in parts]).float().numpy().astype(float)
    expected = make_histogram(values, np.asarray(_tensorflow_bins()))
    limits, counts = streaming.buckets()
    assert (streaming.num, limits, counts) == (expected.num, list(expected.bucket_limit), list(expected.bucket))
    assert streaming.min == expected.min and streaming.max == expected.max
    assert streaming.sum == pytest.approx(expected.sum, rel=1e-9)
    assert streaming.sum_squares == pytest.approx(expected.sum_squares, rel=1e-9)


def _tensorflow_bins():
    """SummaryWriter's default buckets, rebuilt here from TensorBoard's recipe."""
    v, buckets = 1e-12, []
    while v < 1e20:
        buckets.append(v)
        v *= 1.1
    return [-b for b in reversed(buckets)] + [0] + buckets


def test_streaming_histogram_drops_non_finite_values_and_edge_values_land_like_numpy():
    values = torch.tensor([float("nan"), 1.0, -1.0, float("inf"), 0.0, 1e-12, -1e-12, 5e-13, float("-inf")])
    streaming = StreamingHistogram()
    streaming.add(values)
    finite = values[torch.isfinite(values)].double().numpy()
    expected = make_histogram(finite, np.asarray(_tensorflow_bins()))
    assert streaming.buckets() == (list(expected.bucket_limit), list(expected.bucket))
    assert streaming.num == 6
    assert StreamingHistogram().buckets() is None


def test_streaming_histogram_reads_back_from_an_event_file(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    k, delta = _allocations(n=5000)
    writer = SummaryWriter(str(tmp_path))
    streaming = StreamingHistogram()
    streaming.add(k * delta)
    streaming.write(writer, "lca/hist/x", step=7)
    writer.add_histogram("reference", (k * delta), global_step=7)
    writer.close()
    events = EventAccumulator(str(tmp_path), size_guidance={"histograms": 0})
    events.Reload()
    ours, theirs = events.Histograms("lca/hist/x")[0], events.Histograms("reference")[0]
    assert ours.step == theirs.step == 7
    assert ours.histogram_value.bucket == theirs.histogram_value.bucket
    assert ours.histogram_value.bucket_limit == theirs.histogram_value.bucket_limit
    assert ours.histogram_value.num == theirs.histogram_value.num == 5000


def _have_compiler() -> bool:
    return any(shutil.which(cc) for cc in ("g++", "c++", "clang++"))


@pytest.mark.skipif(not _have_compiler(), reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_statistics_equal_the_eager_ones():
    stats = ProductStats(compiled=True)
    for n, seed in ((200_000, 0), (70_001, 1)):  # two shapes: one compiled kernel (dynamic shapes)
        k, delta = _allocations(n=n, seed=seed)
        with _no_warning():  # a fallback to eager would warn
            counts, moments = stats(k, delta)
        eager_counts, eager_moments = product_stats(k, delta)
        assert stats.compiled, "compiling failed"
        assert counts == eager_counts
        for got, expected in zip(
            (moments.s1, moments.s2, moments.s3, moments.s4),
            (eager_moments.s1, eager_moments.s2, eager_moments.s3, eager_moments.s4),
        ):
            assert got == pytest.approx(expected, rel=1e-9)


@pytest.mark.skipif(not _have_compiler(), reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_counts_stay_exact_past_float32_integers():
    """One tensor of 2²⁴ + 3 entries: a float32 sum of its signs would round to an even
    number; the compiled statistics count exactly, as the eager slices do."""
    n = (1 << 24) + 3
    k = torch.ones(n)
    k[:5] = -1.0
    k[5:7] = 0.0
    delta = torch.full((n,), 1e-4)
    with _no_warning():
        counts, moments = ProductStats(compiled=True)(k, delta)
    assert (counts.helped, counts.hurt, counts.nonzero, counts.total) == (5, n - 7, n - 2, n)
    assert moments.s1 == pytest.approx((n - 12) * float(torch.tensor(1e-4)), rel=1e-12)


@pytest.mark.parametrize(
    "compiled",
    [
        False,
        pytest.param(
            True, marks=pytest.mark.skipif(not _have_compiler(), reason="torch.compile on CPU needs a C++ compiler")
        ),
    ],
)
def test_statistics_between_two_points_equal_those_of_the_formed_delta(compiled):
    """Δ given as (θ_t, θ_{t+1}) is read in the statistics' own pass: the counts are exactly, and
    the moments bitwise (eager) or to rounding (compiled), those of Δ = step_delta(θ_t, θ_{t+1})."""
    from learnscope.functional.lca import LazyDelta, step_delta

    generator = torch.Generator().manual_seed(3)
    shapes = [(300, 170), (170,), (5,), (40_000,)]  # one tensor spans two slices
    start = {f"p{i}": torch.randn(shape, generator=generator) for i, shape in enumerate(shapes)}
    end = {n: t + 1e-3 * torch.randn(t.shape, generator=generator) for n, t in start.items()}
    end["p2"] = end["p2"].clone()
    end["p2"][:2] = start["p2"][:2]  # exact zeros of Δ count as neither helped nor hurt
    k = {n: torch.randn(t.shape, generator=generator) for n, t in start.items()}
    expected = [product_stats(k[n], d) for n, d in step_delta(start, end).items()]
    names = list(start)
    lazy = LazyDelta({n: t.clone() for n, t in start.items()}, end, in_place=True)
    stats = ProductStats(compiled=compiled)
    formed = step_delta(start, end)
    with _no_warning():
        got = stats.many([k[n] for n in names], [lazy.operands(n) for n in names])
        # the eager path's first step sets the float32 rows' scales: the second one runs in them,
        # reading (θ_t, θ_t+1) or the formed Δ with the same result bit for bit
        rows_lazy = stats.many([k[n] for n in names], [lazy.operands(n) for n in names])
        rows_formed = stats.many([k[n] for n in names], [formed[n] for n in names])
    assert stats.compiled is compiled
    assert rows_lazy == rows_formed
    for n, (counts, moments), (rows_counts, rows_moments), (eager_counts, eager_moments) in zip(
        names, got, rows_lazy, expected
    ):
        assert counts == rows_counts == eager_counts
        if compiled:
            assert moments.s1 == pytest.approx(eager_moments.s1, rel=1e-9)
            assert moments.s4 == pytest.approx(eager_moments.s4, rel=1e-9)
        else:
            assert moments == eager_moments
            _assert_rows_moments(rows_moments, k[n] * formed[n])
    # the lazy Δ is formed on first read, in place, and equals step_delta bitwise
    for n, delta in step_delta(start, end).items():
        assert isinstance(lazy.operands(n), tuple)
        assert torch.equal(lazy[n], delta) and lazy.operands(n) is lazy[n]


def test_compile_failure_falls_back_to_eager_with_one_warning(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no toolchain here")

    import learnscope._compile

    monkeypatch.setattr(learnscope._compile, "_KERNELS", {})
    monkeypatch.setattr(torch, "compile", broken)
    stats = ProductStats(compiled=True)
    k, delta = _allocations(n=100_000)
    with pytest.warns(RuntimeWarning, match="compile_statistics is on but torch.compile failed"):
        counts, _ = stats(k, delta)
    assert not stats.compiled and counts == product_stats(k, delta)[0]


class _no_warning:
    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("error", RuntimeWarning)

    def __exit__(self, *exc):
        return self._catch.__exit__(*exc)


@pytest.mark.skipif(not _have_compiler(), reason="torch.compile on CPU needs a C++ compiler")
def test_callback_logs_the_same_values_with_compiled_statistics():
    """A wider digits MLP (its first layer exceeds one slice and 2¹⁶ entries, so the fused
    statistics and Adam dots run): every logged lca/ scalar, the optimizer parts included,
    agrees with the eager computation; counts exactly."""

    series = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        logger = MemoryLogger()
        model = Classifier(net=mlp((64, 1200, 10)), optimizer="adam", lr=1e-3)
        callback = LossChangeAllocation(
            probe="batch", rule="first_order", histograms=False, decompose=True, compile_statistics=compiled
        )
        trainer(callbacks=[callback], loggers=[logger], max_steps=6).fit(model, digits_loader())
        assert callback.statistics_compiled is compiled
        series[compiled] = logger.series
    tags = sorted(t for t in series[False] if t.startswith("lca/"))
    assert tags == sorted(t for t in series[True] if t.startswith("lca/")) and "lca/helped_fraction" in tags
    for tag in tags:
        for step, value in series[False][tag].items():
            if "fraction" in tag:
                assert series[True][tag][step] == value, tag
            elif tag.startswith(("lca/part/", "lca/part_cumulative/")):
                # compiled Adam dots accumulate in float64, the eager ones in float32: equal to float32
                # rounding of the parts' scale (the residual, their tiny difference, moves by that much)
                scale = max(
                    abs(v[step])
                    for t, v in series[False].items()
                    if t.startswith(("lca/part/", "lca/part_cumulative/")) and step in v
                )
                assert series[True][tag][step] == pytest.approx(value, abs=1e-6 * scale), tag
            elif "skewness" in tag or "kurtosis" in tag:
                # the eager moments are float32 rows (accurate to ~1e-7), the compiled ones float64
                assert series[True][tag][step] == pytest.approx(value, rel=1e-6, abs=1e-6), tag
            else:
                assert series[True][tag][step] == pytest.approx(value, rel=1e-9, abs=1e-15), tag


class _StopAfter(pl.Callback):
    """Ends a fit after ``n`` steps whatever max_steps says (a long run, cut short)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def on_train_batch_end(self, trainer, *args):
        trainer.should_stop = trainer.global_step >= self.n


def _fit_digits_mlp(max_steps: int, lca: LossChangeAllocation | None):
    """Four Adam steps of a 90 610-parameter digits MLP in a fit planned for ``max_steps``."""
    torch.manual_seed(0)
    model = Classifier(net=mlp((64, 1200, 10)), optimizer="adam", lr=1e-3)
    fit = trainer(callbacks=[_StopAfter(4)] + ([lca] if lca else []), max_steps=max_steps)
    fit.fit(model, digits_loader())
    return state_of(model, fit.optimizers[0])


def _cheap(**flags) -> LossChangeAllocation:
    return LossChangeAllocation(probe="batch", rule="first_order", histograms=False, **flags)


@pytest.mark.parametrize(
    "max_steps, flags, compiled",
    [
        (40_000, {}, False),  # 40 000 × 90 610 ≈ 3.6e9 parameter-steps < 2³²
        (50_000, dict(every_n_steps=2), False),  # 25 000 measured steps
        (50_000, dict(compile_statistics=False), False),  # the user's choice wins
        (2, dict(compile_statistics=True), True),
    ],
)
def test_compile_statistics_none_compiles_only_runs_long_enough_to_repay_it(max_steps, flags, compiled):
    callback = _cheap(**flags)
    _fit_digits_mlp(max_steps, callback)
    assert callback.compile_statistics == flags.get("compile_statistics")
    assert callback.statistics_compiled is compiled


@pytest.mark.skipif(not _have_compiler(), reason="torch.compile on CPU needs a C++ compiler")
def test_a_long_run_compiles_by_default_and_trains_bitwise_as_without_the_callback():
    callback = _cheap(decompose=True)
    with_callback = _fit_digits_mlp(50_000, callback)  # 50 000 × 90 610 ≈ 4.5e9 ≥ 2³²
    assert callback.compile_statistics is None and callback.statistics_compiled is True
    assert_bitwise_equal(with_callback, _fit_digits_mlp(50_000, None))
