"""The cost model of issue #7 (target 7), and its check against the measurements.

LCA, extra time per training step, for a model with N trainable parameters::

    extra ≈ [ E · (P / B) · fb(B) · ρ  +  γ · N  +  δ ] / k

* fb(B): one forward+backward of the user's model on a training batch of B
  samples (what they can time themselves); (P / B)·fb(B) estimates fb(P), the
  same over the P probe samples; ρ: the probe machinery's factor over a bare
  forward+backward (functional_call, isolation, chunk accumulation);
* E: new probe gradients per measured step (``EVALUATIONS``): 2 for Simpson with
  endpoint reuse (every step), 3 without it (every_n_steps > 1); first_order and
  trapezoid 1 and 2; adaptive ≥ 2; 0 in the cheap mode (the optimizer's own gradient);
* γ · N + δ: the bookkeeping of a measured step (θ_t copy, quadrature arithmetic,
  per-step statistics, optimizer decomposition; δ: Python and logging);
* k: ``every_n_steps``.

The number of model outputs c does not enter LCA (its loss is a scalar). It
drives the NFA: a measurement costs one forward and c batched VJPs over the n
probe samples, plus the Gram products 2·c·Σ_l rows_l·m(k_l) flops, m(k) ≈ k(k+64)/2
(the blocks on and above the diagonal, per chunk in the gradient's dtype; rows_l:
samples × output positions of layer l) and the copy of the
c·Σ_l rows_l·k_l VJP entries they read, plus the metrics' linear algebra.

γ and δ are calibrated per mode from the instrumented callback's own stopwatch
(independent of the Trainer-loop differences they are checked against) by a
least-squares fit over the two workloads; the gradient term uses fb(B), not the
measured fb(P), so every prediction below is out of sample for its gradient part.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from timing import median
from workloads import BATCH_SIZE

#: rule → (new probe gradients per measured step with endpoint reuse, without it)
EVALUATIONS = {"first_order": (1, 2), "trapezoid": (1, 2), "simpson": (2, 3)}


@dataclass
class Prediction:
    workload: str
    config: str
    predicted: float  # seconds per step
    measured: float

    @property
    def error(self) -> float:
        return (self.predicted - self.measured) / self.measured if self.measured else math.nan


def _mode(config: str) -> str:
    cheap = config.startswith("cheap")
    mode = ("cheap" if cheap else "integral") + ("+decompose" if "decomp" in config else "")
    return mode + (" compiled" if "compiled" in config else "")


def _evaluations(config: str) -> tuple[int, int]:
    """(E, k) of a benchmark configuration name."""
    if config.startswith("cheap"):
        return 0, 1
    if "every" in config:
        return EVALUATIONS["simpson"][1], int(config.rsplit(" ", 1)[1])
    return EVALUATIONS["simpson"][0], 1


def bookkeeping(result, config: str) -> float:
    """The callback's work per measured step other than probe evaluations (stopwatch)."""
    _, k = _evaluations(config)
    stages = {label: result.stage(config, label) for label in ("batch_end", "hooks", "batch_start", "probe_evaluation")}
    return (stages["batch_end"] + stages["hooks"] + stages["batch_start"] - stages["probe_evaluation"]) * k


def calibrate(lca_results: dict) -> tuple[dict[str, tuple[float, float]], float]:
    """Per mode (γ seconds per parameter, δ seconds) by least squares over the
    workloads' every-step configurations, and ρ (median ProbeObjective / fb(P))."""
    constants: dict[str, tuple[float, float]] = {}
    for mode, config in (
        ("integral", "simpson"),
        ("integral+decompose", "simpson+decompose"),
        ("cheap", "cheap"),
        ("cheap+decompose", "cheap+decompose"),
        ("cheap compiled", "cheap compiled"),
        ("cheap+decompose compiled", "cheap+decomp. compiled"),
    ):
        points = [(r.params, bookkeeping(r, config)) for r in lca_results.values() if config in r.runs]
        if len(points) == 1:
            n, t = points[0]
            constants[mode] = (t / n, 0.0)
            continue
        mean_n = sum(n for n, _ in points) / len(points)
        mean_t = sum(t for _, t in points) / len(points)
        covariance = sum((n - mean_n) * (t - mean_t) for n, t in points)
        variance = sum((n - mean_n) ** 2 for n, _ in points)
        gamma = max(covariance / variance, 0.0) if variance else 0.0
        constants[mode] = (gamma, max(mean_t - gamma * mean_n, 0.0))
    rho = median([median(r.objective) / r.fb_time for r in lca_results.values()])
    return constants, rho


def predict(lca_results: dict) -> tuple[list[Prediction], dict[str, tuple[float, float]], float]:
    constants, rho = calibrate(lca_results)
    predictions = []
    for result in lca_results.values():
        fb_probe = (result.probe_size / BATCH_SIZE) * median(result.fb_batch)
        for config in result.runs:
            if config in ("plain", "save iterates") or "long run" in config:
                continue  # (the long runs repeat the eager or the compiled configuration)
            evaluations, k = _evaluations(config)
            gamma, delta = constants[_mode(config)]
            predicted = (evaluations * fb_probe * rho + gamma * result.params + delta) / k
            predictions.append(Prediction(result.workload, config, predicted, result.extra(config)))
    return predictions, constants, rho


def nfa_gram_seconds(model: dict[str, float], outputs: int) -> float:
    """Predicted Gram time of exact G: 2·c·Σ rows·m(k) flops at the float32 product rate,
    m(k) ≈ k(k + 64)/2 the multiply-adds per row of the blocked upper-triangular product
    (each chunk's product, summed in float64), plus c·Σ rows·k elements laid out as rows
    (a copy for convolutions, dominant with few channels and many positions)."""
    flops = 2.0 * outputs * model["rows_k2"] / model["rate64"]
    return flops + outputs * model["layout_seconds"]
