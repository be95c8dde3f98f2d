r"""The Neural Feature Ansatz as plain functions on modules and tensors (BRIEF §3).

Notation (BRIEF 3.1–3.2). A layer has input h (dimension d: a vector, one token,
or one unfolded patch), weight ``W_flat`` = W (k×d) and pre-activation
z = W h + b. The network output is f ∈ R^c per sample (per token for sequences).

    NFM  = WᵀW                                            (d×d)
    AGOP = (1/n) Σ_x Σ_j ∇_h f_j(x) ∇_h f_j(x)ᵀ             (d×d)
    G    = (1/n) Σ_x Σ_j Σ_positions ∇_z f_j ∇_z f_jᵀ         (k×k)
    AGOP = Wᵀ G W                                          (exact)
    NFA:   WᵀW ∝ AGOP^α,  α ∈ {1, ½}

This module computes G for every layer at once (``preactivation_grams``,
``PreactivationGramAccumulator``), the scale-invariant NFA metrics from (W, G)
without ever forming a d×d matrix (``nfa_metrics``, ``range_spectrum``), the d×d
matrices themselves for drawing (``feature_matrices``), and finds the readout layer,
where G = I (``readout_from_outputs``, ``readout_from_grams``).
It imports nothing from Lightning: a hand-written training loop can use it as is.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

# The module, not its names: learnscope._probe imports learnscope.functional, so this
# import may meet _probe half-initialised; its functions are looked up when called.
from learnscope import _probe
from learnscope._validate import check_alphas, check_callable, check_choice, check_int
from learnscope.layers import (
    LayerMap,
    select_layers,
    supported_only,
    symmetric_from_upper,
    tapped,
)

__all__ = [
    "AUTO_EXACT_MAX_OUTPUTS",
    "ESTIMATORS",
    "NULL_DRAWS",
    "NULL_MAX_DRAWS",
    "NULL_MIN_DRAWS",
    "NULL_SE_TARGET",
    "NullDraws",
    "PreactivationGramAccumulator",
    "agop",
    "alpha_suffix",
    "call_model",
    "check_null_draws",
    "default_output_fn",
    "eval_mode",
    "feature_matrices",
    "haar_orthogonal",
    "haar_orthogonal_batch",
    "nfa_metrics",
    "nfa_metrics_and_spectrum",
    "preactivation_grams",
    "range_spectrum",
    "readout_from_grams",
    "readout_from_outputs",
    "rotation_null",
]

Estimator = Literal["exact", "hutchinson", "auto"]
#: The values of ``estimator``.
ESTIMATORS: tuple[Estimator, ...] = ("exact", "hutchinson", "auto")

#: ``estimator="auto"`` is exact up to this many outputs per position (c), Hutchinson above.
AUTO_EXACT_MAX_OUTPUTS = 64

# Seed of the private generator used when no generator is passed: results are
# reproducible and the global RNG streams are never read or advanced.
_DEFAULT_SEED = 0

#: ``null_draws``: a number of Haar rotations of the NFA rotation null, or ``"auto"``.
NullDraws = int | Literal["auto"]
#: The default ``null_draws``: ``"auto"`` draws until the null's standard error is at most
#: :data:`NULL_SE_TARGET` for every α, taking at least :data:`NULL_MIN_DRAWS` and at most
#: :data:`NULL_MAX_DRAWS` draws.
NULL_DRAWS: NullDraws = "auto"
#: The standard error ``null_draws="auto"`` aims for (absolute, in units of Pearson correlation).
NULL_SE_TARGET = 0.01
#: The fewest draws ``"auto"`` takes (its first standard error needs a few to mean anything).
#: A wide layer's null spreads so little that the bound from 4 draws already meets the target.
NULL_MIN_DRAWS = 4
# Where "auto" looks next when NULL_MIN_DRAWS were not enough: from 8 draws on, the 90 % bound of
# the std is ≤ 1.6 × the std, so sizing the remaining draws from it no longer overshoots much
# (benchmarks/null_draws.py: covered 274 of 280, against 278 with a first look at 8).
_NULL_SECOND_LOOK = 8
#: The most draws ``"auto"`` takes; a layer that stops here logs its larger ``null_se``.
NULL_MAX_DRAWS = 64


def check_null_draws(name: str, value: Any) -> NullDraws:
    """``value`` as a ``null_draws``: an int ≥ 0 or ``"auto"``; ValueError naming ``name`` otherwise."""
    if value == "auto" and isinstance(value, str):
        return "auto"
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f'{name} must be an int >= 0 or "auto", got {value!r}')
    return value


# --------------------------------------------------------------------------- #
# Model plumbing
# --------------------------------------------------------------------------- #


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every module of ``model`` in eval mode; restore each module's own flag on exit.

    ``model.train()`` afterwards would be wrong: users keep some submodules
    frozen in eval mode, so each module's ``.training`` is saved and restored.
    The probes' own ``module_modes(model, "eval")``, yielding ``model``.
    """
    with _probe.module_modes(model, "eval"):
        yield model


def default_output_fn(output: Any) -> Tensor:
    """Read the prediction tensor f out of a model's output.

    Accepts a tensor, a tuple/list (its first element), a mapping with a
    ``"logits"`` key, or an object with a ``logits`` attribute (e.g. Hugging Face
    ``ModelOutput``). Raises ValueError otherwise; pass ``output_fn`` then.
    """
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    if isinstance(output, Mapping) and isinstance(output.get("logits"), Tensor):
        return output["logits"]
    if isinstance(getattr(output, "logits", None), Tensor):
        return output.logits
    described = type(output).__name__
    if isinstance(output, Mapping):
        described += f" with keys {list(output.keys())}"
    raise ValueError(
        f"cannot read the model output ({described}) as a prediction tensor; pass "
        "output_fn=... mapping the model output to a tensor of shape (n, c) or (n, T, c)"
    )


def _clone_inference_tensors(value: Any) -> Any:
    # Tensors made under torch.inference_mode() cannot enter an autograd graph.
    if isinstance(value, Tensor):
        return value.clone() if value.is_inference() else value
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # namedtuple
        return type(value)(*(_clone_inference_tensors(v) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_clone_inference_tensors(v) for v in value)
    if isinstance(value, Mapping):
        return {key: _clone_inference_tensors(v) for key, v in value.items()}
    return value


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(**inputs)`` for a mapping, ``model(*inputs)`` for a tuple or list,
    ``model(inputs)`` otherwise: how every function here runs the model."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _cuda_devices(model: nn.Module, inputs: Any) -> list[int]:
    devices = {t.device for t in model.parameters()} | {t.device for t in model.buffers()}
    stack = [inputs]
    while stack:
        value = stack.pop()
        if isinstance(value, Tensor):
            devices.add(value.device)
        elif isinstance(value, (tuple, list)):
            stack.extend(value)
        elif isinstance(value, Mapping):
            stack.extend(value.values())
    indices = set()
    for device in devices:
        if device.type == "cuda":
            indices.add(device.index if device.index is not None else torch.cuda.current_device())
    return sorted(indices)


def _modules_in_training_mode(model: nn.Module) -> list[str]:
    """Modules in training mode that make samples interact (normalisation with batch
    statistics) or add noise (dropout with p > 0)."""
    return [
        name or "<root>"
        for name, module in model.named_modules()
        if module.training
        and (_probe.uses_batch_statistics(module) or (isinstance(module, _probe.DROPOUT_LAYERS) and module.p > 0))
    ]


def _resolve_layers(
    model: nn.Module, layers: Mapping[str, nn.Module | LayerMap] | Sequence[str] | None
) -> dict[str, LayerMap]:
    if layers is None or (isinstance(layers, (str, Sequence)) and not isinstance(layers, Mapping)):
        return select_layers(model, layers)
    if not isinstance(layers, Mapping):
        raise TypeError(
            "layers must be a mapping name -> module (or LayerMap), a list of glob patterns, "
            f"or None; got {type(layers).__name__}"
        )
    return supported_only(layers.items(), stacklevel=3)


# --------------------------------------------------------------------------- #
# G: the pre-activation gradient Gram matrix of every layer
# --------------------------------------------------------------------------- #


class PreactivationGramAccumulator:
    r"""Accumulates G_l for every layer over one or several input chunks.

    ``update(chunk)`` may be called any number of times; ``compute()`` returns

        G_l = (1/n) Σ_x Σ_j Σ_positions ∇_z f_j(x) ∇_z f_j(x)ᵀ     (k_l × k_l, float64)

    with n the total number of samples seen, so feeding a probe set in chunks
    gives the same G as one batch (exactly, up to float64 summation order, for
    the exact estimator); ``update(inputs)`` runs ``model`` on one chunk.

    Args:
        model: called as ``model(inputs)``, ``model(*inputs)`` for a tuple/list or
            ``model(**inputs)`` for a dict. Put it in eval mode first
            (``with eval_mode(model): ...``): samples must not interact.
        layers: name → ``LayerMap`` (from ``learnscope.layers.select_layers``) or
            module (a module holding several maps, an ``nn.MultiheadAttention``,
            gives ``<name>.q`` ...), a list of glob patterns over map names, or None
            for every supported layer (Linear, Conv1d/2d/3d, Hugging Face Conv1D,
            the q/k/v/out_proj maps of nn.MultiheadAttention). Unsupported modules
            are skipped with a warning.
        output_fn: maps the model output to the prediction f of shape (n, c) or
            (n, T, c) (any trailing shape: every coordinate is one output; for
            (n, T, c) each (token, class) pair is an output). Default:
            ``default_output_fn`` (tensor, first tuple element, ``logits``).
        estimator: "exact" (C = ∏ f.shape[1:] VJPs), "hutchinson" (``num_probes``
            Rademacher VJPs, unbiased, drawn independently per sample) or "auto"
            (exact when c = f.shape[-1] ≤ 64).
        num_probes: Hutchinson probes per sample.
        output_chunk: VJPs computed together (bounds memory: each holds a gradient
            the size of every measured layer's output).
        generator: source of Hutchinson probes; default a private generator
            seeded with 0 (the global RNG is never touched).

    How (BRIEF 3.4): forward hooks replace each layer's output z by z + p with
    p a zero leaf tensor, so ∂f/∂p = ∂f/∂z even when an in-place op (ReLU) follows
    the layer; one forward per chunk; then batched vector-Jacobian products
    ``torch.autograd.grad(f, [p_l], grad_outputs=V, is_grads_batched=True)`` for
    all layers at once, ``output_chunk`` rows of V at a time:

    * exact: V runs over the one-hot vectors of the C = ∏ f.shape[1:] outputs
      (the same one-hot for every sample: samples must not interact, so measure in
      eval mode); each VJP row holds ∇_z f_j(x) for every x and position;
    * hutchinson: V holds Rademacher vectors v (entries ±1) drawn independently
      for every sample; E[(vᵀJ)ᵀ(vᵀJ)] = JᵀJ, so G ≈ (1/(n·P)) Σ_x Σ_{p≤P} gᵀg with
      P = ``num_probes``: unbiased; independent draws per sample make the
      per-sample errors average out (≈10× better than one probe shared by the batch).

    Each batch of VJPs goes into the layer's float64 sum Σ gᵀg through its handler's
    ``add_gram`` (``learnscope.layers``): the product in the gradient's dtype, only
    its blocks on and above the diagonal (about half the work; G is symmetrised in
    ``compute``), a convolution's in its native (…, k, positions) layout. The probes
    p are stored as one expanded zero each, and the last batch of VJPs of a chunk
    frees the graph as it goes, as a plain backward does.

    A layer called several times in one forward (weight sharing) contributes all
    its calls, as if they were further positions.

    Nothing of the caller's state changes: no parameter, buffer, ``.grad``
    (``autograd.grad``, never ``.backward``), module ``.training`` flag, or global
    RNG stream (the forward runs under ``torch.random.fork_rng``; probes come from
    ``generator`` or a private generator seeded with 0). Hooks are removed in
    ``finally``. Works under ``torch.no_grad()`` / ``torch.inference_mode()``.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Mapping[str, nn.Module | LayerMap] | Sequence[str] | None = None,
        *,
        output_fn: Callable[[Any], Tensor] | None = None,
        estimator: Estimator = "exact",
        num_probes: int = 16,
        output_chunk: int = 16,
        generator: torch.Generator | None = None,
    ) -> None:
        self.requested_estimator = check_choice("estimator", estimator, ESTIMATORS)
        self.num_probes = check_int("num_probes", num_probes, minimum=1)
        self.output_chunk = check_int("output_chunk", output_chunk, minimum=1)
        self.output_fn = check_callable("output_fn", output_fn, "callable")
        self.model = model
        self.layers = _resolve_layers(model, layers)
        self.generator = generator
        self._batched_vjp_works = True
        self._warned: set[str] = set()
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated (the resolved estimator too)."""
        self.num_samples = 0
        self.estimator: str | None = None  # "exact" or "hutchinson" once resolved
        self._gram_sums: dict[str, Tensor] = {}
        self._calls: dict[str, int] = {name: 0 for name in self.layers}

    @property
    def is_estimate(self) -> bool:
        """True when G is a Hutchinson estimate rather than exact."""
        return self.estimator == "hutchinson"

    def update(self, inputs: Any) -> None:
        """Add one chunk of samples (a tensor, a tuple of positional args or a dict of kwargs)."""
        offenders = _modules_in_training_mode(self.model)
        if offenders and "training" not in self._warned:
            self._warned.add("training")
            warnings.warn(
                "learnscope NFA: modules in training mode ("
                + ", ".join(offenders[:5])
                + ("..." if len(offenders) > 5 else "")
                + ") make samples interact or add noise, and train-mode BatchNorm "
                "updates its running buffers; measure under learnscope.functional.nfa.eval_mode(model)",
                stacklevel=2,
            )
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.random.fork_rng(devices=_cuda_devices(self.model, inputs)))
            stack.enter_context(torch.inference_mode(False))
            stack.enter_context(torch.enable_grad())
            self._update(_clone_inference_tensors(inputs))

    def _update(self, inputs: Any) -> None:
        flat_output, leaves = self._forward(inputs)
        self._count_calls(leaves)
        self.num_samples += flat_output.shape[0]
        names = [name for name in self.layers for _ in leaves[name]]
        probes = self._probes(leaves)
        if not probes or not flat_output.requires_grad:
            return  # no measured layer influences the output: G gets zeros

        for grad_outputs, weight, last in self._grad_output_batches(flat_output):
            # The last batch lets autograd free the graph as it goes (as a plain backward
            # does): the saved activations are released before the chunk's peak.
            grads = self._batched_vjp(flat_output, probes, grad_outputs, retain_graph=not last)
            if grads is None:
                # The batched VJP failed after freeing part of the graph: build it again
                # (same inputs, eval mode: the same graph) and finish one VJP at a time.
                flat_output, leaves = self._forward(inputs)
                probes = self._probes(leaves)
                grads = self._vjp_per_row(flat_output, probes, grad_outputs, retain_graph=not last)
            self._add_grams(names, grads, weight)
            grads = None  # release this batch's gradients before the next batch's VJPs

    def _probes(self, leaves: Mapping[str, list[Tensor]]) -> list[Tensor]:
        """Every probe of one forward, layer by layer (one per call of the layer)."""
        return [probe for name in self.layers for probe in leaves[name]]

    def _count_calls(self, leaves: Mapping[str, list[Tensor]]) -> None:
        """Count each layer's calls in one forward, warn (once) about a layer that was not
        called, and allocate the float64 sum of a layer called for the first time."""
        for name in self.layers:
            if not leaves[name] and name not in self._warned:
                self._warned.add(name)
                warnings.warn(
                    f"learnscope NFA: layer {name!r} was not called during the forward pass "
                    "(e.g. a fused fast path that bypasses it, or a compiled model); it is left out",
                    stacklevel=4,
                )
            self._calls[name] += len(leaves[name])
            if leaves[name] and name not in self._gram_sums:
                k = self.layers[name].out_features()
                self._gram_sums[name] = torch.zeros(k, k, dtype=torch.float64, device=leaves[name][0].device)

    def _add_grams(self, names: list[str], grads: Sequence[Tensor | None], weight: float) -> None:
        """One batch of VJPs into each layer's sum: Σ gᵀg in the gradient's dtype, in blocks
        on and above the diagonal, accumulated over chunks in float64 (symmetrised in compute)."""
        for name, grad in zip(names, grads):
            if grad is not None:
                self.layers[name].add_gram(grad, self._gram_sums[name], alpha=weight)

    def _forward(self, inputs: Any) -> tuple[Tensor, dict[str, list[Tensor]]]:
        """One forward with a zero probe p added to every measured layer's output:
        the flattened prediction (n, C) and each layer's probes (one per call)."""
        leaves: dict[str, list[Tensor]] = {name: [] for name in self.layers}

        def make_tap(name: str) -> Callable[[Tensor], Tensor]:
            def tap(output: Tensor) -> Tensor:
                # A zero leaf of the output's shape, stored as one expanded element:
                # ∂f/∂p = ∂f/∂z, and z + p replaces z at no memory beyond z's.
                probe = output.new_zeros(()).expand(output.shape).requires_grad_()
                leaves[name].append(probe)
                return output + probe

            return tap

        with tapped(self.layers, make_tap):
            raw_output = call_model(self.model, inputs)

        output = self._read_output(raw_output)
        if self.estimator is None:
            if self.requested_estimator == "auto":
                self.estimator = "exact" if output.shape[-1] <= AUTO_EXACT_MAX_OUTPUTS else "hutchinson"
            else:
                self.estimator = self.requested_estimator
        return output.reshape(output.shape[0], -1), leaves

    def _read_output(self, raw_output: Any) -> Tensor:
        if self.output_fn is None:
            output = default_output_fn(raw_output)
        else:
            output = self.output_fn(raw_output)
            if not isinstance(output, Tensor):
                raise ValueError(
                    f"output_fn must return a tensor of shape (n, c) or (n, T, c), got {type(output).__name__}"
                )
        if not output.is_floating_point():
            raise ValueError(
                f"the prediction tensor has dtype {output.dtype}; pass output_fn=... "
                "returning floating-point outputs of shape (n, c) or (n, T, c)"
            )
        if output.dim() == 0:
            raise ValueError(
                "the prediction tensor is a scalar; pass output_fn=... returning "
                "per-sample outputs of shape (n, c) or (n, T, c)"
            )
        if output.dim() == 1:
            output = output.unsqueeze(-1)  # (n,) regression: one output per sample
        return output

    def _grad_output_batches(self, flat_output: Tensor) -> Iterator[tuple[Tensor, float, bool]]:
        """(grad_outputs, weight, last): the batches of VJP directions of one chunk."""
        num_samples, num_outputs = flat_output.shape
        dtype, device = flat_output.dtype, flat_output.device
        if self.estimator == "exact":
            # Row j of V is the one-hot e_j for every sample: rows of the identity,
            # expanded over the samples (no n × C storage per row).
            identity = torch.eye(num_outputs, dtype=dtype, device=device)
            for start in range(0, num_outputs, self.output_chunk):
                stop = min(start + self.output_chunk, num_outputs)
                one_hots = identity[start:stop].unsqueeze(1).expand(stop - start, num_samples, num_outputs)
                yield one_hots, 1.0, stop == num_outputs
            return
        if self.generator is None:
            self.generator = torch.Generator().manual_seed(_DEFAULT_SEED)
        for start in range(0, self.num_probes, self.output_chunk):
            count = min(self.output_chunk, self.num_probes - start)
            signs = torch.randint(
                0,
                2,
                (count, num_samples, num_outputs),
                generator=self.generator,
                device=self.generator.device,
            )
            yield (
                (2 * signs - 1).to(dtype=dtype, device=device),
                1.0 / self.num_probes,
                start + count == self.num_probes,
            )

    def _batched_vjp(
        self, output: Tensor, probes: list[Tensor], grad_outputs: Tensor, *, retain_graph: bool
    ) -> Sequence[Tensor | None] | None:
        """The VJPs of every row of ``grad_outputs``, stacked, for every probe; None when
        the batched VJP failed with ``retain_graph=False`` (the graph may be partly freed:
        the caller builds it again and calls once more, which then goes one row at a time)."""
        if self._batched_vjp_works:
            try:
                return torch.autograd.grad(
                    output,
                    probes,
                    grad_outputs=grad_outputs,
                    retain_graph=retain_graph,
                    allow_unused=True,
                    is_grads_batched=True,
                )
            except RuntimeError as error:
                # Some ops have no vmap rule for their backward; fall back to a loop.
                self._batched_vjp_works = False
                warnings.warn(
                    f"learnscope NFA: batched VJPs failed ({error}); falling back to one "
                    "VJP per output, which is slower",
                    stacklevel=4,
                )
                if not retain_graph:
                    return None
        return self._vjp_per_row(output, probes, grad_outputs, retain_graph=retain_graph)

    def _vjp_per_row(
        self, output: Tensor, probes: list[Tensor], grad_outputs: Tensor, *, retain_graph: bool
    ) -> list[Tensor | None]:
        """The VJPs of ``grad_outputs`` one row at a time, stacked, for every probe (None
        for a probe the output does not depend on)."""
        last_row = len(grad_outputs) - 1
        per_row = [
            torch.autograd.grad(
                output,
                probes,
                grad_outputs=row,
                retain_graph=retain_graph or i < last_row,
                allow_unused=True,
            )
            for i, row in enumerate(grad_outputs)
        ]
        stacked: list[Tensor | None] = []
        for position, probe in enumerate(probes):
            column = [grads[position] for grads in per_row]
            if all(g is None for g in column):
                stacked.append(None)
            else:
                stacked.append(
                    torch.stack(
                        [
                            torch.zeros(probe.shape, dtype=probe.dtype, device=probe.device) if g is None else g
                            for g in column
                        ]
                    )
                )
        return stacked

    def compute(self, reduce: Callable[[Tensor], Tensor] | None = None) -> dict[str, Tensor]:
        """G_l = (accumulated Σ) / n for every layer that was called, float64.

        ``reduce`` sums a tensor over processes (e.g. ``trainer.strategy.reduce`` with
        ``"sum"``): each process accumulates its share of the probe set and the sums,
        sample counts and call counts are combined in one collective, so every process
        returns the same G. Every process must call it, also one that saw no samples.
        """
        if reduce is not None:
            self._reduce(reduce)
        if self.num_samples == 0:
            raise RuntimeError("no samples accumulated: call update(inputs) first")
        return {
            name: symmetric_from_upper(self._gram_sums[name]).div_(self.num_samples)
            for name in self.layers
            if self._calls[name] > 0
        }

    def _reduce(self, reduce: Callable[[Tensor], Tensor]) -> None:
        names = list(self.layers)
        device = next((g.device for g in self._gram_sums.values()), None)
        sums = []
        for name in names:
            if name in self._gram_sums:
                sums.append(self._gram_sums[name])
            else:
                k = self.layers[name].out_features()
                sums.append(torch.zeros(k, k, dtype=torch.float64, device=device))
        counts = torch.tensor([self.num_samples] + [self._calls[n] for n in names], dtype=torch.float64, device=device)
        flat = reduce(torch.cat([g.reshape(-1) for g in sums] + [counts]))
        offset = 0
        for name, g in zip(names, sums):
            self._gram_sums[name] = flat[offset : offset + g.numel()].view_as(g).clone()
            offset += g.numel()
        totals = flat[offset:].round().long().tolist()
        self.num_samples = int(totals[0])
        self._calls = {name: int(c) for name, c in zip(names, totals[1:])}


def preactivation_grams(
    model: nn.Module,
    inputs: Any,
    layers: Mapping[str, nn.Module | LayerMap] | Sequence[str] | None = None,
    **options: Any,
) -> dict[str, Tensor]:
    r"""G_l for every layer in one forward pass on one batch ``inputs`` of n samples (BRIEF 3.2, 3.4).

        G_l = (1/n) Σ_x Σ_j Σ_positions ∇_z f_j(x) ∇_z f_j(x)ᵀ     (k_l × k_l, float64)

    so that the layer's AGOP is ``agop(W_flat, G_l) = W_flatᵀ G_l W_flat``
    (per token for Linear layers applied to sequences, per patch for convolutions,
    each layer's own input being the free variable).

    ``model``, ``layers`` and the keyword arguments (``output_fn``, ``estimator``,
    ``num_probes``, ``output_chunk``, ``generator``) are those of
    :class:`PreactivationGramAccumulator`, which a probe set fed in chunks uses.
    Put the model in eval mode first (``with eval_mode(model): ...``): samples must
    not interact.

    Returns:
        name → G (float64, on the layer's device), for every layer that ran.
    """
    accumulator = PreactivationGramAccumulator(model, layers, **options)
    accumulator.update(inputs)
    return accumulator.compute()


def agop(weight_flat: Tensor, gram: Tensor) -> Tensor:
    """AGOP = W_flatᵀ G W_flat (d×d), exact (BRIEF 3.2). Reference and tests only:
    the metrics never form d×d matrices."""
    weight = weight_flat.detach().to(dtype=gram.dtype, device=gram.device)
    return weight.mT @ gram @ weight


def feature_matrices(weight_flat: Tensor, gram: Tensor, *, alphas: Sequence[float] = (1.0, 0.5)) -> dict[str, Tensor]:
    """The d×d matrices the NFA compares, formed whole (float64), e.g. to draw them:

        ``"nfm"`` → NFM = WᵀW,   ``"agop_a{α}"`` → AGOP^α = (Wᵀ G W)^α  for every α in ``alphas``

    (M^α by ``eigh``, round-off eigenvalues set to 0). d×d each: for small layers only;
    the metrics never form them (:func:`nfa_metrics`).
    """
    weight64 = weight_flat.detach().to(torch.float64)
    full_agop = agop(weight64, gram)
    matrices = {"nfm": weight64.mT @ weight64}
    for alpha in check_alphas("alphas", alphas):
        matrices[f"agop_{alpha_suffix(alpha)}"] = _psd_power(full_agop, alpha)
    return matrices


# --------------------------------------------------------------------------- #
# The readout layer: G = I there, and the α = 1 metrics are identically 1
# --------------------------------------------------------------------------- #


def readout_from_outputs(layer_outputs: Mapping[str, Any], prediction: Tensor) -> str | None:
    """The readout: the last layer (in ``layer_outputs``' order) whose output tensor *is*
    the prediction f, the same tensor or a view of all of its elements (same first
    element, same number of elements). There ∇_z f_j = e_j, so G = I exactly whatever
    the weights. None when no layer's output is (entries that are not tensors are passed over).
    """
    for name in reversed(list(layer_outputs)):
        output = layer_outputs[name]
        if isinstance(output, Tensor) and (
            output is prediction
            or (output.data_ptr() == prediction.data_ptr() and output.numel() == prediction.numel())
        ):
            return name
    return None


def readout_from_grams(grams: Mapping[str, Tensor], *, tolerance: float = 1e-6) -> str | None:
    """The last layer (in ``grams``' order) whose exact G is a multiple of the identity:

        ‖G − s·I‖_F ≤ tolerance · ‖G‖_F,   s = tr(G)/k > 0,  k > 1

    A readout followed by a scaling or a shift (``logits / T``) has G = s²·I, so its α = 1
    metrics are identically 1, as at a raw readout; a layer followed by a non-linear map
    (a softmax) does not. None if no layer's G is. Meaningful for the exact G only.
    """
    for name in reversed(list(grams)):
        gram = grams[name].to(torch.float64)
        k = gram.shape[0]
        scale = torch.trace(gram) / k
        if k > 1 and scale > 0:
            off = gram - scale * torch.eye(k, dtype=gram.dtype, device=gram.device)
            if float(torch.linalg.matrix_norm(off)) <= tolerance * float(torch.linalg.matrix_norm(gram)):
                return name
    return None


# --------------------------------------------------------------------------- #
# Metrics (BRIEF 3.3), computed in the r-dimensional range of W
# --------------------------------------------------------------------------- #


def haar_orthogonal(
    k: int,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Tensor:
    """A Haar-distributed random orthogonal k×k matrix.

    QR of a standard Gaussian matrix with the signs of diag(R) moved into Q
    (without that correction Q is not Haar-distributed). Drawn on the
    generator's device (CPU by default), then moved to ``device``.
    """
    gaussian = torch.randn(
        k,
        k,
        generator=generator,
        dtype=torch.float64,
        device=generator.device if generator is not None else "cpu",
    )
    q, r = torch.linalg.qr(gaussian)
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return (q * signs).to(dtype=dtype, device=device)


def alpha_suffix(alpha: float) -> str:
    """The suffix that names a metric of exponent α: ``a{α:g}`` (``a1``, ``a0.5``)."""
    return f"a{alpha:g}"


def _default_rank_rtol(weight_flat: Tensor) -> float:
    # Singular values below max(k, d)·ε·s_max are round-off (numpy's matrix_rank
    # rule). ε is float32's unless the weight is float64: half-precision noise
    # is no reason to drop whole directions.
    eps = torch.finfo(torch.float64 if weight_flat.dtype == torch.float64 else torch.float32).eps
    return max(weight_flat.shape) * eps


# The thin SVD comes from the eigendecomposition of the smaller Gram matrix (WWᵀ or WᵀW)
# when the rank cutoff lies this many times above that route's round-off in a singular value,
# √(max(k, d)·ε₆₄)·s_max: LAPACK's divide-and-conquer SVD of a 512×784 float64 matrix takes
# ≈ 100 ms on one CPU thread, the Gram product and its eigh ≈ 30 ms.
_GRAM_ROUTE_MARGIN = 100.0


def _range_svd(weight: Tensor, rank_rtol: float) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD W = U S Vᵀ (float64 W) restricted to singular values above rank_rtol·s_max.

    With the default cutoff for a float32 weight (max(k, d)·ε₃₂·s_max) on a layer of
    more than about 150 rows or columns, it is taken from ``eigh`` of the smaller Gram
    matrix (see ``_range_svd_by_eigh``); otherwise (float64 weights' cutoff, small
    layers) from LAPACK's SVD.
    """
    k, d = weight.shape
    if min(k, d) > 0 and rank_rtol >= _GRAM_ROUTE_MARGIN * math.sqrt(max(k, d) * torch.finfo(torch.float64).eps):
        return _range_svd_by_eigh(weight, rank_rtol)
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    if s.numel() == 0 or not s[0] > 0:
        return u[:, :0], s[:0], vh[:0].mT
    rank = int((s > rank_rtol * s[0]).sum())
    return u[:, :rank], s[:rank], vh[:rank].mT


def _range_svd_by_eigh(weight: Tensor, rank_rtol: float) -> tuple[Tensor, Tensor, Tensor]:
    """``_range_svd`` from the Gram matrix of the shorter side: for k ≤ d, WWᵀ = U S² Uᵀ
    (``eigh``, float64) and V = WᵀU S⁻¹ (for k > d, WᵀW and U = W V S⁻¹).

    Accuracy: eigh's eigenvalues of the Gram matrix carry an absolute round-off of about
    max(k, d)·ε₆₄·s_max², so a kept singular value s ≥ rank_rtol·s_max has a relative
    error of at most ≈ max(k, d)·ε₆₄/(2·rank_rtol²) (≤ 5·10⁻⁵ at the cutoff under the
    margin ``_range_svd`` requires, ≤ 10⁻⁸ for s ≥ 100× the cutoff); the eigenvectors
    are orthonormal to ε₆₄ whatever the gaps, and the other side's columns are off by
    about ε₆₄/rank_rtol. Every metric is invariant to the signs and to the choice of
    basis within repeated singular values.
    """
    wide = weight.shape[0] <= weight.shape[1]
    gram = weight @ weight.mT if wide else weight.mT @ weight
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    s = eigenvalues.flip(0).clamp_min(0).sqrt()
    eigenvectors = eigenvectors.flip(1)
    if not s[0] > 0:
        return weight.new_zeros(weight.shape[0], 0), s[:0], weight.new_zeros(weight.shape[1], 0)
    rank = int((s > rank_rtol * s[0]).sum())
    s, basis = s[:rank], eigenvectors[:, :rank]
    other = (weight.mT @ basis if wide else weight @ basis) / s
    return (basis, s, other) if wide else (other, s, basis)


def _require_finite(name: str, tensor: Tensor) -> None:
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} contains non-finite values (NaN or ±inf); the NFA metrics need finite inputs")


def _range_frame(
    weight_flat: Tensor, gram: Tensor, rank_rtol: float
) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor, Tensor], Tensor]:
    """(G symmetrised, W, the thin SVD (U, S, V) of W on its range, UᵀGU), float64 on G's device."""
    _require_finite("weight_flat", weight_flat)
    _require_finite("gram", gram)
    gram = gram.detach().to(torch.float64)
    gram = 0.5 * (gram + gram.mT)
    weight = weight_flat.detach().to(dtype=torch.float64, device=gram.device)
    u, s, v = _range_svd(weight, rank_rtol)
    return gram, weight, (u, s, v), u.mT @ gram @ u


def _haar_transpose_times(frame: Tensor, generator: torch.Generator) -> Tensor:
    """Qᵀ·frame for the Haar-random Q that ``haar_orthogonal(k, generator=generator)`` would
    return (the same draw): ``_haar_transposes_times(frame, generator, 1)[0]``."""
    return _haar_transposes_times(frame, generator, 1)[0]


def _haar_transposes_times(
    frame: Tensor, generator: torch.Generator, draws: int, dtype: torch.dtype = torch.float64
) -> Tensor:
    """Q_iᵀ·frame (draws×k×r) for ``draws`` Haar-random Q_i, the draws that ``draws`` successive
    ``haar_orthogonal(k, generator=generator)`` calls would return, without forming Q: one
    batched Householder QR of the draws' Gaussian matrices, its reflectors applied to
    ``frame`` (k×r) and the sign correction Q → Q·diag(sign R_ii) applied to the rows.
    Round-off aside, equal to ``haar_orthogonal(k, generator=generator).mT @ frame`` per
    draw, in about half the time. The Gaussians are drawn one k×k float64 matrix at a time,
    so the generator's stream is consumed as by the unbatched draws; the QR and its
    application run in ``dtype`` (float32: the same draws to ε₃₂, in about half the time)."""
    k = frame.shape[0]
    device = generator.device if generator is not None else "cpu"
    gaussians = torch.stack(
        [torch.randn(k, k, generator=generator, dtype=torch.float64, device=device) for _ in range(draws)]
    ).to(dtype)
    reflectors, tau = torch.geqrf(gaussians)
    signs = torch.sign(torch.diagonal(reflectors, dim1=-2, dim2=-1))
    signs[signs == 0] = 1.0
    frame_here = frame.to(device=reflectors.device, dtype=dtype).expand(draws, *frame.shape)
    rotated = torch.ormqr(reflectors, tau, frame_here, left=True, transpose=True) * signs[..., None]
    return rotated.to(device=frame.device)


def haar_orthogonal_batch(
    draws: int,
    k: int,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Tensor:
    """``draws`` Haar-distributed random orthogonal k×k matrices (draws×k×k), by the batched
    QR the rotation null uses: equal, round-off aside, to ``draws`` successive
    ``haar_orthogonal(k, generator=generator)`` calls."""
    check_int("draws", draws, minimum=1)
    if generator is None:
        generator = torch.Generator().manual_seed(_DEFAULT_SEED)
    identity = torch.eye(k, dtype=torch.float64, device=generator.device)
    return _haar_transposes_times(identity, generator, draws).mT.to(dtype=dtype, device=device)


def _psd_eigen_power(matrix: Tensor, alpha: float, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """(p, E) with M^α = E diag(p) Eᵀ for symmetric PSD M (eigh; batched over leading
    dimensions); round-off (negative or ≤ r·ε·λ_max of the eigh's dtype) eigenvalues → 0.
    ``dtype``: the eigh's precision (default M's); p and E come back in M's dtype."""
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix if dtype is None else matrix.to(dtype))
    largest = eigenvalues.abs().amax(dim=-1, keepdim=True)
    cutoff = matrix.shape[-1] * torch.finfo(eigenvalues.dtype).eps * largest
    powered = torch.where(eigenvalues > cutoff, eigenvalues.clamp_min(0) ** alpha, torch.zeros_like(eigenvalues))
    return powered.to(matrix.dtype), eigenvectors.to(matrix.dtype)


def _psd_power(matrix: Tensor, alpha: float) -> Tensor:
    """M^α for symmetric PSD M via eigh; round-off (negative or ≤ r·ε·λ_max) eigenvalues → 0."""
    if matrix.numel() == 0:
        return matrix
    if alpha == 1:
        return matrix
    powered, eigenvectors = _psd_eigen_power(matrix, alpha)
    return (eigenvectors * powered) @ eigenvectors.mT


def _ratio(numerator: Tensor | float, denominator: Tensor | float) -> float:
    numerator, denominator = float(numerator), float(denominator)
    if not denominator > 0 or not math.isfinite(denominator):
        return float("nan")
    return numerator / denominator


def _nfa_correlations(s: Tensor, v: Tensor, compressed_gram: Tensor, alpha: float, d: int) -> tuple[float, float]:
    """Cosine and Pearson of NFM = WᵀW = V S² Vᵀ with AGOP^α = V M^α Vᵀ, M = S UᵀGU S
    (the sums of ``_correlation_terms``)."""
    if s.numel() == 0:
        return float("nan"), float("nan")
    inner, norm_x2, norm_y2, sum_x, sum_y = _correlation_terms(s, v, compressed_gram, alpha)
    cosine = _ratio(inner, torch.sqrt(norm_x2 * norm_y2))
    return cosine, float(_centred_pearson_tensor(inner, norm_x2, norm_y2, sum_x, sum_y, d))


def _correlation_terms(
    s: Tensor, v: Tensor, compressed_gram: Tensor, alpha: float, eigh_dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    r"""(⟨A, B⟩, ‖A‖², ‖B‖², Σ A_ij, Σ B_ij) for NFM A = WᵀW = V S² Vᵀ and AGOP^α B = V M^α Vᵀ,
    M = S UᵀGU S; ``compressed_gram`` (UᵀGU) may carry leading batch dimensions, and so then
    do the terms of B.

    Both are d×d matrices A = V X Vᵀ, B = V Y Vᵀ with Vᵀ V = I (r columns),
    X = S² diagonal and Y = M^α (r×r symmetric), so with u = Vᵀ1:
        ⟨A, B⟩ = tr(XY) = Σ_i s_i² Y_ii,  ‖A‖² = Σ_i s_i⁴,  ‖B‖² = ‖Y‖_F²,
        Σ A_ij = uᵀXu = Σ_i s_i² u_i²,  Σ B_ij = uᵀYu,
    and Pearson is the cosine of the centred matrices (``_centred_pearson_tensor``). For
    α ≠ 1, Y = E diag(p) Eᵀ (eigh of M) is not formed: Y_ii = Σ_j E_ij² p_j,
    ‖Y‖_F² = Σ_j p_j² and uᵀYu = Σ_j p_j (Eᵀu)_j². ``eigh_dtype``: the precision of that
    eigh (the sums stay in s's dtype).
    """
    x = s**2
    u = v.sum(dim=0)
    m = s[:, None] * compressed_gram.to(s.dtype) * s[None, :]
    if alpha == 1:
        inner = (x * torch.diagonal(m, dim1=-2, dim2=-1)).sum(dim=-1)
        norm_y2 = (m * m).sum(dim=(-2, -1))
        u_y_u = ((m @ u) * u).sum(dim=-1)
    else:
        powered, eigenvectors = _psd_eigen_power(m, alpha, eigh_dtype)
        # ⟨A, B⟩ = Σ_i x_i Σ_j E_ij² p_j = (xᵀ(E∘E))·p: one square and two matrix-vector products.
        inner = ((x @ (eigenvectors * eigenvectors)) * powered).sum(dim=-1)
        norm_y2 = (powered * powered).sum(dim=-1)
        u_y_u = (powered * (u @ eigenvectors) ** 2).sum(dim=-1)
    return inner, (x * x).sum(), norm_y2, (x * u * u).sum(), u_y_u


def _centred_pearson_tensor(
    inner: Tensor, norm_a2: Tensor, norm_b2: Tensor, sum_a: Tensor, sum_b: Tensor, d: int
) -> Tensor:
    """Pearson of two d×d matrices A, B from ⟨A, B⟩, ‖A‖², ‖B‖² and their entry sums:
    the cosine after subtracting each mean entry, ⟨A − a𝟙, B − b𝟙⟩ = ⟨A, B⟩ − d²ab
    (elementwise over batched terms; NaN where a variance is 0)."""
    mean_a, mean_b = sum_a / d**2, sum_b / d**2
    covariance = inner - d**2 * mean_a * mean_b
    variance_a = (norm_a2 - d**2 * mean_a**2).clamp_min(0)
    variance_b = (norm_b2 - d**2 * mean_b**2).clamp_min(0)
    scale = torch.sqrt(variance_a * variance_b)
    return torch.where((scale > 0) & torch.isfinite(scale), covariance / scale, torch.nan)


def _product_pearson(weight: Tensor, gram: Tensor) -> float:
    r"""Pearson of A = WᵀW with B = WᵀGW (d×d, W k×d) without an SVD of W and without
    forming them when k ≤ d: with P = WWᵀ (k×k) and w = W𝟙,
        ⟨A, B⟩ = tr(PGP) = ⟨P, GP⟩,  ‖A‖² = ‖P‖²,  ‖B‖² = tr(GPGP),
        Σ A_ij = ‖w‖²,  Σ B_ij = wᵀGw,
    then ``_centred_pearson_tensor``. For k > d, A and B are formed (d×d is smaller).
    Unlike the range-restricted metrics it keeps W's round-off directions, which weigh
    in at (singular value / s_max)² ≤ rank_rtol² there."""
    k, d = weight.shape
    if k <= d:
        p = weight @ weight.mT
        gp = gram @ p
        inner, norm_a2, norm_b2 = (p * gp).sum(), (p * p).sum(), (gp * gp.mT).sum()
        w = weight.sum(dim=1)
        sum_a, sum_b = w @ w, w @ gram @ w
    else:
        a, b = weight.mT @ weight, weight.mT @ gram @ weight
        inner, norm_a2, norm_b2 = (a * b).sum(), (a * a).sum(), (b * b).sum()
        sum_a, sum_b = a.sum(), b.sum()
    return float(_centred_pearson_tensor(inner, norm_a2, norm_b2, sum_a, sum_b, d))


def _sphericity(gram: Tensor) -> float:
    """ψ(G) = tr(G)² / (k·tr(G²)) ∈ [1/k, 1]; 1 ⇔ G ∝ I."""
    k = gram.shape[0]
    if k == 0:
        return float("nan")
    return _ratio(torch.trace(gram) ** 2, k * (gram * gram).sum())


def nfa_metrics(
    weight_flat: Tensor,
    gram: Tensor,
    *,
    alphas: Sequence[float] = (1.0, 0.5),
    initial_weight: Tensor | None = None,
    null_draws: NullDraws = NULL_DRAWS,
    generator: torch.Generator | None = None,
    readout: bool = False,
    rank_rtol: float | None = None,
) -> dict[str, float]:
    r"""The NFA metrics of one layer (BRIEF 3.3) from W_flat (k×d) and G (k×k).

    Everything is computed in the r-dimensional range of W, never with d×d
    matrices: with the thin SVD W = U S Vᵀ (singular values below
    ``rank_rtol``·s_max dropped; default max(k, d)·ε) and M = S UᵀGU S (r×r),
    NFM = WᵀW = V S² Vᵀ and AGOP^α = (WᵀGW)^α = V M^α Vᵀ (M^α by eigh, negative
    round-off eigenvalues set to 0).

    Keys, for every α in ``alphas`` with suffix ``a{α:g}`` (``a1``, ``a0.5``):

    * ``pearson_a{α}``: Pearson correlation of the flattened NFM and AGOP^α (the
      cosine after subtracting each matrix's mean entry); the headline number;
    * ``cosine_a{α}``: their cosine similarity ⟨A, B⟩/(‖A‖_F‖B‖_F);
    * ``null_a{α}``: mean of ``pearson_a{α}`` with G replaced by Q G Qᵀ over n
      Haar-random orthogonal Q (k×k): what the correlation is for a G with the same
      spectrum but no relation to W (high when W has low stable rank);
      ``null_se_a{α}``: its (and the excess's) standard error, std of the
      :func:`rotation_null` draws / √n (NaN for one draw); ``excess_a{α}`` = pearson
      − null; ``null_draws``: n, which is ``null_draws`` when that is an int, and for
      ``"auto"`` the draws (from :data:`NULL_MIN_DRAWS` to :data:`NULL_MAX_DRAWS`) it
      takes until the standard error of every α, computed with the 90 % upper
      confidence bound of the draws' std, is ≤ :data:`NULL_SE_TARGET`. Omitted when
      null_draws=0;
    * ``align_a{α}`` for α ≠ 1: cosine of UᵀGU with S^{2(1/α−1)} (the NFA-α
      condition G ∝ (WWᵀ)^{1/α−1} on range(W); for α = ½, G ∝ WWᵀ). For α = 1 it
      would be √``sphericity_range`` and is not repeated.

    and once:

    * ``sphericity``: ψ(G) = tr(G)²/(k·tr(G²)) ∈ [1/k, 1], 1 ⇔ G ∝ I;
    * ``sphericity_range``: ψ(UᵀGU), the same on range(W) (the α = 1 NFA condition);
    * ``stable_rank``: ‖W‖_F²/‖W‖_2²;
    * with ``initial_weight`` W₀: ``weight_change`` = ‖W − W₀‖_F/‖W‖_F and the
      centred NFA ``cnfa_pearson_a1``: ``pearson_a1`` with ΔW = W − W₀ in place
      of W, i.e. Pearson(ΔWᵀΔW, ΔWᵀ G ΔW), from the k×k products ΔWΔWᵀ and GΔWΔWᵀ
      (no SVD, no truncation of ΔW).

    ``readout=True`` marks a layer whose output is the raw model output, where G
    = I exactly (∇_z f_j = e_j): every α = 1 correlation is then identically 1 by
    construction (WᵀW vs WᵀW), so ``pearson``, ``cosine``, ``null``, ``null_se``, ``excess``
    (``_a1``) and ``cnfa_pearson_a1`` are left out instead of reported as
    evidence. α = ½ stays informative. Undefined values (W = 0, G = 0, ΔW = 0) are NaN.
    """
    return _nfa_metrics_and_spectrum(
        weight_flat,
        gram,
        alphas=alphas,
        initial_weight=initial_weight,
        null_draws=null_draws,
        generator=generator,
        readout=readout,
        rank_rtol=rank_rtol,
        with_spectrum=False,
    )[0]


def nfa_metrics_and_spectrum(weight_flat: Tensor, gram: Tensor, **options: Any) -> tuple[dict[str, float], Tensor]:
    """``(nfa_metrics(weight_flat, gram, **options), range_spectrum(weight_flat, gram))`` from one SVD of W.

    The keyword arguments, and their defaults, are those of :func:`nfa_metrics`; the
    same values as the two calls (the spectrum with the same ``rank_rtol``), at the
    cost of one thin SVD of W and one compression UᵀGU fewer: what the
    ``NeuralFeatureAnsatz`` callback computes at every measurement.
    """
    # Bound against nfa_metrics's signature: its defaults are the only ones, and an
    # unknown keyword is the same TypeError as there.
    arguments = inspect.signature(nfa_metrics).bind(weight_flat, gram, **options)
    arguments.apply_defaults()
    metrics, spectrum = _nfa_metrics_and_spectrum(**arguments.arguments, with_spectrum=True)
    assert spectrum is not None
    return metrics, spectrum


def _nfa_metrics_and_spectrum(
    weight_flat: Tensor,
    gram: Tensor,
    *,
    alphas: Sequence[float],
    initial_weight: Tensor | None,
    null_draws: NullDraws,
    generator: torch.Generator | None,
    readout: bool,
    rank_rtol: float | None,
    with_spectrum: bool,
) -> tuple[dict[str, float], Tensor | None]:
    alphas = _check_metric_arguments(weight_flat, gram, alphas, initial_weight, null_draws)
    if rank_rtol is None:
        rank_rtol = _default_rank_rtol(weight_flat)
    gram, weight, frame, compressed = _range_frame(weight_flat, gram, rank_rtol)
    reported = [alpha for alpha in alphas if not (readout and alpha == 1.0)]
    metrics = _correlations(frame, compressed, reported, weight.shape[1])
    if null_draws != 0 and reported:
        metrics.update(_rotation_nulls(frame, gram, metrics, reported, weight.shape[1], null_draws, generator))
    metrics.update(_geometry(gram, compressed, frame[1], alphas))
    if initial_weight is not None:
        metrics.update(_weight_change(weight, initial_weight, gram, readout))
    spectrum = torch.linalg.eigvalsh(compressed).flip(0) if with_spectrum else None
    return metrics, spectrum


def _check_metric_arguments(
    weight_flat: Tensor, gram: Tensor, alphas: Sequence[float], initial_weight: Tensor | None, null_draws: NullDraws
) -> tuple[float, ...]:
    """The shapes of W (k×d), G (k×k) and W₀ (k×d, finite), ``null_draws``; returns the distinct α."""
    if weight_flat.dim() != 2:
        raise ValueError(f"weight_flat must be a k×d matrix, got shape {tuple(weight_flat.shape)}")
    k, d = weight_flat.shape
    if gram.shape != (k, k):
        raise ValueError(f"gram must be {k}×{k} for a weight of shape {(k, d)}, got {tuple(gram.shape)}")
    if initial_weight is not None:
        if initial_weight.shape != weight_flat.shape:
            raise ValueError(f"initial_weight must have the weight's shape {(k, d)}, got {tuple(initial_weight.shape)}")
        _require_finite("initial_weight", initial_weight)
    checked = check_alphas("alphas", alphas)
    check_null_draws("null_draws", null_draws)
    return checked


def _correlations(
    frame: tuple[Tensor, Tensor, Tensor], compressed: Tensor, alphas: Sequence[float], d: int
) -> dict[str, float]:
    """``pearson_a{α}`` and ``cosine_a{α}`` of NFM = V S² Vᵀ with AGOP^α = V M^α Vᵀ, for every α."""
    metrics: dict[str, float] = {}
    _, s, v = frame
    for alpha in alphas:
        cosine, pearson = _nfa_correlations(s, v, compressed, alpha, d)
        metrics[f"pearson_{alpha_suffix(alpha)}"] = pearson
        metrics[f"cosine_{alpha_suffix(alpha)}"] = cosine
    return metrics


def _rotation_nulls(
    frame: tuple[Tensor, Tensor, Tensor],
    gram: Tensor,
    metrics: Mapping[str, float],
    alphas: Sequence[float],
    d: int,
    null_draws: NullDraws,
    generator: torch.Generator | None,
) -> dict[str, float]:
    """``null_a{α}``: the mean Pearson with G replaced by Q G Qᵀ over n Haar-random orthogonal
    Q (n = ``null_draws``, or chosen by ``"auto"``); ``null_se_a{α}``: its standard error, the
    per-draw sample standard deviation / √n (NaN for one draw); ``excess_a{α}`` =
    ``pearson_a{α}`` (from ``metrics``) − null; ``null_draws``: n."""
    if generator is None:
        generator = torch.Generator().manual_seed(_DEFAULT_SEED)
    per_draw = _null_pearsons(frame, gram, alphas, d, null_draws, generator)
    means, errors = per_draw.mean(dim=0), _standard_errors(per_draw)
    nulls: dict[str, float] = {"null_draws": float(per_draw.shape[0])}
    for alpha, null, error in zip(alphas, means.tolist(), errors.tolist()):
        suffix = alpha_suffix(alpha)
        nulls[f"null_{suffix}"] = null
        nulls[f"null_se_{suffix}"] = error
        nulls[f"excess_{suffix}"] = metrics[f"pearson_{suffix}"] - null
    return nulls


def _standard_errors(per_draw: Tensor) -> Tensor:
    """std/√n of each column of the n × len(alphas) draws (NaN for n < 2)."""
    n = per_draw.shape[0]
    if n < 2:
        return per_draw.new_full(per_draw.shape[1:], torch.nan)
    return per_draw.std(dim=0) / math.sqrt(n)


# The most matrix entries one batch of null draws holds (draws × k × k ≈ 64 MiB in float32).
_NULL_BATCH_ENTRIES = 2**24
# The null's draws are rotated, compressed and eigendecomposed in float32 (about half the time of
# float64 on a CPU): each draw's Pearson is then off by ≲ 3·10⁻⁴ on a layer whose singular values
# span 10⁵ (benchmarks/nfa_bench.py prints the worst case), against the 0.01 standard error
# the null aims for. The observed correlations stay float64.
_NULL_DTYPE = torch.float32


def _null_pearsons(
    frame: tuple[Tensor, Tensor, Tensor],
    gram: Tensor,
    alphas: Sequence[float],
    d: int,
    draws: NullDraws,
    generator: torch.Generator,
) -> Tensor:
    """Pearson of NFM with AGOP^α for G → Q_i G Q_iᵀ, n × len(alphas): in range(W),
    Uᵀ(QGQᵀ)U = (QᵀU)ᵀ G (QᵀU), batched over the draws. n = ``draws``, or for ``"auto"``
    the first count from NULL_MIN_DRAWS on (up to NULL_MAX_DRAWS) whose standard error is
    ≤ NULL_SE_TARGET for every α; each further block is sized from the spread seen so far,
    n ≈ (std / target)². The draws are the generator's next n in order either way. The
    rotations, compressions and eigendecompositions run in ``_NULL_DTYPE`` (float32), the
    correlation sums in float64."""
    u, s, v = frame
    gram32 = gram.to(_NULL_DTYPE)
    batch = max(1, _NULL_BATCH_ENTRIES // max(u.shape[0] ** 2, 1))
    limit = NULL_MAX_DRAWS if draws == "auto" else draws
    blocks: list[Tensor] = []
    taken = 0
    while taken < limit:
        wanted = limit - taken if draws != "auto" else _more_draws_wanted(blocks, taken)
        if wanted == 0:
            break
        size = min(batch, limit - taken, wanted)
        rotated_frames = _haar_transposes_times(u, generator, size, _NULL_DTYPE)
        rotated = rotated_frames.mT @ gram32 @ rotated_frames
        pearsons = [_batched_pearson(s, v, rotated, alpha, d, _NULL_DTYPE) for alpha in alphas]
        blocks.append(torch.stack(pearsons, dim=-1))
        taken += size
    return torch.cat(blocks) if blocks else gram.new_empty(0, len(alphas))


def _more_draws_wanted(blocks: list[Tensor], taken: int) -> int:
    """How many more draws ``"auto"`` wants after ``taken``: NULL_MIN_DRAWS to start, up to 8
    (``_NULL_SECOND_LOOK``) at the second look; 0 once
    every α's standard error, computed with the one-sided 90 % upper confidence bound of
    the std (:func:`_std_upper_bound`; so that a std that came out low by chance does not
    stop the draws early), is ≤ NULL_SE_TARGET, or is undefined (a NaN correlation); else
    the shortfall of the draws that bound needs, at least 2."""
    if taken == 0:
        return NULL_MIN_DRAWS
    spread = _std_upper_bound(float(torch.cat(blocks).std(dim=0).max()), taken)
    if not math.isfinite(spread) or spread / math.sqrt(taken) <= NULL_SE_TARGET:
        return 0
    if taken < _NULL_SECOND_LOOK:  # a bound from 4 draws is 2.3 × the std: sizing from it would overshoot
        return _NULL_SECOND_LOOK - taken
    return max(math.ceil((spread / NULL_SE_TARGET) ** 2) - taken, 2)


def _std_upper_bound(std: float, n: int, z: float = 1.2815515655446004) -> float:
    """The upper bound s·√((n−1)/χ²_q) of a normal sample's std s at confidence Φ(z) (q = 1 − Φ(z),
    default 90 %), with χ²_q on n − 1 degrees of freedom from the Wilson–Hilferty cube
    approximation k(1 − 2/(9k) − z√(2/(9k)))³ (within 2 % of the exact quantile for k ≥ 3)."""
    k = n - 1
    quantile = k * (1 - 2 / (9 * k) - z * math.sqrt(2 / (9 * k))) ** 3
    return std * math.sqrt(k / quantile) if quantile > 0 else math.inf


def _batched_pearson(
    s: Tensor, v: Tensor, compressed_grams: Tensor, alpha: float, d: int, eigh_dtype: torch.dtype | None = None
) -> Tensor:
    """``_nfa_correlations``' Pearson for each of a batch (b×r×r) of UᵀGU: b values (in s's dtype)."""
    if s.numel() == 0:
        return s.new_full(compressed_grams.shape[:1], torch.nan)
    return _centred_pearson_tensor(*_correlation_terms(s, v, compressed_grams, alpha, eigh_dtype), d)


def rotation_null(
    weight_flat: Tensor,
    gram: Tensor,
    *,
    alphas: Sequence[float] = (1.0, 0.5),
    draws: NullDraws = NULL_DRAWS,
    generator: torch.Generator | None = None,
    rank_rtol: float | None = None,
) -> Tensor:
    r"""The rotation null's draws: ``pearson_a{α}`` of W (k×d) with G replaced by Q_i G Q_iᵀ
    for n Haar-random orthogonal Q_i (k×k), an n × len(alphas) float64 tensor (columns in
    the order of the distinct ``alphas``); n = ``draws``, or for ``"auto"`` as
    :func:`nfa_metrics` chooses it.

    ``nfa_metrics(weight_flat, gram, null_draws=draws, generator=g)`` reports their column
    means as ``null_a{α}``, their standard errors std/√n as ``null_se_a{α}`` and n as
    ``null_draws``; with an equally seeded generator these are the same draws.
    """
    check_null_draws("draws", draws)
    alphas = _check_metric_arguments(weight_flat, gram, alphas, None, draws)
    if rank_rtol is None:
        rank_rtol = _default_rank_rtol(weight_flat)
    if generator is None:
        generator = torch.Generator().manual_seed(_DEFAULT_SEED)
    gram, weight, frame, _ = _range_frame(weight_flat, gram, rank_rtol)
    return _null_pearsons(frame, gram, alphas, weight.shape[1], draws, generator)


def _geometry(gram: Tensor, compressed: Tensor, s: Tensor, alphas: Sequence[float]) -> dict[str, float]:
    """``sphericity`` ψ(G), ``sphericity_range`` ψ(UᵀGU), ``align_a{α}`` (α ≠ 1): the cosine of
    UᵀGU with S^{2(1/α−1)}, and ``stable_rank`` ‖W‖_F²/‖W‖_2² = Σ s_i²/s_1²."""
    metrics = {"sphericity": _sphericity(gram), "sphericity_range": _sphericity(compressed)}
    for alpha in alphas:
        if alpha == 1.0:
            continue
        target = s ** (2 * (1 / alpha - 1))
        metrics[f"align_{alpha_suffix(alpha)}"] = _ratio(
            (torch.diagonal(compressed) * target).sum(),
            torch.linalg.matrix_norm(compressed) * torch.linalg.vector_norm(target),
        )
    metrics["stable_rank"] = _ratio((s**2).sum(), s[0] ** 2) if s.numel() else float("nan")
    return metrics


def _weight_change(weight: Tensor, initial_weight: Tensor, gram: Tensor, readout: bool) -> dict[str, float]:
    """``weight_change`` ‖W − W₀‖_F/‖W‖_F and, except at the readout, the centred NFA
    ``cnfa_pearson_a1`` = Pearson(ΔWᵀΔW, ΔWᵀ G ΔW) with ΔW = W − W₀."""
    delta = weight - initial_weight.detach().to(dtype=torch.float64, device=weight.device)
    metrics = {"weight_change": _ratio(torch.linalg.matrix_norm(delta), torch.linalg.matrix_norm(weight))}
    if not readout:
        metrics["cnfa_pearson_a1"] = _product_pearson(delta, gram)
    return metrics


def range_spectrum(weight_flat: Tensor, gram: Tensor, *, rank_rtol: float | None = None) -> Tensor:
    """Eigenvalues (descending, float64) of UᵀGU, G compressed to range(W).

    The α = 1 NFA holds exactly when they are all equal; a histogram of them
    shows how far from isotropic the layer's pre-activation gradients are.
    """
    if rank_rtol is None:
        rank_rtol = _default_rank_rtol(weight_flat)
    compressed = _range_frame(weight_flat, gram, rank_rtol)[3]
    return torch.linalg.eigvalsh(compressed).flip(0)
