"""Read learnscope logs from TensorBoard event files into typed records.

``read_logdir(LOGDIR)`` finds every event file below ``LOGDIR`` (a *run* is a
directory holding event files, as in TensorBoard: ``lightning_logs/version_0``),
reads each with TensorBoard's ``EventAccumulator`` keeping every event (size
guidance 0 for every kind: nothing is sampled away), and groups the tags by the
contract below into :class:`LcaRecords` and :class:`NfaRecords`.

Tag contract (``<m>``/``<layer>`` is a module's qualified name such as ``net.0``;
module names never contain ``/``, so tags are parsed by anchored patterns over
``/``-separated fields, and names with dots or digits are safe):

=============================================  ==========  =========================
tag                                            kind        record
=============================================  ==========  =========================
``lca/<metric>``                               scalar      ``LcaRecords.<metric>``
  metric ∈ total, delta_loss, abs_error, splits, helped_fraction, hurt_fraction,
  helped_fraction_nonzero, excess_kurtosis, excess_kurtosis_nonzero, cumulative_relative_error,
  skipped_steps, probe_stochastic, capped_steps; any other ``lca/<name>`` goes to ``LcaRecords.extra[name]``
``lca/layer/<m>``                              scalar      ``LcaLayer.allocation``
``lca/layer_cumulative/<m>``                   scalar      ``LcaLayer.cumulative``
``lca/helped_fraction/<m>``                    scalar      ``LcaLayer.helped_fraction``
``lca/hurt_fraction/<m>``                      scalar      ``LcaLayer.hurt_fraction``
``lca/hist/<m>``                               histogram   ``LcaLayer.histogram``
``lca/part/<part>``                            scalar      ``LcaRecords.parts[part]``
``lca/part/<part>/<m>``                        scalar      ``LcaLayer.parts[part]``
``lca/part_cumulative/<part>``                 scalar      ``LcaRecords.parts_cumulative``
``lca/part_cumulative/<part>/<m>``             scalar      ``LcaLayer.parts_cumulative``
``lca/ablation/<data>_<rule>/helped_fraction`` scalar      ``LcaAblation.helped_fraction``
``lca/ablation/<data>_<rule>/part/<part>``     scalar      ``LcaAblation.parts[part]``
  data ∈ batch, probe (split at the first ``_``: ``probe_first_order``)
``lca/unit/<m>/<unit index>``                  scalar      ``LcaLayer.units[index]``
``nfa/skipped``                                scalar      ``NfaRecords.skipped``
``nfa/probe_stochastic``                       scalar      ``NfaRecords.probe_stochastic``
``nfa/<layer>/<metric>``                       scalar      ``NfaLayer.metrics[metric]``
``nfa/<layer>/spectrum``                       histogram   ``NfaLayer.spectrum``
``nfa/<layer>/matrices``                       image       ``NfaLayer.matrices``
=============================================  ==========  =========================

Part names and NFA metric names are not checked against a list, so new ones
parse. Any other ``lca/`` or ``nfa/`` tag is kept in
``RunRecords.unrecognised_tags``; tags outside both families (``epoch``, the
user's own metrics) in ``RunRecords.other_scalars``.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

__all__ = [
    "ScalarSeries",
    "Histogram",
    "HistogramSeries",
    "ImageSeries",
    "LcaLayer",
    "LcaAblation",
    "LcaRecords",
    "NfaLayer",
    "NfaRecords",
    "RunRecords",
    "LogdirRecords",
    "ParsedTag",
    "LCA_RUN_METRICS",
    "parse_tag",
    "find_runs",
    "read_run",
    "read_run_sections",
    "read_logdir",
]

LCA_RUN_METRICS = (
    "total",
    "delta_loss",
    "abs_error",
    "splits",
    "helped_fraction",
    "hurt_fraction",
    "helped_fraction_nonzero",
    "excess_kurtosis",
    "excess_kurtosis_nonzero",
    "cumulative_relative_error",
    "skipped_steps",
    "probe_stochastic",
    "capped_steps",
)

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
    units: dict[int, ScalarSeries] = field(default_factory=dict)  # lca/unit/<m>/<i>


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
    cumulative_relative_error: ScalarSeries | None = None
    skipped_steps: ScalarSeries | None = None
    probe_stochastic: ScalarSeries | None = None  # the determinism self-check (first measured step)
    capped_steps: ScalarSeries | None = None  # adaptive steps accepted at max_intervals above tolerance
    extra: dict[str, ScalarSeries] = field(default_factory=dict)  # other lca/<name> run-level tags
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
    """What a learnscope tag names. ``family`` is one of the keys of
    ``_PATTERNS``; the other fields are set where the tag carries them."""

    family: str
    layer: str | None = None
    metric: str | None = None
    part: str | None = None
    unit: int | None = None
    ablation: str | None = None
    data: str | None = None
    rule: str | None = None


_NAME = r"[^/]+"
_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (family, re.compile(pattern))
    for family, pattern in (
        ("lca_run", rf"lca/(?P<metric>{'|'.join(LCA_RUN_METRICS)})"),
        ("lca_layer", rf"lca/layer/(?P<layer>{_NAME})"),
        ("lca_layer_cumulative", rf"lca/layer_cumulative/(?P<layer>{_NAME})"),
        ("lca_layer_helped", rf"lca/helped_fraction/(?P<layer>{_NAME})"),
        ("lca_layer_hurt", rf"lca/hurt_fraction/(?P<layer>{_NAME})"),
        ("lca_hist", rf"lca/hist/(?P<layer>{_NAME})"),
        ("lca_part", rf"lca/part/(?P<part>{_NAME})"),
        ("lca_layer_part", rf"lca/part/(?P<part>{_NAME})/(?P<layer>{_NAME})"),
        ("lca_part_cumulative", rf"lca/part_cumulative/(?P<part>{_NAME})"),
        ("lca_layer_part_cumulative", rf"lca/part_cumulative/(?P<part>{_NAME})/(?P<layer>{_NAME})"),
        ("lca_ablation_helped", r"lca/ablation/(?P<ablation>(?P<data>batch|probe)_(?P<rule>[^/]+))/helped_fraction"),
        (
            "lca_ablation_part",
            rf"lca/ablation/(?P<ablation>(?P<data>batch|probe)_(?P<rule>[^/]+))/part/(?P<part>{_NAME})",
        ),
        ("lca_unit", rf"lca/unit/(?P<layer>{_NAME})/(?P<unit>\d+)"),
        ("lca_run_extra", rf"lca/(?P<metric>{_NAME})"),
        ("nfa_skipped", r"nfa/skipped"),
        ("nfa_probe_stochastic", r"nfa/probe_stochastic"),
        ("nfa_spectrum", rf"nfa/(?P<layer>{_NAME})/spectrum"),
        ("nfa_matrices", rf"nfa/(?P<layer>{_NAME})/matrices"),
        ("nfa_metric", rf"nfa/(?P<layer>{_NAME})/(?P<metric>{_NAME})"),
    )
)
# Which kind of data each family is (spectrum/matrices are checked before the
# generic nfa_metric pattern, so a scalar named like them is not mistaken).
_HISTOGRAM_FAMILIES = {"lca_hist", "nfa_spectrum"}
_IMAGE_FAMILIES = {"nfa_matrices"}


def parse_tag(tag: str) -> ParsedTag | None:
    """The learnscope meaning of ``tag``, or None when it is not one of ours.

    >>> tag = parse_tag("lca/part/weight_decay/net.0")
    >>> tag.family, tag.part, tag.layer
    ('lca_layer_part', 'weight_decay', 'net.0')
    >>> parse_tag("nfa/blocks.1.mlp/pearson_a0.5").metric
    'pearson_a0.5'
    """
    for family, pattern in _PATTERNS:
        match = pattern.fullmatch(tag)
        if match:
            groups = {k: v for k, v in match.groupdict().items() if v is not None}
            if "unit" in groups:
                groups["unit"] = int(groups["unit"])
            return ParsedTag(family=family, **groups)
    return None


# ----------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------


def _is_event_file(name: str) -> bool:
    # TensorBoard's own criterion (io_wrapper.IsTensorFlowEventsFile).
    return "tfevents" in name


def find_runs(logdir: str | os.PathLike[str]) -> dict[str, list[Path]]:
    """Event files below ``logdir`` grouped by run directory (name relative to
    ``logdir``, ``"."`` for ``logdir`` itself), files sorted by name, which
    starts with the creation time. ``logdir`` may also be one event file."""
    root = Path(logdir)
    if root.is_file():
        return {root.name: [root]} if _is_event_file(root.name) else {}
    runs: dict[str, list[Path]] = {}
    for directory, _, files in sorted(os.walk(root)):
        event_files = sorted(Path(directory) / f for f in files if _is_event_file(f))
        if event_files:
            runs[Path(directory).relative_to(root).as_posix()] = event_files
    return dict(sorted(runs.items()))


@dataclass
class _RawRun:
    """Tag → events of each kind, spliced across the run's files."""

    scalars: dict[str, list[tuple[int, float, float]]] = field(default_factory=dict)  # (step, wall, value)
    histograms: dict[str, list[Histogram]] = field(default_factory=dict)
    images: dict[str, list[tuple[int, bytes, int, int]]] = field(default_factory=dict)


def _splice(earlier: list, later: list, step_of) -> list:
    """Append ``later`` to ``earlier``, dropping the earlier points that the
    later file logs again (a resumed run restarts from its checkpoint step)."""
    if not earlier:
        return list(later)
    if not later:
        return earlier
    restart = step_of(later[0])
    return [e for e in earlier if step_of(e) < restart] + list(later)


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
    # Scalars and histograms written as tensors (new-style summaries).
    for tag in tags[event_accumulator.TENSORS]:
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
    return raw


def _merge_raw(runs: Iterable[_RawRun]) -> _RawRun:
    merged = _RawRun()
    for raw in runs:
        for tag, events in raw.scalars.items():
            merged.scalars[tag] = _splice(merged.scalars.get(tag, []), events, lambda e: e[0])
        for tag, events in raw.histograms.items():
            merged.histograms[tag] = _splice(merged.histograms.get(tag, []), events, lambda h: h.step)
        for tag, events in raw.images.items():
            merged.images[tag] = _splice(merged.images.get(tag, []), events, lambda e: e[0])
    return merged


def _scalar_series(tag: str, events: list[tuple[int, float, float]]) -> ScalarSeries:
    return ScalarSeries(
        tag=tag,
        steps=np.array([e[0] for e in events], dtype=np.int64),
        values=np.array([e[2] for e in events], dtype=np.float64),
        wall_times=np.array([e[1] for e in events], dtype=np.float64),
    )


def _group(name: str, path: Path, event_files: tuple[Path, ...], raw: _RawRun) -> RunRecords:
    run = RunRecords(name=name, path=path, event_files=event_files)
    lca = LcaRecords()
    nfa = NfaRecords()
    seen_lca = seen_nfa = False

    def note_unrecognised(tag: str) -> None:
        if tag.startswith(("lca/", "nfa/")):
            run.unrecognised_tags.append(tag)

    for tag, events in raw.scalars.items():
        parsed = parse_tag(tag)
        if parsed is None or parsed.family in _HISTOGRAM_FAMILIES | _IMAGE_FAMILIES:
            if parsed is None and not tag.startswith(("lca/", "nfa/")):
                run.other_scalars[tag] = _scalar_series(tag, events)
            else:
                note_unrecognised(tag)
            continue
        series = _scalar_series(tag, events)
        family = parsed.family
        if family.startswith("lca"):
            seen_lca = True
        else:
            seen_nfa = True
        if family == "lca_run":
            setattr(lca, parsed.metric, series)
        elif family == "lca_run_extra":
            lca.extra[parsed.metric] = series
        elif family == "lca_layer":
            lca.layer(parsed.layer).allocation = series
        elif family == "lca_layer_cumulative":
            lca.layer(parsed.layer).cumulative = series
        elif family == "lca_layer_helped":
            lca.layer(parsed.layer).helped_fraction = series
        elif family == "lca_layer_hurt":
            lca.layer(parsed.layer).hurt_fraction = series
        elif family == "lca_part":
            lca.parts[parsed.part] = series
        elif family == "lca_layer_part":
            lca.layer(parsed.layer).parts[parsed.part] = series
        elif family == "lca_part_cumulative":
            lca.parts_cumulative[parsed.part] = series
        elif family == "lca_layer_part_cumulative":
            lca.layer(parsed.layer).parts_cumulative[parsed.part] = series
        elif family in ("lca_ablation_helped", "lca_ablation_part"):
            ablation = lca.ablations.setdefault(
                parsed.ablation, LcaAblation(name=parsed.ablation, data=parsed.data, rule=parsed.rule)
            )
            if family == "lca_ablation_helped":
                ablation.helped_fraction = series
            else:
                ablation.parts[parsed.part] = series
        elif family == "lca_unit":
            lca.layer(parsed.layer).units[parsed.unit] = series
        elif family == "nfa_skipped":
            nfa.skipped = series
        elif family == "nfa_probe_stochastic":
            nfa.probe_stochastic = series
        elif family == "nfa_metric":
            nfa.layer(parsed.layer).metrics[parsed.metric] = series
        else:  # pragma: no cover - every scalar family is handled above
            raise AssertionError(family)

    for tag, histograms in raw.histograms.items():
        parsed = parse_tag(tag)
        if parsed is None or parsed.family not in _HISTOGRAM_FAMILIES:
            note_unrecognised(tag)
            continue
        series = HistogramSeries(tag=tag, histograms=tuple(histograms))
        if parsed.family == "lca_hist":
            lca.layer(parsed.layer).histogram = series
            seen_lca = True
        else:
            nfa.layer(parsed.layer).spectrum = series
            seen_nfa = True

    for tag, images in raw.images.items():
        parsed = parse_tag(tag)
        if parsed is None or parsed.family not in _IMAGE_FAMILIES:
            note_unrecognised(tag)
            continue
        nfa.layer(parsed.layer).matrices = ImageSeries(
            tag=tag,
            steps=np.array([e[0] for e in images], dtype=np.int64),
            encoded_images=tuple(e[1] for e in images),
            widths=np.array([e[2] for e in images], dtype=np.int64),
            heights=np.array([e[3] for e in images], dtype=np.int64),
        )
        seen_nfa = True

    run.lca = lca if seen_lca else None
    run.nfa = nfa if seen_nfa else None
    return run


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
    root is an LCA section when it logged ``<root>/total`` and an NFA section when it
    logged ``<root>/skipped``.
    """
    raws = []
    for event_file in event_files:
        raws.append(_read_event_file(event_file))
        if progress is not None:
            progress.update(event_file.stat().st_size)
    raw = _merge_raw(raws)
    lca_roots, nfa_roots = _section_roots(raw)
    main = (lca_roots[:1] or ["lca"]) + (nfa_roots[:1] or ["nfa"])
    every_root = set(lca_roots + nfa_roots)
    sections = [_group(name, path, tuple(event_files), _rooted(raw, main[0], main[1], every_root, keep_other=True))]
    sections[0].roots = tuple(main)
    for root, kind in [(r, "lca") for r in lca_roots[1:]] + [(r, "nfa") for r in nfa_roots[1:]]:
        lca_root, nfa_root = (root, None) if kind == "lca" else (None, root)
        section = _group(
            f"{name} [{root}]", path, tuple(event_files), _rooted(raw, lca_root, nfa_root, every_root, keep_other=False)
        )
        section.roots = (root,)
        sections.append(section)
    return sections


def _section_roots(raw: _RawRun) -> tuple[list[str], list[str]]:
    """The LCA and NFA tag roots of a run, the default one first, then in first-written order."""
    firsts = list(dict.fromkeys(tag.split("/", 1)[0] for tag in raw.scalars if "/" in tag))
    lca = [r for r in firsts if f"{r}/total" in raw.scalars or f"{r}/splits" in raw.scalars]
    nfa = [r for r in firsts if f"{r}/skipped" in raw.scalars and r not in lca]
    lca.sort(key=lambda r: r != "lca")
    nfa.sort(key=lambda r: r != "nfa")
    return lca, nfa


def _rooted(
    raw: _RawRun, lca_root: str | None, nfa_root: str | None, every_root: set[str], *, keep_other: bool
) -> _RawRun:
    """The tags of one section with its roots renamed to ``lca``/``nfa`` (the contract's
    patterns), the other sections' tags (``every_root``) left out; ``keep_other``: keep
    tags of no section (the user's own metrics)."""
    rename = {r: kind for r, kind in ((lca_root, "lca"), (nfa_root, "nfa")) if r is not None}
    other_roots = every_root - set(rename)

    def select(table: dict) -> dict:
        out = {}
        for tag, events in table.items():
            root, sep, rest = tag.partition("/")
            if sep and root in rename:
                out[f"{rename[root]}/{rest}"] = events
            elif keep_other and not (sep and root in other_roots) and not (sep and root in ("lca", "nfa")):
                out[tag] = events
        return out

    return _RawRun(scalars=select(raw.scalars), histograms=select(raw.histograms), images=select(raw.images))


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
            for section in read_run_sections(name, root / name if root.is_dir() else root, files, bar)
        }
    finally:
        if bar is not None:
            bar.close()
    return LogdirRecords(logdir=root, runs=runs)
