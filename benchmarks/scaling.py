"""How the probes' cost grows with the model and the probe set (issue #19, target 6).

    python benchmarks/scaling.py [--widths 64 256 1024 2048] [--probe-sizes 128 1024 4096]
                                 [--steps 12] [--repeats 3] [--figure docs/figures/scaling.png]

Model sweep: MLPs 784-w-w-10 (Adam, batch 128, the benchmarks' seeded synthetic data), for
each width the time per training step of plain training, the cheap preset and Simpson
(P = 1024), medians over interleaved repeats in this one process, printed as ratios to plain
training; and the peak extra memory of a Simpson step as a multiple of the parameter bytes.
Probe sweep: Simpson's extra time per step ÷ the time of one forward + backward over the P
probe samples (the floor: Simpson needs two per step), for each P at the middle width.
The ratios should stay flat, or fall, as the model grows.
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn

from learnscope import LossChangeAllocation
from memory_bench import peak_bytes
from run import quiet
from timing import interleaved, median
from workloads import StepClock, Workload, fit, scratch_dir

CHUNK = 256


def mlp(width: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)
    )


def workload(width: int) -> Workload:
    return Workload(f"mlp{width}", partial(mlp, width), (784,))


def per_step(job: Workload, options: dict[str, Any] | None, steps: int, warmup: int = 3) -> float:
    """Mean seconds per step after ``warmup`` steps, with LossChangeAllocation(**options) or none."""
    callbacks: list[Any] = [] if options is None else [LossChangeAllocation(probe_batch_size=CHUNK, **options)]
    clock = StepClock(warmup)
    logdir = scratch_dir()
    try:
        fit(job, [*callbacks, clock], steps + warmup, logdir=logdir)
    finally:
        shutil.rmtree(logdir, ignore_errors=True)
    return clock.per_step()


def probe_gradient(job: Workload, probe_size: int) -> Callable[[], float]:
    """One forward + backward over ``probe_size`` samples in chunks, on the bare net."""
    import time

    net = job.net()
    x, y = job.data(probe_size)

    def run() -> float:
        started = time.perf_counter()
        for xs, ys in zip(x.split(CHUNK), y.split(CHUNK)):
            loss = nn.functional.cross_entropy(net(xs), ys) * len(xs) / probe_size
            torch.autograd.grad(loss, list(net.parameters()))
        return time.perf_counter() - started

    return run


def model_row(width: int, steps: int, repeats: int) -> dict[str, float]:
    job = workload(width)
    params = job.parameter_count()
    cases = {
        "plain": lambda: per_step(job, None, steps),
        "cheap": lambda: per_step(job, {"preset": "cheap"}, steps),
        "simpson": lambda: per_step(job, {"rule": "simpson", "probe_size": 1024}, steps),
    }
    times = {name: median(values) for name, values in interleaved(cases, repeats).items()}
    plain_peak = peak_bytes(lambda: fit(job, [], 3))
    simpson_peak = peak_bytes(lambda: fit(job, [LossChangeAllocation(probe_size=1024, probe_batch_size=CHUNK)], 3))
    return {
        "width": width,
        "params": params,
        "plain_s": times["plain"],
        "cheap_ratio": times["cheap"] / times["plain"],
        "simpson_ratio": times["simpson"] / times["plain"],
        "simpson_extra_memory": (simpson_peak - plain_peak) / (4 * params),
    }


def model_sweep(widths: list[int], steps: int, repeats: int) -> list[dict[str, float]]:
    rows = []
    for width in widths:
        row = model_row(width, steps, repeats)
        rows.append(row)
        print(
            f"  width {width:5d}  {row['params'] / 1e6:7.3f} M params  plain {row['plain_s'] * 1e3:8.1f} ms/step  "
            f"cheap ÷ plain {row['cheap_ratio']:.3f}  simpson ÷ plain {row['simpson_ratio']:.2f}  "
            f"simpson extra peak {row['simpson_extra_memory']:.2f} × parameter bytes",
            flush=True,
        )
    return rows


def probe_sweep(width: int, probe_sizes: list[int], steps: int, repeats: int) -> list[dict[str, float]]:
    job = workload(width)
    rows = []
    for probe_size in probe_sizes:
        cases = {
            "plain": lambda: per_step(job, None, steps),
            "simpson": lambda p=probe_size: per_step(job, {"rule": "simpson", "probe_size": p}, steps),
            "fb": probe_gradient(job, probe_size),
        }
        times = {name: median(values) for name, values in interleaved(cases, repeats).items()}
        ratio = (times["simpson"] - times["plain"]) / (2 * times["fb"])
        rows.append(
            {"probe_size": probe_size, "extra_over_two_fb": ratio, "simpson_ratio": times["simpson"] / times["plain"]}
        )
        print(
            f"  P {probe_size:5d}  Simpson extra ÷ two probe gradients {ratio:.2f}  "
            f"simpson ÷ plain {times['simpson'] / times['plain']:.2f}",
            flush=True,
        )
    return rows


def draw(models: list[dict[str, float]], probes: list[dict[str, float]], width: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
    params = [row["params"] / 1e6 for row in models]
    left.plot(params, [row["cheap_ratio"] for row in models], "o-", label="cheap preset ÷ plain (time)")
    left.plot(params, [row["simpson_ratio"] for row in models], "s-", label="Simpson, P = 1024 ÷ plain (time)")
    left.plot(
        params, [row["simpson_extra_memory"] for row in models], "^--", label="Simpson extra peak ÷ parameter bytes"
    )
    left.set_xscale("log")
    left.set_xlabel("parameters (millions), MLP 784-w-w-10")
    left.set_ylabel("ratio")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    sizes = [row["probe_size"] for row in probes]
    right.plot(sizes, [row["extra_over_two_fb"] for row in probes], "o-", label="Simpson extra ÷ two probe gradients")
    right.axhline(1.2, color="grey", linestyle=":", label="target 1.2")
    right.set_xscale("log", base=2)
    right.set_xlabel(f"probe samples P (width {width})")
    right.set_ylabel("ratio")
    right.legend(fontsize=8)
    right.grid(alpha=0.3)
    figure.savefig(path, dpi=120)
    print(f"figure: {path}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 256, 1024, 2048])
    parser.add_argument("--probe-sizes", type=int, nargs="+", default=[128, 1024, 4096])
    parser.add_argument("--probe-width", type=int, default=512)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--figure", default=None, help="write the two panels as a PNG here")
    args = parser.parse_args(argv)
    quiet()
    print(f"model sweep (medians of {args.repeats} interleaved repeats, {args.steps} timed steps each):")
    models = model_sweep(args.widths, args.steps, args.repeats)
    print(f"probe sweep at width {args.probe_width}:")
    probes = probe_sweep(args.probe_width, args.probe_sizes, args.steps, args.repeats)
    if args.figure:
        draw(models, probes, args.probe_width, args.figure)


if __name__ == "__main__":
    main()
