"""LCA benchmarks (issue #7, targets 1, 2, 5 and 6).

Each configuration trains the same seeded model for a fixed number of steps in a
real Lightning Trainer (TensorBoardLogger, callback defaults except the flags
under test) and a StepClock measures the mean time per step after a warm-up.
"Extra time per step" = per-step time with the callback − per-step time of plain
training, both medians over interleaved repeats. The instrumented callback
(:class:`timing.TimedLCA`, same behaviour) attributes that extra to the probe
evaluations, the per-step statistics, the step hooks and logging.

The inherent cost is measured beside it in the same repeats: ``fb(P)``, one
forward+backward (``cross_entropy`` + ``torch.autograd.grad``) over the P probe
samples in chunks of ``probe_batch_size``, on the bare network.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from learnscope._probe import ProbeObjective, chunk_weights
from timing import Stopwatch, TimedLCA, best_of, interleaved, median, spread
from workloads import BATCH_SIZE, LOG_EVERY_N_STEPS, Classifier, StepClock, Workload, fit, scratch_dir

CHUNK = 256  # probe_batch_size, the callback's default
LONG_RUN = 100_000  # max_steps of the "long run" configurations (they train cheap_steps of it)


@dataclass(frozen=True)
class Config:
    """One training configuration: ``lca`` holds the callback's flags (None: none)."""

    name: str
    steps: int
    warmup: int
    lca: dict[str, Any] | None = None
    save_iterates: bool = False
    planned_steps: int | None = None  # the Trainer's max_steps, if it plans a longer run than it trains


@dataclass
class RunResult:
    per_step: float
    steps: int
    stages: dict[str, float]  # stopwatch label → seconds per step in the timed window
    histogram_calls: list[float]  # durations of every add_histogram batch of the run
    histogram_steps: int
    log_bytes: int
    iterate_bytes: int = 0
    compiled: bool | None = None  # whether the callback's statistics ran compiled (None: no callback)
    scalars: dict[str, float] | None = None  # one step's logged scalars (for the logging cost)


def directory_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


class SaveIterates(pl.Callback):
    """Stage 1 of the offline two-stage approach: write θ_t to disk after every step."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.bytes = 0

    def _save(self, pl_module: pl.LightningModule, step: int) -> None:
        path = os.path.join(self.directory, f"theta_{step:06d}.pt")
        torch.save({n: p.detach() for n, p in pl_module.named_parameters()}, path)
        self.bytes += os.path.getsize(path)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(pl_module, trainer.global_step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._save(pl_module, trainer.global_step)


def run_config(workload: Workload, config: Config, probe_size: int, iterate_dir: str | None = None) -> RunResult:
    logdir = scratch_dir()
    callbacks: list[pl.Callback] = []
    lca: TimedLCA | None = None
    if config.lca is not None:
        lca = TimedLCA(probe_size=probe_size, probe_batch_size=CHUNK, **config.lca)
        callbacks.append(lca)
    saver = None
    if config.save_iterates:
        saver = SaveIterates(iterate_dir or scratch_dir())
        callbacks.append(saver)
    warm_stopwatches: list[Stopwatch] = []

    def on_warm() -> None:
        if lca is not None:
            warm_stopwatches.append(lca.stopwatch)
            lca.stopwatch = Stopwatch()

    clock = StepClock(config.warmup, on_warm)
    try:
        fit(workload, [*callbacks, clock], config.steps, logdir=logdir, planned_steps=config.planned_steps)
        log_bytes = directory_bytes(logdir)
    finally:
        shutil.rmtree(logdir, ignore_errors=True)
        if saver is not None and iterate_dir is None:
            shutil.rmtree(saver.directory, ignore_errors=True)
    stages: dict[str, float] = {}
    histogram_calls: list[float] = []
    if lca is not None:
        for label, calls in lca.stopwatch.calls.items():
            stages[label] = sum(calls) / clock.steps
        builds: list[float] = []
        for watch in (*warm_stopwatches, lca.stopwatch):
            histogram_calls += watch.calls.get("log_histograms", [])
            builds += watch.calls.get("histogram_build", [])
        # a histogram step's cost: building the histograms (in the statistics) + writing them
        histogram_calls = [call + sum(builds) / len(histogram_calls) for call in histogram_calls]
    return RunResult(
        per_step=clock.per_step(),
        steps=config.steps,
        stages=stages,
        histogram_calls=histogram_calls,
        histogram_steps=len(histogram_calls),
        log_bytes=log_bytes,
        iterate_bytes=0 if saver is None else saver.bytes // (config.steps + 1),
        compiled=None if lca is None else lca.statistics_compiled,
        scalars=None if lca is None else lca.stopwatch.last_scalars,
    )


# --------------------------------------------------------------------------- references


class ProbeReference:
    """The inherent cost: forward+backward over P probe samples, chunk by chunk, on
    the bare network (no functional_call, no isolation, no bookkeeping)."""

    def __init__(self, workload: Workload, probe_size: int) -> None:
        x, y = workload.data()
        self.net = workload.net()
        self.params = list(self.net.parameters())
        self.chunks = [(x[i : i + CHUNK], y[i : i + CHUNK]) for i in range(0, probe_size, CHUNK)]
        self.batch = (x[:BATCH_SIZE], y[:BATCH_SIZE])
        # The library's ProbeObjective on the same chunks, outside any Trainer.
        self.module = Classifier(workload.net())
        self.objective = ProbeObjective(self.module, chunk_weights(list(self.chunks)))
        self.point = {n: p.detach() for n, p in self.module.named_parameters()}

    def gradient(self) -> list[Tensor]:
        total: list[Tensor] | None = None
        for x, y in self.chunks:
            loss = nn.functional.cross_entropy(self.net(x), y)
            grads = torch.autograd.grad(loss, self.params)
            total = list(grads) if total is None else [t.add_(g) for t, g in zip(total, grads)]
        assert total is not None
        return total

    def batch_gradient(self) -> tuple[Tensor, ...]:
        """fb(B): what a user can time on their own model (one training batch)."""
        x, y = self.batch
        return torch.autograd.grad(nn.functional.cross_entropy(self.net(x), y), self.params)

    def library_gradient(self) -> Any:
        return self.objective(self.point)


# --------------------------------------------------------------------------- offline two-stage


def offline_stage_two(workload: Workload, iterate_dir: str, probe_size: int, max_steps: int) -> float:
    """Stage 2 of the offline approach (our own implementation): load consecutive
    iterates and integrate each step with Simpson's rule, reusing the end gradient
    as the next start. Returns seconds per step (loads included)."""
    x, y = workload.data()
    chunks = [(x[i : i + CHUNK], y[i : i + CHUNK]) for i in range(0, probe_size, CHUNK)]
    net = workload.net()
    weight = [len(c[0]) / probe_size for c in chunks]

    def gradient(params: dict[str, Tensor]) -> dict[str, Tensor]:
        leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        total: dict[str, Tensor] | None = None
        for (xb, yb), w in zip(chunks, weight):
            loss = nn.functional.cross_entropy(torch.func.functional_call(net, leaves, (xb,)), yb) * w
            grads = torch.autograd.grad(loss, list(leaves.values()))
            if total is None:
                total = dict(zip(leaves, grads))
            else:
                for n, g in zip(leaves, grads):
                    total[n].add_(g)
        assert total is not None
        return total

    files = sorted(os.listdir(iterate_dir))[: max_steps + 1]

    def load(name: str) -> dict[str, Tensor]:
        state = torch.load(os.path.join(iterate_dir, name))
        return {n.removeprefix("net."): t for n, t in state.items()}

    start = time.perf_counter()
    theta = load(files[0])
    g_start = gradient(theta)
    for name in files[1:]:
        theta_end = load(name)
        delta = {n: theta_end[n] - theta[n] for n in theta}
        g_mid = gradient({n: theta[n] + 0.5 * delta[n] for n in theta})
        g_end = gradient(theta_end)
        allocation = {n: (g_start[n] + 4 * g_mid[n] + g_end[n]).mul_(delta[n] / 6) for n in theta}
        _ = {n: float(a.sum(dtype=torch.float64)) for n, a in allocation.items()}  # per-tensor LCA
        theta, g_start = theta_end, g_end
    return (time.perf_counter() - start) / (len(files) - 1)


# --------------------------------------------------------------------------- the benchmark


@dataclass
class LCAResults:
    workload: str
    params: int
    probe_size: int
    every_k: int
    runs: dict[str, list[RunResult]] = field(default_factory=dict)
    fb: list[float] = field(default_factory=list)
    fb_batch: list[float] = field(default_factory=list)
    objective: list[float] = field(default_factory=list)
    offline_stage_two: float = math.nan

    def per_step(self, name: str) -> float:
        return median([r.per_step for r in self.runs[name]])

    def extra(self, name: str) -> float:
        return self.per_step(name) - self.per_step("plain")

    def stage(self, name: str, label: str) -> float:
        return median([r.stages.get(label, 0.0) for r in self.runs[name]])

    def statistics(self, name: str) -> str:
        """How the callback computed its statistics in the runs of ``name``."""
        modes = {r.compiled for r in self.runs[name]}
        return "compiled" if modes == {True} else "eager" if modes == {False} else "mixed"

    def noise(self, name: str) -> float:
        return spread([r.per_step for r in self.runs[name]])

    @property
    def fb_time(self) -> float:
        return median(self.fb)


def configs(every_k: int, expensive_steps: int, cheap_steps: int, warmup: int) -> list[Config]:
    simpson = {"rule": "simpson"}
    cheap: dict[str, Any] = {"preset": "cheap"}  # probe="batch", rule="first_order", no histograms
    # every k: the window starts right before a measured step (warm-up = k steps)
    # and holds whole periods of k steps.
    periods = max(2, (expensive_steps - warmup) // 2)
    return [
        Config("plain", cheap_steps, warmup),
        Config("simpson", expensive_steps, warmup, {**simpson, "decompose": False}),
        Config("simpson+decompose", expensive_steps, warmup, {**simpson, "decompose": True}),
        Config(
            f"simpson every {every_k}",
            every_k * (1 + periods),
            every_k,
            {**simpson, "decompose": False, "every_n_steps": every_k},
        ),
        Config("cheap", cheap_steps, warmup, {**cheap, "decompose": False, "compile_statistics": False}),
        Config("cheap+decompose", cheap_steps, warmup, {**cheap, "decompose": True, "compile_statistics": False}),
        # the flags' defaults in a Trainer planned for a long run: compile_statistics=None decides
        Config("cheap long run", cheap_steps, warmup, {**cheap, "decompose": False}, planned_steps=LONG_RUN),
        Config("cheap+decomp. long run", cheap_steps, warmup, {**cheap, "decompose": True}, planned_steps=LONG_RUN),
        Config("cheap compiled", cheap_steps, warmup, {**cheap, "decompose": False, "compile_statistics": True}),
        Config("cheap+decomp. compiled", cheap_steps, warmup, {**cheap, "decompose": True, "compile_statistics": True}),
        Config("save iterates", cheap_steps, warmup, save_iterates=True),
    ]


def run(
    workload: Workload,
    *,
    repeats: int,
    probe_size: int = 1024,
    every_k: int = 4,
    expensive_steps: int = 18,
    cheap_steps: int = 52,
    warmup: int = 2,
    offline_steps: int = 8,
    progress: Any = None,
) -> LCAResults:
    if (cheap_steps - warmup) % LOG_EVERY_N_STEPS:
        # the callback writes its scalars every LOG_EVERY_N_STEPS steps: a timed window of
        # whole logging periods holds as many written steps as timed steps
        raise ValueError(f"cheap_steps - warmup must be a multiple of {LOG_EVERY_N_STEPS}, got {cheap_steps - warmup}")
    results = LCAResults(workload.name, workload.parameter_count(), probe_size, every_k)
    reference = ProbeReference(workload, probe_size)
    iterate_dir = scratch_dir()
    cases: dict[str, Any] = {}
    for config in configs(every_k, expensive_steps, cheap_steps, warmup):
        results.runs[config.name] = []

        def case(config: Config = config) -> float:
            keep = iterate_dir if config.save_iterates else None
            if keep is not None:
                shutil.rmtree(keep, ignore_errors=True)
                os.makedirs(keep)
            result = run_config(workload, config, probe_size, keep)
            results.runs[config.name].append(result)
            if progress is not None:
                progress(f"{workload.name}: {config.name} {result.per_step * 1e3:.1f} ms/step")
            return result.per_step

        cases[config.name] = case

    def fb_case() -> float:
        results.fb.append(best_of(reference.gradient, 3))
        results.objective.append(best_of(reference.library_gradient, 3))
        results.fb_batch.append(best_of(reference.batch_gradient, 5))
        return results.fb[-1]

    cases["fb(P)"] = fb_case
    fit(workload, [], 3)  # process warm-up: first-fit costs (imports, lazy init) are not measured
    # compile_statistics' one-off compile (once per process) is not measured either
    fit(workload, [TimedLCA(preset="cheap", compile_statistics=True)], 3)
    interleaved(cases, repeats)
    results.offline_stage_two = offline_stage_two(workload, iterate_dir, probe_size, offline_steps)
    shutil.rmtree(iterate_dir, ignore_errors=True)
    return results


def histogram_cadence(workload: Workload, every: int = 5, steps: int = 20) -> tuple[int, int]:
    """(histogram batches written, the most allowed) in a run with histograms on and
    ``log_every_n_steps=every``: they must stay off the every-step path."""
    callback = TimedLCA(probe="batch", rule="first_order", decompose=False, histograms=True)
    logdir = scratch_dir()
    try:
        fit(workload, [callback], steps, logdir=logdir, log_every_n_steps=every)
    finally:
        shutil.rmtree(logdir, ignore_errors=True)
    return callback.stopwatch.count("log_histograms"), math.ceil(steps / every)
