"""The custom-scalar layout: what TensorBoard reads back, and which tags each
chart picks up."""

from __future__ import annotations

import json
import re

import pytest
from tensorboard import context
from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins import base_plugin
from tensorboard.plugins.custom_scalar import layout_pb2, metadata
from tensorboard.plugins.custom_scalar.custom_scalars_plugin import CustomScalarsPlugin
from torch.utils.tensorboard import SummaryWriter

from learnscope.tensorboard_layout import (
    CATEGORY_LCA,
    CATEGORY_LCA_ABLATION,
    CATEGORY_LCA_HEALTH,
    CATEGORY_LCA_PARTS,
    CATEGORY_NFA,
    LCA_PARTS,
    NFA_METRICS,
    build_layout,
    charts_matching,
    layout_patterns,
    merge_layouts,
    write_layout_once,
)

LAYERS = ("net.0", "encoder.layers.10.fc1", "head")
HELPED_HURT_CHART = "helped / hurt fraction (all parameters; helped among A != 0)"


def _layouts_in_event_file(run_dir) -> list[layout_pb2.Layout]:
    accumulator = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    accumulator.Reload()
    if metadata.CONFIG_SUMMARY_TAG not in accumulator.Tags()["tensors"]:
        return []
    layouts = []
    for event in accumulator.Tensors(metadata.CONFIG_SUMMARY_TAG):
        layout = layout_pb2.Layout()
        layout.ParseFromString(event.tensor_proto.string_val[0])
        layouts.append(layout)
    return layouts


def _layout_tensorboard_shows(logdir) -> dict:
    """The layout as TensorBoard's custom-scalars plugin serves it."""
    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, str(logdir))
    tb_context = base_plugin.TBContext(data_provider=provider, multiplexer=multiplexer, logdir=str(logdir))
    plugin = CustomScalarsPlugin(tb_context)
    shown = plugin.layout_impl(context.RequestContext(), "")
    return json.loads(shown) if isinstance(shown, str) else shown


def _titles(layout: layout_pb2.Layout) -> list[str]:
    return [category.title for category in layout.category]


def test_layout_written_by_a_summary_writer_parses_back_from_the_event_file(tmp_path):
    layout = build_layout(lca=True, nfa=True, lca_ablation=True, nfa_layers=list(LAYERS))
    writer = SummaryWriter(str(tmp_path / "run"))
    assert write_layout_once(writer, layout)
    writer.close()
    (read_back,) = _layouts_in_event_file(tmp_path / "run")
    assert read_back == merge_layouts(layout)
    assert _titles(read_back) == [
        CATEGORY_LCA, CATEGORY_LCA_PARTS, CATEGORY_LCA_HEALTH, CATEGORY_LCA_ABLATION, CATEGORY_NFA
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("tag", "category", "chart"),
    [
        ("lca/layer/encoder.layers.10.fc1", CATEGORY_LCA, "layer LCA per step (negative = helped)"),
        ("lca/layer_cumulative/net.0", CATEGORY_LCA, "layer LCA cumulative"),
        ("lca/helped_fraction/net.0", CATEGORY_LCA, "helped fraction per layer"),
        ("lca/part/momentum/net.0", CATEGORY_LCA_PARTS, "momentum part per layer"),
        ("lca/part_cumulative/weight_decay/head", CATEGORY_LCA_PARTS, "weight_decay part per layer, cumulative"),
        ("lca/part/residual", CATEGORY_LCA_PARTS, "parts, all layers summed"),
        ("lca/part_cumulative/gradient", CATEGORY_LCA_PARTS, "parts cumulative, all layers summed"),
        ("lca/total", CATEGORY_LCA_HEALTH, "total LCA vs actual loss change"),
        ("lca/delta_loss", CATEGORY_LCA_HEALTH, "total LCA vs actual loss change"),
        ("lca/cumulative_relative_error", CATEGORY_LCA_HEALTH, "cumulative relative error"),
        ("lca/hurt_fraction", CATEGORY_LCA_HEALTH, HELPED_HURT_CHART),
        ("lca/helped_fraction_nonzero", CATEGORY_LCA_HEALTH, HELPED_HURT_CHART),
        ("lca/excess_kurtosis", CATEGORY_LCA_HEALTH, "excess kurtosis of the allocations (all; A != 0)"),
        ("lca/excess_kurtosis_nonzero", CATEGORY_LCA_HEALTH, "excess kurtosis of the allocations (all; A != 0)"),
        ("lca/skipped_steps", CATEGORY_LCA_HEALTH, "skipped steps"),
        ("lca/capped_steps", CATEGORY_LCA_HEALTH, "adaptive steps capped above tolerance"),
        ("lca/ablation/probe_first_order/helped_fraction", CATEGORY_LCA_ABLATION, "helped fraction by loss and rule"),
        ("lca/ablation/batch_simpson/part/gradient", CATEGORY_LCA_ABLATION, "gradient part by loss and rule"),
        ("nfa/encoder.layers.10.fc1/pearson_a0.5", CATEGORY_NFA, "pearson_a0.5, all layers"),
        (
            "nfa/encoder.layers.10.fc1/pearson_a0.5",
            CATEGORY_NFA,
            "encoder.layers.10.fc1: pearson vs rotation null, α=0.5",
        ),
        ("nfa/head/null_a1", CATEGORY_NFA, "head: pearson vs rotation null, α=1"),
        ("nfa/net.0/stable_rank", CATEGORY_NFA, "stable_rank, all layers"),
        ("nfa/skipped", CATEGORY_NFA, "skipped measurements"),
    ],
)
def test_chart_patterns_match_the_callback_tags(tag, category, chart):
    layout = build_layout(lca=True, nfa=True, lca_ablation=True, nfa_layers=list(LAYERS))
    assert (category, chart) in charts_matching(layout, tag)


@pytest.mark.parametrize(
    ("tag", "not_chart"),
    [
        ("lca/part/gradient/net.0", "parts, all layers summed"),  # per-layer part is not a total
        ("lca/helped_fraction", "helped fraction per layer"),  # run-level is not a layer
        ("nfa/net.0/pearson_a0.5", "pearson_a1, all layers"),
        ("nfa/net.0/pearson_a105", "pearson_a1, all layers"),  # the dot in a0.5 is literal
        ("nfa/net.0/pearson_a0x5", "pearson_a0.5, all layers"),
        ("nfa/net.0/pearson_a1", "net.0: pearson vs rotation null, α=0.5"),
        ("nfa/net_0/pearson_a1", "net.0: pearson vs rotation null, α=1"),  # escaped layer name
    ],
)
def test_chart_patterns_do_not_pick_up_neighbouring_tags(tag, not_chart):
    layout = build_layout(lca=True, nfa=True, nfa_layers=list(LAYERS))
    assert not_chart not in [chart for _, chart in charts_matching(layout, tag)]


def test_every_pattern_is_anchored_and_compiles():
    layout = build_layout(lca=True, nfa=True, lca_ablation=True, nfa_layers=list(LAYERS))
    patterns = [pattern for _, _, pattern in layout_patterns(layout)]
    assert len(patterns) > 40
    for pattern in patterns:
        re.compile(pattern)
        assert pattern.startswith("^") and pattern.endswith("$"), pattern


def test_layout_without_layer_names_has_one_chart_per_metric_and_part():
    layout = build_layout(lca=True, nfa=True)
    charts = {category.title: [chart.title for chart in category.chart] for category in layout.category}
    assert all(f"{metric}, all layers" in charts[CATEGORY_NFA] for metric in NFA_METRICS)
    assert all(f"{part} part per layer" in charts[CATEGORY_LCA_PARTS] for part in LCA_PARTS)
    overview = (CATEGORY_NFA, "pearson vs rotation null, α=1, all layers")
    assert overview in charts_matching(layout, "nfa/x.1/null_a1")


def test_probes_off_give_only_their_categories():
    assert _titles(build_layout(lca=True, nfa=False)) == [CATEGORY_LCA, CATEGORY_LCA_PARTS, CATEGORY_LCA_HEALTH]
    assert _titles(build_layout(lca=False, nfa=True)) == [CATEGORY_NFA]
    assert not write_layout_once(object(), build_layout(lca=False, nfa=False))


def test_tensorboard_shows_only_the_last_layout_event_of_a_run(tmp_path):
    # Why write_layout_once merges: two plain add_custom_scalars calls on one writer lose the first.
    writer = SummaryWriter(str(tmp_path / "run"))
    writer.add_custom_scalars({"first": {"a": ["Multiline", ["^a$"]]}})
    writer.add_custom_scalars({"second": {"b": ["Multiline", ["^b$"]]}})
    writer.close()
    assert [c["title"] for c in _layout_tensorboard_shows(tmp_path)["category"]] == ["second"]


@pytest.mark.parametrize("nfa_first", [False, True])
def test_two_callbacks_sharing_a_writer_end_with_the_union_whichever_writes_first(tmp_path, nfa_first):
    lca_layout = build_layout(lca=True, nfa=False)
    nfa_layout = build_layout(lca=False, nfa=True, nfa_layers=list(LAYERS))
    writer = SummaryWriter(str(tmp_path / "run"))
    order = [nfa_layout, lca_layout] if nfa_first else [lca_layout, nfa_layout]
    assert write_layout_once(writer, order[0])
    assert write_layout_once(writer, order[1])
    assert not write_layout_once(writer, order[0])  # a second fit(): nothing new, nothing written
    assert not write_layout_once(writer, order[1])
    writer.close()
    events = _layouts_in_event_file(tmp_path / "run")
    assert len(events) == 2
    expected = [CATEGORY_LCA, CATEGORY_LCA_PARTS, CATEGORY_LCA_HEALTH, CATEGORY_NFA]
    assert _titles(events[-1]) == expected
    shown = _layout_tensorboard_shows(tmp_path)
    assert [c["title"] for c in shown["category"]] == expected
    nfa_charts = [chart["title"] for chart in shown["category"][-1]["chart"]]
    assert "head: pearson vs rotation null, α=1" in nfa_charts


def test_each_writer_gets_its_own_layout(tmp_path):
    layout = build_layout(lca=True, nfa=False)
    first, second = SummaryWriter(str(tmp_path / "a")), SummaryWriter(str(tmp_path / "b"))
    assert write_layout_once(first, layout)
    assert write_layout_once(second, layout)
    first.close(), second.close()
    assert len(_layouts_in_event_file(tmp_path / "a")) == len(_layouts_in_event_file(tmp_path / "b")) == 1


def test_merge_unions_charts_with_the_same_title_without_duplicates():
    a = layout_pb2.Layout(category=[layout_pb2.Category(title="x", chart=[
        layout_pb2.Chart(title="c", multiline=layout_pb2.MultilineChartContent(tag=["^a$"]))])])  # fmt: skip
    b = layout_pb2.Layout(category=[layout_pb2.Category(title="x", chart=[
        layout_pb2.Chart(title="c", multiline=layout_pb2.MultilineChartContent(tag=["^a$", "^b$"]))])])  # fmt: skip
    merged = merge_layouts(a, b)
    assert list(merged.category[0].chart[0].multiline.tag) == ["^a$", "^b$"]


def test_layer_name_with_a_slash_is_refused():
    with pytest.raises(ValueError, match="contains '/'"):
        build_layout(nfa_layers=["a/b"])


def test_rank_nonzero_dummy_experiment_is_a_no_op():
    from lightning.pytorch.loggers.logger import DummyExperiment

    # Lightning's TensorBoardLogger.experiment on ranks > 0: accepted, nothing reaches a file.
    assert write_layout_once(DummyExperiment(), build_layout()) is True
    assert write_layout_once(None, build_layout()) is False
