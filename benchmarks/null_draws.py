"""How ``null_draws="auto"`` chooses the NFA rotation null's number of draws, and what it costs.

    python benchmarks/null_draws.py [--seeds 40]

1. Calibration: over synthetic layers (W random, G correlated with WWᵀ) and generator seeds,
   how often the TRUE standard error at the chosen count (the per-draw std of 2000 draws / √n)
   is ≤ NULL_SE_TARGET, and the counts used against the ideal (std / target)².
2. Cost: on the reference MLP (784-512-512-10, benchmarks/workloads.py) at init and after 200
   Adam steps, per layer: the count, the logged and the true standard error, and the metrics'
   time with "auto", with 16 fixed draws and with no null (medians of 3, one thread, one process).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from learnscope.functional.nfa import (
    NULL_MAX_DRAWS,
    NULL_SE_TARGET,
    PreactivationGramAccumulator,
    nfa_metrics,
    rotation_null,
)
from workloads import WORKLOADS

LAYERS = [(20, 15, 6), (30, 10, 4), (40, 30, 1), (64, 20, 2), (16, 16, 3), (50, 50, 5), (24, 8, 7)]


def synthetic_layer(k: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(k, d, generator=generator, dtype=torch.float64)
    root = torch.randn(k, k, generator=generator, dtype=torch.float64)
    return weight, weight @ weight.mT + 0.3 * root @ root.mT / k


def true_std(weight: torch.Tensor, gram: torch.Tensor, draws: int = 2000) -> float:
    return float(rotation_null(weight, gram, draws=draws, generator=torch.Generator().manual_seed(99)).std(0).max())


def calibration(seeds: int) -> None:
    print(f"calibration: {len(LAYERS)} layers x {seeds} seeds, target SE {NULL_SE_TARGET}")
    covered_all = 0
    for k, d, seed in LAYERS:
        weight, gram = synthetic_layer(k, d, seed)
        spread = true_std(weight, gram)
        counts = [
            int(nfa_metrics(weight, gram, generator=torch.Generator().manual_seed(1000 + s))["null_draws"])
            for s in range(seeds)
        ]
        covered = sum(spread / math.sqrt(n) <= NULL_SE_TARGET or n == NULL_MAX_DRAWS for n in counts)
        covered_all += covered
        ideal = math.ceil((spread / NULL_SE_TARGET) ** 2)
        print(
            f"  k={k:3d} d={d:3d}  true std {spread:.4f}  ideal n {ideal:4d}  "
            f"auto n median {statistics.median(counts):5.1f} [{min(counts)}-{max(counts)}]  covered {covered}/{seeds}"
        )
    print(f"  covered in all: {covered_all}/{len(LAYERS) * seeds}")


def timed(function: Callable[[], Any], repeats: int = 3) -> tuple[Any, float]:
    times, out = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        out = function()
        times.append(time.perf_counter() - started)
    return out, statistics.median(times)


def reference_mlp_cost() -> None:
    torch.manual_seed(0)
    workload = WORKLOADS["mlp"]
    net = workload.net()
    x, y = workload.data(2048)

    def grams() -> dict[str, torch.Tensor]:
        accumulator = PreactivationGramAccumulator(net, ["1", "3"], estimator="exact")
        for chunk in x[:1024].split(256):
            accumulator.update(chunk)
        return accumulator.compute()

    def report(when: str) -> None:
        for name, gram in grams().items():
            weight = net[int(name)].weight.detach()
            auto, t_auto = timed(lambda w=weight, g=gram: nfa_metrics(w, g))
            _, t_fixed = timed(lambda w=weight, g=gram: nfa_metrics(w, g, null_draws=16))
            _, t_none = timed(lambda w=weight, g=gram: nfa_metrics(w, g, null_draws=0))
            n = auto["null_draws"]
            true_se = true_std(weight, gram, draws=200) / math.sqrt(n)
            print(
                f"  {when:7s} layer {name}: n={n:.0f}  logged SE {auto['null_se_a1']:.4f}/{auto['null_se_a0.5']:.4f}"
                f"  true SE {true_se:.4f}  time auto {t_auto:.2f} s, 16 draws {t_fixed:.2f} s, no null {t_none:.2f} s"
                f"  (auto / 16 = {t_auto / t_fixed:.2f})"
            )

    print("reference MLP 784-512-512-10, layers 1 and 3 (one thread):")
    report("init")
    optimizer = torch.optim.Adam(net.parameters(), 1e-3)
    for _ in range(200):
        index = torch.randint(0, len(x), (128,))
        loss = torch.nn.functional.cross_entropy(net(x[index]), y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    report("trained")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)
    calibration(args.seeds)
    reference_mlp_cost()


if __name__ == "__main__":
    main()
