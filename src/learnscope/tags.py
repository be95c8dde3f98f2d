"""Tag names (public API) for the records the callbacks produce.

Every tag is formatted from its family in :mod:`learnscope.contract`, and starts with
its callback's ``name`` (the *root*: ``lca`` and ``nfa`` by default), so that several
callbacks of one kind can log into one run."""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from learnscope import contract

if TYPE_CHECKING:
    from torch import Tensor

    from learnscope.records import LCAStepRecord, Moments, NFARecord

_F = contract.family


def lca_scalars(
    record: LCAStepRecord,
    cumulative: Mapping[str, float],
    cumulative_relative_error: float,
    root: str = "lca",
    cumulative_tensors: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Scalars of one measured step written per step: :func:`lca_step_scalars` and
    :func:`lca_layer_scalars` of the step alone (``per_step_series=True``)."""
    out = lca_step_scalars(record, cumulative_relative_error, root)
    out.update(lca_layer_scalars(record, cumulative, root, cumulative_tensors=cumulative_tensors))
    return out


def lca_step_scalars(record: LCAStepRecord, cumulative_relative_error: float, root: str = "lca") -> dict[str, float]:
    """The run-level scalars of one measured step (written every measured step): ``lca/total``,
    the errors, counts and shape, ``lca/part/<part>`` over all modules, and the ablation corners."""
    out = _lca_run_scalars(record, cumulative_relative_error, root)
    part_tags = _part_tags(root)
    for part, value in record.parts.items():
        out[part_tags[part]] = value
    for corner, stats in record.ablation.items():
        data, rule = corner.split("_", 1)
        out[_F("lca_ablation_helped").format(root, data=data, rule=rule)] = stats.counts.helped_fraction
        for part, value in stats.parts.items():
            out[_F("lca_ablation_part").format(root, data=data, rule=rule, part=part)] = value
    return out


def lca_layer_scalars(
    record: LCAStepRecord,
    cumulative: Mapping[str, float],
    root: str = "lca",
    *,
    cumulative_parts: Mapping[str, float] | None = None,
    cumulative_tensors: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """The per-layer series of ``record``, one step or a logging window's merged steps:
    per module ``lca/layer``, ``layer_cumulative`` (from ``cumulative``), helped / hurt
    fraction and skewness (of the merged counts and power sums: pooled over the window),
    ``lca/part/<part>/<module>``, and ``lca/part_cumulative/<part>/<module>`` from the
    ``<part>/<module>`` keys of ``cumulative_parts``; per parameter tensor
    ``lca/tensor[_cumulative]/<module>/<tensor>``."""
    out = lca_tensor_scalars(record.tensors, cumulative_tensors or {}, root)
    for module, value in record.layers.items():
        layer, layer_cumulative, helped, hurt = _module_tags(root, module)
        counts = record.layer_counts[module]
        out[layer] = value
        out[layer_cumulative] = cumulative[module]
        out[helped] = counts.helped_fraction
        out[hurt] = counts.hurt_fraction
        skewness = record.layer_moments[module].skewness if module in record.layer_moments else math.nan
        if math.isfinite(skewness):
            out[_layer_skewness_tag(root, module)] = skewness
    for module, parts in record.layer_parts.items():
        tags = _module_part_tags(root, module)
        for part, value in parts.items():
            out[tags[part]] = value
    out.update(lca_part_cumulative(cumulative_parts or {}, root, modules=True))
    return out


def lca_window_steps(steps: int, root: str = "lca") -> dict[str, float]:
    """``lca/window_steps``: the measured steps summed into a windowed point of the per-layer series."""
    return {_F("lca_window_steps").format(root): float(steps)}


def lca_unit_tensors(units: Mapping[str, Tensor], root: str = "lca") -> dict[str, Tensor]:
    """``lca/unit/<module>``: each module's per-output-unit allocations, a 1-D float32 tensor."""
    return {_F("lca_unit").format(root, module=module): values.float() for module, values in units.items()}


def lca_tensor_scalars(
    tensors: Mapping[str, float], cumulative_tensors: Mapping[str, float], root: str = "lca"
) -> dict[str, float]:
    """``lca/tensor/<module>/<tensor>`` of each parameter tensor in ``tensors`` (Σ A by qualified
    name) and its ``lca/tensor_cumulative/<module>/<tensor>`` from ``cumulative_tensors``."""
    out = {}
    for name, value in tensors.items():
        tensor, tensor_cumulative = _tensor_tags(root, name)
        out[tensor] = value
        if name in cumulative_tensors:
            out[tensor_cumulative] = cumulative_tensors[name]
    return out


# The same tags are written every measured step: format them once per run.
@functools.lru_cache(maxsize=16384)
def _tensor_tags(root: str, name: str) -> tuple[str, str]:
    """A parameter's two tensor tags: its module (``root`` for the top module's own
    parameters, as the per-module tags) and its name within the module."""
    module, _, tensor = name.rpartition(".")
    fields = {"module": module or "root", "tensor": tensor}
    return _F("lca_tensor").format(root, **fields), _F("lca_tensor_cumulative").format(root, **fields)


@functools.lru_cache(maxsize=4096)
def _module_tags(root: str, module: str) -> tuple[str, str, str, str]:
    """A module's ``lca/layer``, ``layer_cumulative``, ``helped_fraction`` and ``hurt_fraction`` tags."""
    layer, layer_cumulative, helped, hurt = (
        _F(name).format(root, module=module)
        for name in ("lca_layer", "lca_layer_cumulative", "lca_layer_helped", "lca_layer_hurt")
    )
    return layer, layer_cumulative, helped, hurt


@functools.lru_cache(maxsize=4096)
def _layer_skewness_tag(root: str, module: str) -> str:
    return _F("lca_layer_skewness").format(root, module=module)


@functools.lru_cache(maxsize=4096)
def _module_part_tags(root: str, module: str) -> dict[str, str]:
    """``lca/part/<part>/<module>`` of every part."""
    return {part: _F("lca_layer_part").format(root, part=part, module=module) for part in contract.PARTS}


def _lca_run_scalars(record: LCAStepRecord, cumulative_relative_error: float, root: str) -> dict[str, float]:
    """The run-level scalars of one step; the undefined ones (NaN kurtosis, no ΔL) left out."""
    values: dict[str, float | None] = {
        "lca_total": record.total,
        "lca_splits": float(record.splits),
        "lca_helped_fraction": record.counts.helped_fraction,
        "lca_hurt_fraction": record.counts.hurt_fraction,
        "lca_helped_fraction_nonzero": record.counts.helped_fraction_nonzero,
        "lca_excess_kurtosis": _finite(record.moments.excess_kurtosis),
        # frozen or never-reached parameters (A = 0 exactly) pile up at 0 and inflate the all-parameter kurtosis
        "lca_excess_kurtosis_nonzero": _finite(record.moments.over(record.counts.nonzero).excess_kurtosis),
        "lca_skewness": _finite(record.moments.skewness),
        "lca_probe_stochastic": None if record.probe_stochastic is None else float(record.probe_stochastic),
    }
    if record.delta_loss is not None:
        values["lca_delta_loss"] = record.delta_loss
        values["lca_abs_error"] = abs(record.delta_loss - record.total)
        values["lca_cumulative_relative_error"] = _finite(cumulative_relative_error)
    tags = _run_tags(root)
    return {tags[name]: value for name, value in values.items() if value is not None}


@functools.lru_cache(maxsize=256)
def _run_tags(root: str) -> dict[str, str]:
    """Every run-level LCA family's tag under ``root`` (``lca_total`` → ``lca/total``)."""
    return {f.name: f.format(root) for f in contract.families(writer="lca") if not f.fields}


@functools.lru_cache(maxsize=256)
def _part_tags(root: str) -> dict[str, str]:
    """``lca/part/<part>`` of every part."""
    return {part: _F("lca_part").format(root, part=part) for part in contract.PARTS}


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def lca_pooled(moments: Moments, root: str = "lca") -> dict[str, float]:
    """``lca/skewness_pooled`` and ``lca/excess_kurtosis_pooled`` of the run's pooled power
    sums (every allocation of every measured step so far); the undefined ones left out."""
    values = {"lca_skewness_pooled": moments.skewness, "lca_excess_kurtosis_pooled": moments.excess_kurtosis}
    tags = _run_tags(root)
    return {tags[name]: value for name, value in values.items() if math.isfinite(value)}


LCA_CAPPED_STEPS = contract.family("lca_capped_steps").run_metric


def lca_capped(capped_steps: int, root: str = "lca") -> dict[str, float]:
    """``lca/capped_steps``: how many steps so far ``rule="adaptive"`` accepted at
    ``max_intervals`` with their error above the target (cumulative, like ``lca/skipped_steps``)."""
    return {_F("lca_capped_steps").format(root): float(capped_steps)}


def lca_skipped(
    skipped_steps: int, root: str = "lca", *, unmoved: bool = False, delta_loss: bool = True
) -> dict[str, float]:
    """``lca/skipped_steps``: how many steps so far were not measured (cumulative).

    Args:
        skipped_steps: the count so far.
        root: the callback's ``name``.
        unmoved: the skipped update did not move θ (a GradScaler skipped it), so its
            allocation is known to be 0: also write ``lca/total`` = 0 and, when the run
            evaluates the loss after each step (``delta_loss``), ``lca/delta_loss`` = 0.
        delta_loss: whether the run writes ``lca/delta_loss`` (False in the cheap mode).
    """
    out = {_F("lca_skipped_steps").format(root): float(skipped_steps)}
    if unmoved:
        out[_F("lca_total").format(root)] = 0.0
        if delta_loss:
            out[_F("lca_delta_loss").format(root)] = 0.0
    return out


def lca_ablation_corner(data: str, rule: str) -> str:
    """The key of one corner of the three-factor ablation in ``LCAStepRecord.ablation``
    (``probe_simpson``): the ``<data>_<rule>`` field of ``lca/ablation/<data>_<rule>/...``.
    ``data`` is ``batch`` or ``probe``, ``rule`` one of the quadrature rules."""
    return contract.ablation_corner(data, rule)


def lca_part_cumulative(
    cumulative_parts: Mapping[str, float], root: str = "lca", modules: bool | None = None
) -> dict[str, float]:
    """``lca/part_cumulative/<part>`` and ``lca/part_cumulative/<part>/<module>`` from a
    flat mapping keyed ``<part>`` or ``<part>/<module>`` (``modules``: only the per-module
    keys (True), only the all-module ones (False), or both (None))."""
    return {
        _cumulative_part_tag(root, key): value
        for key, value in cumulative_parts.items()
        if modules is None or ("/" in key) == modules
    }


@functools.lru_cache(maxsize=4096)
def _cumulative_part_tag(root: str, key: str) -> str:
    part, _, module = key.partition("/")
    if module:
        return _F("lca_layer_part_cumulative").format(root, part=part, module=module)
    return _F("lca_part_cumulative").format(root, part=part)


def lca_histograms(values: Mapping[str, Any], root: str = "lca") -> dict[str, Any]:
    """``lca/hist/<module>``: each module's allocations (a tensor or a StreamingHistogram)."""
    return {_F("lca_hist").format(root, module=module): tensor for module, tensor in values.items()}


def lca_param_helped(record: LCAStepRecord, root: str = "lca") -> dict[str, Any]:
    """``lca/param_helped_fraction`` and ``lca/param_helped_fraction/<module>``: histograms of
    each parameter's helped fraction over the measured steps so far (``parameter_counts=True``)."""
    if record.param_helped is None:
        return {}
    out = {_F("lca_param_helped").format(root): record.param_helped}
    for module, histogram in record.layer_param_helped.items():
        out[_F("lca_layer_param_helped").format(root, module=module)] = histogram
    return out


# --------------------------------------------------------------------------- NFA


def nfa_scalars(record: NFARecord, root: str = "nfa") -> dict[str, float]:
    """``nfa/<layer>/<metric>`` for every measured metric, and the run's ``nfa/skipped`` count."""
    out = {
        _nfa_metric_tag(root, layer, metric): value
        for layer, metrics in record.metrics.items()
        for metric, value in metrics.items()
    }
    out.update(nfa_skipped(record.skipped, root))
    if record.probe_stochastic is not None:
        out[_F("nfa_probe_stochastic").format(root)] = float(record.probe_stochastic)
    return out


def _nfa_metric_tag(root: str, layer: str, metric: str) -> str:
    """``<root>/<layer>/<metric>`` from the contract's family of ``metric``."""
    family, fields = contract.nfa_metric(metric)
    return family.format(root, layer=layer, **fields)


def nfa_skipped(skipped: int, root: str = "nfa") -> dict[str, float]:
    """The scalar written when a whole measurement is skipped."""
    return {_F("nfa_skipped").format(root): float(skipped)}


def nfa_histograms(record: NFARecord, root: str = "nfa") -> dict[str, Tensor]:
    """``nfa/<layer>/spectrum``: eigenvalues of G compressed to range(W)."""
    return {_F("nfa_spectrum").format(root, layer=layer): spectrum for layer, spectrum in record.spectra.items()}


def nfa_images(record: NFARecord, root: str = "nfa") -> dict[str, dict[str, Tensor]]:
    """``nfa/<layer>/matrices``: the matrices to draw side by side (WᵀW, AGOP^α, ...)."""
    return {_F("nfa_matrices").format(root, layer=layer): matrices for layer, matrices in record.matrices.items()}
