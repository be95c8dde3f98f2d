"""NFA benchmarks (issue #7, target 3, and the NFA half of 4 and 5).

Three ways to get the per-layer gradient geometry of every measured layer on a
probe set of n samples (chunks of 256), measured side by side:

* ``reference``: the inherent minimum: one forward keeping each layer's output z_l,
  then c batched vector-Jacobian products ``autograd.grad(f, [z_l], one_hots,
  is_grads_batched=True)`` (nothing accumulated);
* ``learnscope``: :class:`PreactivationGramAccumulator` (exact), which also forms
  G_l = Σ gᵀg in float64 (``gram`` isolates that product's cost);
* ``vmap(jacrev)``: the original papers' per-layer approach: for each layer, the
  Jacobian of the network's tail with respect to the layer's input h,
  ``vmap(jacrev(tail))(h)`` (n×c×d), and AGOP = JᵀJ (d×d, float64) (our own
  implementation of the idea).

Plus the NFA callback inside a Trainer when ``learnscope.callbacks.nfa`` exists.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from learnscope.functional.nfa import (
    PreactivationGramAccumulator,
    _default_rank_rtol,
    _range_frame,
    nfa_metrics_and_spectrum,
)
from learnscope.layers import GRAM_BLOCK, handler_for
from timing import Stopwatch, best_of, interleaved, median
from workloads import StepClock, Workload, fit, scratch_dir

CHUNK = 256


def measured_layers(net: nn.Sequential) -> list[int]:
    return [i for i, m in enumerate(net) if isinstance(m, (nn.Linear, nn.Conv2d))]


class NFAProblem:
    def __init__(self, workload: Workload, samples: int) -> None:
        self.net = workload.net().eval()
        x, _ = workload.data()
        self.chunks = [x[i : i + CHUNK] for i in range(0, samples, CHUNK)]
        self.layers = measured_layers(self.net)
        self.outputs = self.net(self.chunks[0][:1]).shape[-1]
        with torch.random.fork_rng():
            torch.manual_seed(1)
            other = workload.build()
        self.initial_weights = {
            str(i): other[i].weight.detach().reshape(other[i].weight.shape[0], -1) for i in self.layers
        }

    # -- the inherent minimum
    def reference(self) -> None:
        for x in self.chunks:
            self.chunk_vjps(x)

    # -- what the library does
    def learnscope(self) -> dict[str, Tensor]:
        accumulator = PreactivationGramAccumulator(self.net, [str(i) for i in self.layers], estimator="exact")
        for x in self.chunks:
            accumulator.update(x)
        return accumulator.compute()

    def gram_only(self, grads: list[Tensor]) -> None:
        """The Gram products alone, on VJP outputs of one chunk (attribution), as the library
        does them: each layer handler's ``add_gram`` (the blocks of rowsᵀrows on and above
        the diagonal in the gradient's dtype, a convolution's in its native layout), added
        into a float64 sum."""
        for index, g in zip(self.layers, grads):
            module = self.net[index]
            handler = handler_for(module)
            k = handler.out_features(module)
            handler.add_gram(module, g, torch.zeros(k, k, dtype=torch.float64))

    def chunk_vjps(self, x: Tensor | None = None) -> list[Tensor]:
        """One forward over a chunk (default: the first) and c batched VJPs to every layer."""
        x = self.chunks[0] if x is None else x
        outputs, h = [], x
        for i, module in enumerate(self.net):
            h = module(h)
            if i in self.layers:
                outputs.append(h)
        n, c = h.shape
        one_hots = torch.eye(c).unsqueeze(1).expand(c, n, c)
        return list(torch.autograd.grad(h, outputs, grad_outputs=one_hots, is_grads_batched=True))

    # -- the papers' per-layer approach
    def vmap_jacrev(self) -> dict[int, Tensor]:
        agops: dict[int, Tensor] = {}
        for index in self.layers:
            head, tail = self.net[:index], self.net[index:]

            def tail_fn(h: Tensor, tail: nn.Module = tail) -> Tensor:  # this iteration's tail, bound now
                return tail(h.unsqueeze(0)).squeeze(0)

            total = None
            for x in self.chunks:
                with torch.no_grad():
                    h = head(x)
                jacobian = torch.func.vmap(torch.func.jacrev(tail_fn))(h)  # n × c × d
                rows = jacobian.reshape(-1, h[0].numel()).to(torch.float64)
                product = rows.mT @ rows
                total = product if total is None else total.add_(product)
            agops[index] = total
        return agops

    def metrics(self, grams: dict[str, Tensor]) -> None:
        """nfa_metrics and range_spectrum of every layer, from one SVD of W as the callback
        computes them (``nfa_metrics_and_spectrum``), with W₀ = an independent initialisation
        (a dense ΔW, as after training: the centred NFA does its full work)."""
        for name, gram in grams.items():
            weight = self.net[int(name)].weight.detach()
            weight = weight.reshape(weight.shape[0], -1)
            nfa_metrics_and_spectrum(weight, gram, initial_weight=self.initial_weights[name])

    def metrics_floor(self, grams: dict[str, Tensor]) -> None:
        """What no exact metric set can skip, per layer, in float64: the eigendecomposition that
        gives W's range frame (U, S, V), the eigendecomposition of M = S UᵀGU S that M^½ (α = ½)
        needs, and the eigenvalues of UᵀGU (the logged range spectrum). No null draws."""
        for name, gram in grams.items():
            weight = self.net[int(name)].weight.detach()
            weight = weight.reshape(weight.shape[0], -1)
            _, _, (_, s, _), compressed = _range_frame(weight, gram, _default_rank_rtol(weight))
            torch.linalg.eigh(s[:, None] * compressed * s[None, :])
            torch.linalg.eigvalsh(compressed)


@dataclass
class NFAResults:
    workload: str
    samples: int
    outputs: int
    times: dict[str, list[float]] = field(default_factory=dict)
    callback: dict[str, Any] = field(default_factory=dict)
    gram_model: dict[str, float] = field(default_factory=dict)  # inputs of the Gram-time model

    def time(self, name: str) -> float:
        return median(self.times[name])


# --------------------------------------------------------------------------- callback level


def nfa_callback_class() -> Any:
    """The NeuralFeatureAnsatz callback, or None while it does not exist yet."""
    try:
        from learnscope.callbacks.nfa import NeuralFeatureAnsatz
    except ImportError:
        return None
    return NeuralFeatureAnsatz


def timed_nfa_class(base: Any) -> Any:
    class TimedNFA(base):
        """NeuralFeatureAnsatz with a stopwatch around its stages (same behaviour)."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.stopwatch = Stopwatch()

        def _measure(self, *args: Any, **kwargs: Any) -> Any:
            from timing import active

            with self.stopwatch.time("measure"), active(self.stopwatch):
                return super()._measure(*args, **kwargs)

        def _preactivation_grams(self, *args: Any) -> Any:
            with self.stopwatch.time("grams"):
                return super()._preactivation_grams(*args)

        def _summarise(self, *args: Any) -> Any:
            with self.stopwatch.time("metrics"):
                return super()._summarise(*args)

    return TimedNFA


def run_callback(workload: Workload, samples: int, every: int, periods: int, repeats: int) -> dict[str, Any]:
    base = nfa_callback_class()
    if base is None:
        return {}
    timed = timed_nfa_class(base)
    steps = every * (1 + periods)
    per_step: dict[str, list[float]] = {"plain": [], "nfa": []}
    stages: list[dict[str, float]] = []
    images: list[int] = []

    def plain() -> float:
        clock = StepClock(every)
        logdir = scratch_dir()
        try:
            fit(workload, [clock], steps, logdir=logdir)
        finally:
            shutil.rmtree(logdir, ignore_errors=True)
        per_step["plain"].append(clock.per_step())
        return per_step["plain"][-1]

    def with_nfa() -> float:
        callback = timed(every_n_steps=every, probe_size=samples, probe_batch_size=CHUNK)
        watches: list[Stopwatch] = []

        def on_warm() -> None:
            watches.append(callback.stopwatch)
            callback.stopwatch = Stopwatch()

        clock = StepClock(every, on_warm)
        logdir = scratch_dir()
        try:
            fit(workload, [callback, clock], steps, logdir=logdir)
        finally:
            shutil.rmtree(logdir, ignore_errors=True)
        measured = callback.stopwatch.count("grams") - 1  # the fit-end measurement is after the window
        window = callback.stopwatch
        end_measure = {label: calls[-1] for label, calls in window.calls.items() if calls}
        stages.append(
            {
                label: (sum(calls) - end_measure.get(label, 0.0)) / max(measured, 1)
                for label, calls in window.calls.items()
            }
        )
        images.append(sum(1 for w in (*watches, window) for _ in w.calls.get("images", [])))
        per_step["nfa"].append(clock.per_step())
        return per_step["nfa"][-1]

    interleaved({"plain": plain, "nfa": with_nfa}, repeats)
    extra_per_measurement = (median(per_step["nfa"]) - median(per_step["plain"])) * every
    labels = stages[0].keys() if stages else []
    return {
        "every": every,
        "extra_per_measurement": extra_per_measurement,
        "stages": {label: median([s.get(label, 0.0) for s in stages]) for label in labels},
        "plain_step": median(per_step["plain"]),
    }


def run(
    workload: Workload,
    *,
    samples: int,
    repeats: int,
    with_jacrev: bool = True,
    callback_repeats: int = 0,
    callback_every: int = 4,
    callback_periods: int = 3,
) -> NFAResults:
    problem = NFAProblem(workload, samples)
    results = NFAResults(workload.name, samples, problem.outputs)
    grams = problem.learnscope()
    vjps = problem.chunk_vjps()
    cases = {
        "reference": lambda: best_of(problem.reference, 1),
        "learnscope": lambda: best_of(problem.learnscope, 1),
        "gram (one chunk)": lambda: best_of(lambda: problem.gram_only(vjps), 1),
        "metrics": lambda: best_of(lambda: problem.metrics(grams), 1),
        "metrics floor": lambda: best_of(lambda: problem.metrics_floor(grams), 1),
    }
    if with_jacrev:
        cases["vmap(jacrev)"] = lambda: best_of(problem.vmap_jacrev, 1)
    samples_by_case = interleaved(cases, repeats)
    results.times = samples_by_case
    results.times["gram"] = [t * len(problem.chunks) for t in samples_by_case["gram (one chunk)"]]
    if callback_repeats:
        results.callback = run_callback(workload, samples, callback_every, callback_periods, callback_repeats)
    return results


def check_agreement(workload: Workload, samples: int = 256) -> float:
    """Relative difference between our AGOP (WᵀGW) and vmap(jacrev)'s, first layer:
    the two methods must compute the same thing for the comparison to mean anything."""
    problem = NFAProblem(workload, samples)
    grams = problem.learnscope()
    agops = problem.vmap_jacrev()
    index = problem.layers[-2]
    weight = problem.net[index].weight.detach().to(torch.float64)
    weight = weight.reshape(weight.shape[0], -1)
    ours = weight.mT @ grams[str(index)] @ weight
    theirs = agops[index] / samples
    return float((ours - theirs).norm() / theirs.norm()) if theirs.norm() > 0 else math.nan


def product_madds_per_row(k: int) -> int:
    """Multiply-adds per row of ``add_upper_gram``'s blocked product (k² up to one block,
    about k(k + b)/2 above)."""
    if k <= GRAM_BLOCK:
        return k * k
    return sum(min(GRAM_BLOCK, k - start) * (k - start) for start in range(0, k, GRAM_BLOCK))


def gram_model_inputs(workload: Workload, samples: int = 1024) -> dict[str, float]:
    """Inputs of the Gram-time model: Σ_l rows_l·(multiply-adds per row of the blocked
    symmetric product, ≈ k_l²/2) over the probe set for the layers whose rows are a matrix
    (Linear; rows: samples × positions), the float32 matrix-product rate (flop/s), and
    the time per row entry of the rest: a Linear's rows are a view (no copy, timed here
    as such); a convolution's Gram is contracted in its native layout by batched
    products (``ConvHandler.add_gram``), timed here per gradient entry on a chunk of
    8 channels on 28×28 positions."""
    net = workload.net().eval()
    x, _ = workload.data(1)
    shapes: dict[int, torch.Size] = {}
    h = x
    with torch.no_grad():
        for i, module in enumerate(net):
            h = module(h)
            shapes[i] = h.shape
    rows_k2 = rows_k_linear = rows_k_conv = 0.0
    for index in measured_layers(net):
        k = shapes[index][1]
        positions = math.prod(shapes[index][2:]) if len(shapes[index]) > 2 else 1
        if len(shapes[index]) > 2 and 4 * positions >= k:
            rows_k_conv += samples * positions * k
        else:  # a Linear, or a convolution with few positions (rows path: counted like a Linear)
            rows_k2 += samples * positions * product_madds_per_row(k)
            rows_k_linear += samples * positions * k
    a = torch.randn(2560, 512)
    product = best_of(lambda: torch.zeros(512, 512, dtype=torch.float64).add_(a.mT @ a), 5)
    # a chunk's batched VJP outputs (c, n, k[, H, W]): a Linear's rows are contiguous (a
    # view); a convolution's Gram in its native layout; beyond the caches
    linear = torch.randn(10, CHUNK, 4096)
    # the tensors are bound as defaults: best_of runs the lambdas before the ``del`` frees them
    per_linear = best_of(lambda linear=linear: linear.reshape(-1, 4096).contiguous(), 3) / linear.numel()
    del linear
    conv = torch.randn(10, CHUNK, 8, 28, 28)
    conv_layer = nn.Conv2d(1, 8, 3)
    target = torch.zeros(8, 8, dtype=torch.float64)
    per_conv = best_of(lambda conv=conv: handler_for(conv_layer).add_gram(conv_layer, conv, target), 3) / conv.numel()
    del conv
    return {
        "rows_k2": rows_k2,
        "rate64": 2 * 2560 * 512 * 512 / product,
        "layout_seconds": rows_k_linear * per_linear + rows_k_conv * per_conv,
        "per_linear": per_linear,
        "per_conv": per_conv,
    }
