"""Read learnscope logs from TensorBoard event files into typed records.

``read_logdir(LOGDIR)`` finds every event file below ``LOGDIR`` (a *run* is a
directory holding event files, as in TensorBoard: ``lightning_logs/version_0``),
reads each with TensorBoard's ``EventAccumulator`` keeping every event (size
guidance 0 for every kind: nothing is sampled away), and groups the tags by the
contract below into :class:`LcaRecords` and :class:`NfaRecords`.

The tag contract (every family's template, kind, unit and meaning) is
:mod:`learnscope.contract`; ``python -m learnscope.contract`` prints it as a table.
Each family is filed into one place of the records (``_FILE_BY_FAMILY`` below):
run-level LCA scalars into ``LcaRecords.<metric>``, per-module ones into
:class:`LcaLayer`, parts into ``parts``/``parts_cumulative``, ablation corners into
:class:`LcaAblation`, NFA metrics into ``NfaLayer.metrics[metric]``, the spectrum and
the matrices into ``NfaLayer.spectrum``/``matrices``. A tag under a learnscope root
that the contract does not know (written by a newer learnscope, say) is kept in
``RunRecords.unrecognised_tags`` and named in one warning per read; tags outside
every root (``epoch``, the user's own metrics) go to ``RunRecords.other_scalars``.

Several event files in one run (a resumed run) are spliced per tag in file-name
order: when a later file logs a step that an earlier file already reached, the
earlier file's points from that step on are dropped (TensorBoard's own rule for
restarts), so a resumed run is not double counted.

``lca`` and ``nfa`` stand for each callback's ``name`` (its tag root): a run with
several callbacks of one kind is read as several sections (``read_run_sections``).

Layers keep the order in which their tags were first written (model order, not
alphabetical: ``net.2`` before ``net.10``).
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

from learnscope import contract

__all__ = [
    "LCA_RUN_METRICS",
    "Histogram",
    "HistogramSeries",
    "ImageSeries",
    "LcaAblation",
    "LcaLayer",
    "LcaRecords",
    "LogdirRecords",
    "NfaLayer",
    "NfaRecords",
    "ParsedTag",
    "RunRecords",
    "ScalarSeries",
    "TensorSeries",
    "find_runs",
    "parse_tag",
    "read_logdir",
    "read_run",
    "read_run_sections",
]

#: the run-level LCA scalars (``lca/<metric>``, each an attribute of LcaRecords), from the contract
LCA_RUN_METRICS: tuple[str, ...] = contract.LCA_RUN_METRICS

# Keep every event of every kind (0 = no reservoir sampling).
_KEEP_EVERYTHING = {
    event_accumulator.COMPRESSED_HISTOGRAMS: 0,
    event_accumulator.IMAGES: 0,
    event_accumulator.AUDIO: 0,
    event_accumulator.SCALARS: 0,
    event_accumulator.HISTOGRAMS: 0,
    event_accumulator.TENSORS: 0,
}


# ----------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ScalarSeries:
    """One scalar tag over steps (sorted by step as written)."""

    tag: str
    steps: np.ndarray  # int64
    values: np.ndarray  # float64
    wall_times: np.ndarray  # float64, seconds

    def __len__(self) -> int:
        return len(self.steps)

    def last(self) -> float:
        """The value at the last logged step (NaN for an empty series)."""
        return float(self.values[-1]) if len(self.values) else float("nan")

    def sum(self) -> float:
        return float(np.sum(self.values))


@dataclass(frozen=True, eq=False)
class TensorSeries:
    """One tensor-summary tag over steps: ``values[t]`` is the tensor at ``steps[t]``
    (``lca/unit/<m>``: shape (T, units))."""

    tag: str
    steps: np.ndarray  # int64
    values: np.ndarray  # float64, (T, *shape)
    wall_times: np.ndarray  # float64, seconds

    def __len__(self) -> int:
        return len(self.steps)


@dataclass(frozen=True, eq=False)
class Histogram:
    """One histogram at one step, in TensorBoard's bucket form: bucket ``i``
    counts values in ``(bucket_limits[i-1], bucket_limits[i]]``."""

    step: int
    wall_time: float
    bucket_limits: np.ndarray
    bucket_counts: np.ndarray
    min: float
    max: float
    num: float
    sum: float
    sum_squares: float


@dataclass(frozen=True, eq=False)
class HistogramSeries:
    tag: str
    histograms: tuple[Histogram, ...]

    @property
    def steps(self) -> np.ndarray:
        return np.array([h.step for h in self.histograms], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.histograms)


@dataclass(frozen=True, eq=False)
class ImageSeries:
    tag: str
    steps: np.ndarray
    encoded_images: tuple[bytes, ...]  # PNG bytes as written
    widths: np.ndarray
    heights: np.ndarray

    def __len__(self) -> int:
        return len(self.steps)


@dataclass(eq=False)
class LcaLayer:
    """The LCA tags of one module."""

    name: str
    allocation: ScalarSeries | None = None  # lca/layer/<m>: Σ_i∈layer A_t,i per step
    cumulative: ScalarSeries | None = None  # lca/layer_cumulative/<m>
    helped_fraction: ScalarSeries | None = None
    hurt_fraction: ScalarSeries | None = None
    parts: dict[str, ScalarSeries] = field(default_factory=dict)
    parts_cumulative: dict[str, ScalarSeries] = field(default_factory=dict)
    histogram: HistogramSeries | None = None  # lca/hist/<m>
    skewness: ScalarSeries | None = None  # lca/skewness/<m>
    param_helped_fraction: HistogramSeries | None = None  # lca/param_helped_fraction/<m>
    #: lca/unit/<m>: per output unit, values (T, units); per step or per logging window
    units: TensorSeries | None = None
    #: tensor_series=True: lca/tensor/<m>/<tensor> and lca/tensor_cumulative/<m>/<tensor>, by tensor name
    tensors: dict[str, ScalarSeries] = field(default_factory=dict)
    tensors_cumulative: dict[str, ScalarSeries] = field(default_factory=dict)


@dataclass(eq=False)
class LcaAblation:
    """One ``lca/ablation/<data>_<rule>`` family (loss × quadrature rule)."""

    name: str  # "<data>_<rule>"
    data: str
    rule: str
    helped_fraction: ScalarSeries | None = None
    parts: dict[str, ScalarSeries] = field(default_factory=dict)


@dataclass(eq=False)
class LcaRecords:
    """Everything a run logged under ``lca/``."""

    total: ScalarSeries | None = None
    delta_loss: ScalarSeries | None = None
    abs_error: ScalarSeries | None = None
    splits: ScalarSeries | None = None
    helped_fraction: ScalarSeries | None = None
    hurt_fraction: ScalarSeries | None = None
    helped_fraction_nonzero: ScalarSeries | None = None  # over parameters with A != 0
    excess_kurtosis: ScalarSeries | None = None
    excess_kurtosis_nonzero: ScalarSeries | None = None  # over parameters with A != 0
    skewness: ScalarSeries | None = None  # per step, over every parameter
    excess_kurtosis_pooled: ScalarSeries | None = None  # every allocation of the measured steps so far
    skewness_pooled: ScalarSeries | None = None  # the same
    #: per-parameter helped fraction over training (parameter_counts=True), all parameters
    param_helped_fraction: HistogramSeries | None = None
    cumulative_relative_error: ScalarSeries | None = None
    skipped_steps: ScalarSeries | None = None
    probe_stochastic: ScalarSeries | None = None  # the determinism self-check (first measured step)
    capped_steps: ScalarSeries | None = None  # adaptive steps accepted at max_intervals above tolerance
    #: measured steps in each point of the per-layer series (absent: one per point, per_step_series=True
    #: or a run written before the series were windowed)
    window_steps: ScalarSeries | None = None
    #: kept for compatibility and always empty: a run-level tag the contract does not
    #: know is in ``RunRecords.unrecognised_tags`` (with a warning) instead
    extra: dict[str, ScalarSeries] = field(default_factory=dict)
    layers: dict[str, LcaLayer] = field(default_factory=dict)
    parts: dict[str, ScalarSeries] = field(default_factory=dict)
    parts_cumulative: dict[str, ScalarSeries] = field(default_factory=dict)
    ablations: dict[str, LcaAblation] = field(default_factory=dict)

    def layer(self, name: str) -> LcaLayer:
        if name not in self.layers:
            self.layers[name] = LcaLayer(name)
        return self.layers[name]


@dataclass(eq=False)
class NfaLayer:
    """The NFA tags of one layer."""

    name: str
    metrics: dict[str, ScalarSeries] = field(default_factory=dict)
    spectrum: HistogramSeries | None = None
    matrices: ImageSeries | None = None


@dataclass(eq=False)
class NfaRecords:
    layers: dict[str, NfaLayer] = field(default_factory=dict)
    skipped: ScalarSeries | None = None
    probe_stochastic: ScalarSeries | None = None  # the determinism self-check (first measurement)

    def layer(self, name: str) -> NfaLayer:
        if name not in self.layers:
            self.layers[name] = NfaLayer(name)
        return self.layers[name]


@dataclass(eq=False)
class RunRecords:
    """One run: the event files of one directory."""

    name: str  # path relative to the log directory ("." for the directory itself)
    path: Path
    event_files: tuple[Path, ...]
    lca: LcaRecords | None = None
    nfa: NfaRecords | None = None
    other_scalars: dict[str, ScalarSeries] = field(default_factory=dict)
    unrecognised_tags: list[str] = field(default_factory=list)
    #: the callbacks' ``name`` (tag roots) this record holds: ``("lca", "nfa")`` by default
    roots: tuple[str, ...] = ()

    @property
    def has_learnscope_data(self) -> bool:
        return self.lca is not None or self.nfa is not None


@dataclass(eq=False)
class LogdirRecords:
    logdir: Path
    runs: dict[str, RunRecords]

    @property
    def learnscope_runs(self) -> dict[str, RunRecords]:
        return {name: run for name, run in self.runs.items() if run.has_learnscope_data}


# ----------------------------------------------------------------------------
# Tag contract
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ParsedTag:
    """What a learnscope tag names. ``family`` is the contract family's name, except
    that every run-level LCA scalar is ``lca_run`` and every per-layer NFA scalar
    ``nfa_metric`` (their ``metric`` says which); the other fields are set where the
    tag carries them (``layer`` is the module or layer name)."""

    family: str
    layer: str | None = None
    metric: str | None = None
    part: str | None = None
    unit: int | None = None
    ablation: str | None = None
    data: str | None = None
    rule: str | None = None


def _group_name(family: contract.TagFamily) -> str:
    if family.writer == "lca" and family.run_metric is not None:
        return "lca_run"
    if family.writer == "nfa" and family.kind == "scalar" and "layer" in family.fields:
        return "nfa_metric"
    return family.name


def parse_tag(tag: str, roots: Mapping[str, str] | None = None) -> ParsedTag | None:
    """The learnscope meaning of ``tag``, or None when it is not one of ours.

    ``roots``: ``{root: "lca" | "nfa"}`` of the run's callbacks (default ``lca`` and ``nfa``).

    >>> tag = parse_tag("lca/part/weight_decay/net.0")
    >>> tag.family, tag.part, tag.layer
    ('lca_layer_part', 'weight_decay', 'net.0')
    >>> parse_tag("nfa/blocks.1.mlp/pearson_a0.5").metric
    'pearson_a0.5'
    """
    match = contract.parse_tag(tag, roots)
    if match is None:
        return None
    group, fields = _group_name(match.family), match.fields
    data, rule = fields.get("data"), fields.get("rule")
    return ParsedTag(
        family=group,
        layer=fields.get("module", fields.get("layer")),
        metric=match.leaf if group in ("lca_run", "nfa_metric") else None,
        part=fields.get("part"),
        unit=int(fields["unit"]) if "unit" in fields else None,
        ablation=None if data is None or rule is None else contract.ablation_corner(data, rule),
        data=data,
        rule=rule,
    )


# ----------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------


def _is_event_file(name: str) -> bool:
    # TensorBoard's own criterion (io_wrapper.IsTensorFlowEventsFile).
    return "tfevents" in name


def _creation_order(path: Path) -> tuple[int, list[int | str], str]:
    """Sort key of an event file in creation order: its name is
    ``events.out.tfevents.<unix time>.<host>.<pid>.<writer counter><suffix>``, so compare
    the time as a number, then the rest with its numbers as numbers (a plain name sort
    puts writer 10 before writer 9 when both were created in the same second)."""
    found = re.match(r"events\.out\.tfevents\.(\d+)\.(.*)", path.name)
    if found is None:
        return (0, [], path.name)
    rest = [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", found.group(2))]
    return (int(found.group(1)), rest, path.name)


def find_runs(logdir: str | os.PathLike[str]) -> dict[str, list[Path]]:
    """Event files below ``logdir`` grouped by run directory (name relative to
    ``logdir``, ``"."`` for ``logdir`` itself), files in creation order (the time,
    then the writer counter, in their names). ``logdir`` may also be one event file."""
    root = Path(logdir)
    if root.is_file():
        return {root.name: [root]} if _is_event_file(root.name) else {}
    runs: dict[str, list[Path]] = {}
    for directory, _, files in sorted(os.walk(root)):
        event_files = sorted((Path(directory) / f for f in files if _is_event_file(f)), key=_creation_order)
        if event_files:
            runs[Path(directory).relative_to(root).as_posix()] = event_files
    return dict(sorted(runs.items()))


@dataclass
class _RawRun:
    """Tag → events of each kind, spliced across the run's files."""

    scalars: dict[str, list[tuple[int, float, float]]] = field(default_factory=dict)  # (step, wall, value)
    histograms: dict[str, list[Histogram]] = field(default_factory=dict)
    images: dict[str, list[tuple[int, bytes, int, int]]] = field(default_factory=dict)
    tensors: dict[str, list[tuple[int, float, np.ndarray]]] = field(default_factory=dict)  # (step, wall, array)


def _splice(earlier: list, later: list, step_of, restart: int | None = None) -> list:
    """Append ``later`` to ``earlier``, dropping the earlier points that the
    later file logs again (a resumed run restarts from its checkpoint step):
    those from ``restart`` on (default: the later file's first step of this tag)."""
    if not earlier:
        return list(later)
    if not later:
        return earlier
    restart = step_of(later[0]) if restart is None else min(restart, step_of(later[0]))
    return [e for e in earlier if step_of(e) < restart] + list(later)


def _first_step(raw: _RawRun) -> int | None:
    """The earliest step of any tag in one file: where a resumed run restarted. A windowed
    series' first point comes at the end of its first window, after the restart: a point
    the earlier file wrote between the two (a window closed by an exception) is dropped."""
    firsts = [events[0][0] for table in (raw.scalars, raw.images, raw.tensors) for events in table.values() if events]
    firsts += [histograms[0].step for histograms in raw.histograms.values() if histograms]
    return min(firsts, default=None)


def _histogram_from_value(step: int, wall_time: float, value) -> Histogram:
    return Histogram(
        step=int(step),
        wall_time=float(wall_time),
        bucket_limits=np.asarray(value.bucket_limit, dtype=np.float64),
        bucket_counts=np.asarray(value.bucket, dtype=np.float64),
        min=float(value.min),
        max=float(value.max),
        num=float(value.num),
        sum=float(value.sum),
        sum_squares=float(value.sum_squares),
    )


def _histogram_from_tensor(step: int, wall_time: float, array: np.ndarray) -> Histogram:
    # New-style (tf.summary v2) histograms: rows of [left edge, right edge, count].
    array = np.asarray(array, dtype=np.float64).reshape(-1, 3)
    left, right, counts = array[:, 0], array[:, 1], array[:, 2]
    centres = (left + right) / 2
    return Histogram(
        step=int(step),
        wall_time=float(wall_time),
        bucket_limits=right,
        bucket_counts=counts,
        min=float(left[0]) if len(left) else float("nan"),
        max=float(right[-1]) if len(right) else float("nan"),
        num=float(counts.sum()),
        sum=float((centres * counts).sum()),
        sum_squares=float((centres**2 * counts).sum()),
    )


def _read_event_file(path: Path) -> _RawRun:
    accumulator = event_accumulator.EventAccumulator(str(path), size_guidance=_KEEP_EVERYTHING)
    accumulator.Reload()
    tags = accumulator.Tags()
    raw = _RawRun()
    for tag in tags[event_accumulator.SCALARS]:
        raw.scalars[tag] = [(int(e.step), float(e.wall_time), float(e.value)) for e in accumulator.Scalars(tag)]
    for tag in tags[event_accumulator.HISTOGRAMS]:
        raw.histograms[tag] = [
            _histogram_from_value(e.step, e.wall_time, e.histogram_value) for e in accumulator.Histograms(tag)
        ]
    for tag in tags[event_accumulator.IMAGES]:
        raw.images[tag] = [
            (int(e.step), e.encoded_image_string, int(e.width), int(e.height)) for e in accumulator.Images(tag)
        ]
    _read_tensor_summaries(accumulator, tags[event_accumulator.TENSORS], raw)
    return raw


def _read_tensor_summaries(accumulator: event_accumulator.EventAccumulator, tags: list[str], raw: _RawRun) -> None:
    """Scalars and histograms written as tensors (new-style summaries), and learnscope's own
    tensor summaries (``plugin_name`` :data:`learnscope.contract.TENSOR_PLUGIN`)."""
    for tag in tags:
        plugin = accumulator.SummaryMetadata(tag).plugin_data.plugin_name
        if plugin == "scalars" and tag not in raw.scalars:
            raw.scalars[tag] = [
                (int(e.step), float(e.wall_time), float(tensor_util.make_ndarray(e.tensor_proto).item()))
                for e in accumulator.Tensors(tag)
            ]
        elif plugin == "histograms" and tag not in raw.histograms:
            raw.histograms[tag] = [
                _histogram_from_tensor(e.step, e.wall_time, tensor_util.make_ndarray(e.tensor_proto))
                for e in accumulator.Tensors(tag)
            ]
        elif plugin == contract.TENSOR_PLUGIN:
            raw.tensors[tag] = [
                (int(e.step), float(e.wall_time), tensor_util.make_ndarray(e.tensor_proto))
                for e in accumulator.Tensors(tag)
            ]


def _merge_raw(runs: Iterable[_RawRun]) -> _RawRun:
    merged = _RawRun()
    for raw in runs:
        restart = _first_step(raw)
        for tag, scalars in raw.scalars.items():
            merged.scalars[tag] = _splice(merged.scalars.get(tag, []), scalars, lambda e: e[0], restart)
        for tag, histograms in raw.histograms.items():
            merged.histograms[tag] = _splice(merged.histograms.get(tag, []), histograms, lambda h: h.step, restart)
        for tag, images in raw.images.items():
            merged.images[tag] = _splice(merged.images.get(tag, []), images, lambda e: e[0], restart)
        for tag, tensors in raw.tensors.items():
            merged.tensors[tag] = _splice(merged.tensors.get(tag, []), tensors, lambda e: e[0], restart)
    return merged


def _scalar_series(tag: str, events: list[tuple[int, float, float]]) -> ScalarSeries:
    return ScalarSeries(
        tag=tag,
        steps=np.array([e[0] for e in events], dtype=np.int64),
        values=np.array([e[2] for e in events], dtype=np.float64),
        wall_times=np.array([e[1] for e in events], dtype=np.float64),
    )


def _image_series(tag: str, images: list[tuple[int, bytes, int, int]]) -> ImageSeries:
    return ImageSeries(
        tag=tag,
        steps=np.array([e[0] for e in images], dtype=np.int64),
        encoded_images=tuple(e[1] for e in images),
        widths=np.array([e[2] for e in images], dtype=np.int64),
        heights=np.array([e[3] for e in images], dtype=np.int64),
    )


def _tensor_series(tag: str, events: list[tuple[int, float, np.ndarray]]) -> TensorSeries:
    """The tag's tensors stacked over steps (a step whose shape differs from the first's is dropped)."""
    kept = [e for e in events if np.shape(e[2]) == np.shape(events[0][2])] if events else []
    return TensorSeries(
        tag=tag,
        steps=np.array([e[0] for e in kept], dtype=np.int64),
        values=np.array([np.asarray(e[2], dtype=np.float64) for e in kept], dtype=np.float64),
        wall_times=np.array([e[1] for e in kept], dtype=np.float64),
    )


_SERIES_OF_KIND: dict[str, Callable[[str, list], object]] = {
    "scalar": _scalar_series,
    "tensor": _tensor_series,
    "histogram": lambda tag, histograms: HistogramSeries(tag=tag, histograms=tuple(histograms)),
    "image": _image_series,
}


@dataclass
class _Section:
    """The records of one section while its tags are filed."""

    lca: LcaRecords = field(default_factory=LcaRecords)
    nfa: NfaRecords = field(default_factory=NfaRecords)
    writers: set[str] = field(default_factory=set)  # "lca", "nfa": which records got a tag


_Filer = Callable[[_Section, contract.TagMatch, object], None]


def _file_run_metric(section: _Section, match: contract.TagMatch, series) -> None:
    records = section.lca if match.family.writer == "lca" else section.nfa
    assert match.family.run_metric is not None  # filed here only for the families with a run metric
    setattr(records, match.family.run_metric, series)


_LCA_LAYER_ATTRIBUTES = {
    "lca_layer": "allocation",
    "lca_layer_cumulative": "cumulative",
    "lca_layer_helped": "helped_fraction",
    "lca_layer_hurt": "hurt_fraction",
    "lca_hist": "histogram",
    "lca_layer_skewness": "skewness",
    "lca_layer_param_helped": "param_helped_fraction",
}


def _file_lca_layer(section: _Section, match: contract.TagMatch, series) -> None:
    setattr(section.lca.layer(match.fields["module"]), _LCA_LAYER_ATTRIBUTES[match.family.name], series)


def _file_lca_part(section: _Section, match: contract.TagMatch, series) -> None:
    cumulative = match.family.name.endswith("_cumulative")
    if "module" in match.fields:
        layer = section.lca.layer(match.fields["module"])
        table = layer.parts_cumulative if cumulative else layer.parts
    else:
        table = section.lca.parts_cumulative if cumulative else section.lca.parts
    table[match.fields["part"]] = series


def _file_lca_ablation(section: _Section, match: contract.TagMatch, series) -> None:
    data, rule = match.fields["data"], match.fields["rule"]
    name = contract.ablation_corner(data, rule)
    ablation = section.lca.ablations.setdefault(name, LcaAblation(name=name, data=data, rule=rule))
    if "part" in match.fields:
        ablation.parts[match.fields["part"]] = series
    else:
        ablation.helped_fraction = series


def _file_lca_tensor(section: _Section, match: contract.TagMatch, series) -> None:
    layer = section.lca.layer(match.fields["module"])
    table = layer.tensors_cumulative if match.family.name.endswith("_cumulative") else layer.tensors
    table[match.fields["tensor"]] = series


def _file_lca_unit(section: _Section, match: contract.TagMatch, series) -> None:
    section.lca.layer(match.fields["module"]).units = series


def _file_nfa_layer(section: _Section, match: contract.TagMatch, series) -> None:
    layer = section.nfa.layer(match.fields["layer"])
    if match.family.kind == "histogram":
        layer.spectrum = series
    elif match.family.kind == "image":
        layer.matrices = series
    else:
        layer.metrics[match.leaf] = series


# Where each contract family goes in the records.
_FILE_BY_FAMILY: dict[str, _Filer] = {
    **{name: _file_lca_layer for name in _LCA_LAYER_ATTRIBUTES},
    **dict.fromkeys(("lca_part", "lca_layer_part", "lca_part_cumulative", "lca_layer_part_cumulative"), _file_lca_part),
    **dict.fromkeys(("lca_ablation_helped", "lca_ablation_part"), _file_lca_ablation),
    "lca_unit": _file_lca_unit,
    **dict.fromkeys(("lca_tensor", "lca_tensor_cumulative"), _file_lca_tensor),
    **{f.name: _file_run_metric for f in contract.FAMILIES if f.run_metric is not None},
    **{f.name: _file_nfa_layer for f in contract.families("nfa") if "layer" in f.fields},
}
if set(_FILE_BY_FAMILY) != {f.name for f in contract.FAMILIES}:  # pragma: no cover - a new family needs a place
    raise RuntimeError(
        f"report.reader files no records for {sorted({f.name for f in contract.FAMILIES} - set(_FILE_BY_FAMILY))}"
    )


def _group(
    name: str,
    path: Path,
    event_files: tuple[Path, ...],
    raw: _RawRun,
    roots: Mapping[str, str | None],
    ignored: Collection[str] = frozenset(),
    keep_other: bool = True,
) -> RunRecords:
    """The records of one section: the tags under ``roots`` (``{root: writer}``; a
    root mapped to None is a learnscope root of no callback here: its tags are
    unrecognised), and with ``keep_other`` the scalars of no root in ``ignored``."""
    run = RunRecords(name=name, path=path, event_files=event_files)
    section = _Section()
    tables = (("scalar", raw.scalars), ("histogram", raw.histograms), ("image", raw.images), ("tensor", raw.tensors))
    for kind, table in tables:
        for tag, events in table.items():
            if _root_of(tag) not in roots:
                continue
            match = contract.parse_tag(tag, roots)
            if match is None or match.family.kind != kind:
                run.unrecognised_tags.append(tag)
                continue
            _FILE_BY_FAMILY[match.family.name](section, match, _SERIES_OF_KIND[kind](tag, events))
            section.writers.add(match.family.writer)
    if keep_other:
        for tag, scalars in raw.scalars.items():
            if _root_of(tag) not in roots and _root_of(tag) not in ignored:
                run.other_scalars[tag] = _scalar_series(tag, scalars)
    run.lca = section.lca if "lca" in section.writers else None
    run.nfa = section.nfa if "nfa" in section.writers else None
    return run


def _root_of(tag: str) -> str | None:
    return tag.partition("/")[0] if "/" in tag else None


def _progress_bar(total_bytes: int, enabled: bool | None):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - lightning depends on tqdm
        return None
    # enabled=None: tqdm decides (on when stderr is a terminal).
    return tqdm(
        total=total_bytes,
        unit="B",
        unit_scale=True,
        desc="reading event files",
        file=sys.stderr,
        disable=None if enabled is None else not enabled,
        leave=False,
    )


def read_run(name: str, path: Path, event_files: list[Path], progress=None) -> RunRecords:
    """Read one run's event files (in order) into records (its first section; see
    :func:`read_run_sections` for runs with several callbacks of one kind)."""
    return read_run_sections(name, path, event_files, progress)[0]


def read_run_sections(name: str, path: Path, event_files: list[Path], progress=None) -> list[RunRecords]:
    """Read one run's event files into one record per *section*.

    Callbacks write under their ``name`` (``lca`` and ``nfa`` by default). A run whose
    callbacks all kept distinct kinds is one section; each further callback of a kind
    (``LossChangeAllocation(name="lca_val")``) is a section of its own, named
    ``"<run> [<name>]"``, so its steps and values are never mixed with another's. A
    root is an LCA section when it logged ``<root>/total`` (or ``<root>/splits``) and an
    NFA section when it logged ``<root>/skipped``. Warns once, naming them, when some
    tags under these roots are not in the tag contract.
    """
    sections = _read_sections(name, path, event_files, progress)
    _warn_unrecognised(sections)
    return sections


def _read_sections(name: str, path: Path, event_files: list[Path], progress=None) -> list[RunRecords]:
    raws = []
    for event_file in event_files:
        raws.append(_read_event_file(event_file))
        if progress is not None:
            progress.update(event_file.stat().st_size)
    raw = _merge_raw(raws)
    lca_roots, nfa_roots = contract.callback_roots(raw.scalars)
    others = [(root, "lca") for root in lca_roots[1:]] + [(root, "nfa") for root in nfa_roots[1:]]
    main = contract.main_section_roots(lca_roots, nfa_roots)
    files = tuple(event_files)
    sections = [_group(name, path, files, raw, main, ignored={root for root, _ in others})]
    sections[0].roots = tuple((lca_roots[:1] or ["lca"]) + (nfa_roots[:1] or ["nfa"]))
    for root, writer in others:
        section = _group(f"{name} [{root}]", path, files, raw, {root: writer}, keep_other=False)
        section.roots = (root,)
        sections.append(section)
    return sections


def _warn_unrecognised(sections: Iterable[RunRecords]) -> None:
    """One warning naming the tags under a learnscope root that the contract does not know."""
    unknown = list(dict.fromkeys(tag for section in sections for tag in section.unrecognised_tags))
    if not unknown:
        return
    shown = ", ".join(unknown[:10]) + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
    warnings.warn(
        f"learnscope report: {len(unknown)} tag(s) under a learnscope tag root are not in the tag contract "
        f"(learnscope.contract) and were not read: {shown}. They are kept in RunRecords.unrecognised_tags; "
        "a newer learnscope may have written them.",
        stacklevel=3,
    )


def read_logdir(logdir: str | os.PathLike[str], progress: bool | None = None) -> LogdirRecords:
    """Read every run below ``logdir``.

    Args:
        logdir: a directory (searched recursively) or one event file.
        progress: show a tqdm progress bar on stderr (bytes read); ``None``
            shows it only when stderr is a terminal.

    Returns:
        :class:`LogdirRecords` with one :class:`RunRecords` per run directory,
        including runs with no learnscope data (``LogdirRecords.learnscope_runs``
        filters them).

    Raises:
        FileNotFoundError: ``logdir`` does not exist.
    """
    root = Path(logdir)
    if not root.exists():
        raise FileNotFoundError(f"log directory {str(root)!r} does not exist")
    found = find_runs(root)
    total_bytes = sum(f.stat().st_size for files in found.values() for f in files)
    bar = _progress_bar(total_bytes, progress) if found else None
    try:
        runs = {
            section.name: section
            for name, files in found.items()
            for section in _read_sections(name, root / name if root.is_dir() else root, files, bar)
        }
    finally:
        if bar is not None:
            bar.close()
    _warn_unrecognised(runs.values())
    return LogdirRecords(logdir=root, runs=runs)
