"""Measurement helpers: interleaved repeats, medians, and an instrumented LCA callback.

Every comparison in the benchmarks is measured side by side in one process: each
repeat runs every case once, in an order rotated from repeat to repeat, and the
statistic is the median over repeats. Ratios are formed from those medians.
"""

from __future__ import annotations

import contextlib
import shutil
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from learnscope import _logging
from learnscope.callbacks.lca import LossChangeAllocation


def interleaved(cases: Mapping[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Run every case once per repeat, rotating the order; returns name → samples."""
    names = list(cases)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(cases[name]())
    return samples


def median(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float]) -> float:
    """Relative half-range of the middle half of the samples (a rough noise figure)."""
    if len(values) < 4:
        return (max(values) - min(values)) / (2 * statistics.median(values))
    q = statistics.quantiles(values, n=4)
    return (q[2] - q[0]) / (2 * statistics.median(values))


def best_of(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall time of ``fn`` over ``repeats`` calls (one call first, discarded)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# --------------------------------------------------------------------------- attribution


class Stopwatch:
    """Accumulates wall time per label; ``calls[label]`` holds each call's duration."""

    def __init__(self) -> None:
        self.calls: dict[str, list[float]] = defaultdict(list)
        self.last_scalars: Mapping[str, float] | None = None  # the last step's scalars, for event_write_cost

    @contextlib.contextmanager
    def time(self, label: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.calls[label].append(time.perf_counter() - start)

    def total(self, label: str) -> float:
        return sum(self.calls.get(label, ()))

    def count(self, label: str) -> int:
        return len(self.calls.get(label, ()))


_ACTIVE: list[Stopwatch] = []  # the stopwatch of the run in progress, if any


def _timed_logging(function: Callable, label: str) -> Callable:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not _ACTIVE:
            return function(*args, **kwargs)
        if label == "log_scalars":
            _ACTIVE[-1].last_scalars = args[1]
        with _ACTIVE[-1].time(label):
            return function(*args, **kwargs)

    wrapper.__wrapped__ = function  # type: ignore[attr-defined]
    return wrapper


def install_logging_timers() -> None:
    """Time learnscope's own logging calls (the callbacks look them up at call time)."""
    if not hasattr(_logging.log_scalars, "__wrapped__"):
        _logging.log_scalars = _timed_logging(_logging.log_scalars, "log_scalars")
        _logging.log_histograms = _timed_logging(_logging.log_histograms, "log_histograms")
    from learnscope._stats import StreamingHistogram

    if not hasattr(StreamingHistogram.add, "__wrapped__"):  # histograms are built in the statistics
        StreamingHistogram.add = _timed_logging(StreamingHistogram.add, "histogram_build")


def event_write_cost(scalars: Mapping[str, float], events: int = 200) -> float:
    """Seconds per step of learnscope's scalar logging of ``scalars`` into TensorBoard,
    the SummaryWriter's thread included (TensorBoard computes each record's CRC32C in
    pure Python there, out of sight of a stopwatch around the call): ``events`` steps
    written through a TensorBoardLogger, then ``flush``, which returns once the thread
    has written them all."""
    from types import SimpleNamespace

    from lightning.pytorch.loggers import TensorBoardLogger

    logdir = tempfile.mkdtemp(prefix="learnscope-bench-")
    try:
        logger = TensorBoardLogger(logdir)
        trainer = SimpleNamespace(is_global_zero=True, loggers=[logger])
        write = getattr(_logging.log_scalars, "__wrapped__", _logging.log_scalars)
        write(trainer, scalars, 0)
        logger.experiment.flush()  # the writer and its file exist before the clock starts
        start = time.perf_counter()
        for step in range(1, events + 1):
            write(trainer, scalars, step)
        logger.experiment.flush()
        cost = (time.perf_counter() - start) / events
        logger.experiment.close()
        return cost
    finally:
        shutil.rmtree(logdir, ignore_errors=True)


@contextlib.contextmanager
def active(stopwatch: Stopwatch) -> Iterator[Stopwatch]:
    _ACTIVE.append(stopwatch)
    try:
        yield stopwatch
    finally:
        _ACTIVE.remove(stopwatch)


class _TimedObjective:
    """Forwards to a ProbeObjective, timing each evaluation (the raw probe work)."""

    def __init__(self, objective: Any, stopwatch: Stopwatch) -> None:
        self._objective = objective
        self._stopwatch = stopwatch

    def __call__(self, params: Any) -> Any:
        with self._stopwatch.time("probe_evaluation"):
            return self._objective(params)

    def accumulate_into(self, params: Any, out: Any, alpha: float) -> float:
        with self._stopwatch.time("probe_evaluation"):
            return self._objective.accumulate_into(params, out, alpha)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._objective, name)


class TimedLCA(LossChangeAllocation):
    """LossChangeAllocation with a stopwatch around each stage (same behaviour).

    Labels: ``hooks`` (the torch step pre/post hooks: θ_t copy, decomposition
    capture), ``probe_evaluation`` (ProbeObjective calls: forward+backward over the
    probe set), ``summarise`` (per-step statistics of the allocations), ``measure``
    (everything of a measured step but logging), ``batch_end`` (the whole
    ``on_train_batch_end``, logging included), ``train_end`` (``on_train_end``: the
    last batch of steps' scalars are written there).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stopwatch = Stopwatch()

    def _before_step(self, *args: Any) -> None:
        with self.stopwatch.time("hooks"):
            super()._before_step(*args)

    def _after_step(self, *args: Any) -> None:
        with self.stopwatch.time("hooks"):
            super()._after_step(*args)

    def _probe_losses(self, *args: Any) -> Any:
        losses = super()._probe_losses(*args)
        untimed = losses.objective
        losses.objective = lambda *a, **k: _TimedObjective(untimed(*a, **k), self.stopwatch)
        return losses

    def _measure(self, event: Any) -> Any:
        with self.stopwatch.time("measure"):
            return super()._measure(event)

    def _summarise(self, *args: Any) -> Any:
        with self.stopwatch.time("summarise"):
            return super()._summarise(*args)

    def on_train_batch_start(self, *args: Any) -> None:
        with self.stopwatch.time("batch_start"):
            super().on_train_batch_start(*args)

    def on_train_batch_end(self, *args: Any) -> None:
        with self.stopwatch.time("batch_end"), active(self.stopwatch):
            super().on_train_batch_end(*args)

    def on_train_end(self, *args: Any) -> None:
        with self.stopwatch.time("train_end"), active(self.stopwatch):  # writes the last steps' scalars
            super().on_train_end(*args)
