"""Plain TensorBoard stays clean: per-layer series once per logging window (their sums equal
the per-step series summed), per-unit allocations as one tensor summary per module (read back
equal to observe()'s), charts only for what the run writes, and training unchanged."""

from __future__ import annotations

import json
import re

import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util

from learnscope import LossChangeAllocation, contract
from learnscope.report.figures import plot_unit_lca
from learnscope.report.reader import read_logdir
from learnscope.report.summary import run_synchronisation
from learnscope.report.sync import SyncError, require_per_step
from models import Classifier, MemoryLogger, assert_bitwise_equal, digits_loader, mlp, state_of, trainer

STEPS, EVERY = 7, 3  # windows [0, 3), [3, 6), [6, 7): points at steps 2, 5 and 6 (the fit's last, partial one)
WINDOWS = {2: (0, 1, 2), 5: (3, 4, 5), 6: (6,)}
MODULES = ("net.0", "net.2")
FLAGS = dict(probe_size=128, tensor_series=True, unit_allocations=True)


class _Keeping(LossChangeAllocation):
    """Keeps each measured step's per-unit allocation (a unit's weights summed over inputs, plus its
    bias) of every module, in float64, from the tensors observe() receives."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.units: dict[int, dict[str, torch.Tensor]] = {}

    def observe(self, step, names, allocation, parts) -> None:
        per_unit: dict[str, torch.Tensor] = {}
        for name in names:
            a = allocation.allocation(name).detach().double()
            module = name.rpartition(".")[0]
            per_unit[module] = per_unit.get(module, 0) + a.reshape(a.shape[0], -1).sum(1)
        self.units[step] = per_unit


def _model() -> Classifier:
    return Classifier(mlp((64, 16, 10)), "sgd", lr=0.1, momentum=0.9)


def _fit(callback, logger, **kwargs):
    torch.manual_seed(0)
    model = _model()
    t = trainer(callbacks=[callback], loggers=[logger], max_steps=STEPS, log_every_n_steps=EVERY, **kwargs)
    t.fit(model, digits_loader(n=512))
    return state_of(model, t.optimizers[0])


@pytest.fixture(scope="module")
def two_runs():
    per_step, windowed = MemoryLogger(), MemoryLogger()
    _fit(LossChangeAllocation(per_step_series=True, **FLAGS), per_step)
    _fit(LossChangeAllocation(**FLAGS), windowed)
    return per_step.series, windowed.series


def _summed(series: dict[int, float], steps) -> float:
    return sum(series[s] for s in steps)


def test_windowed_sums_equal_the_per_step_series_summed(two_runs):
    per_step, windowed = two_runs
    summed = [f"lca/layer/{m}" for m in MODULES]
    summed += [f"lca/part/{part}/{m}" for part in ("gradient", "momentum") for m in MODULES]
    summed += [f"lca/tensor/{m}/{t}" for m in MODULES for t in ("weight", "bias")]
    for tag in summed:
        assert sorted(per_step[tag]) == list(range(STEPS)), tag
        assert sorted(windowed[tag]) == sorted(WINDOWS), tag
        for end, steps in WINDOWS.items():
            assert windowed[tag][end] == pytest.approx(_summed(per_step[tag], steps), rel=1e-9, abs=1e-15), tag
    for end, steps in WINDOWS.items():
        assert windowed["lca/window_steps"][end] == len(steps)
        for module in MODULES:  # pooled over the window: the module's size is the same every step
            helped = sum(per_step[f"lca/helped_fraction/{module}"][s] for s in steps) / len(steps)
            assert windowed[f"lca/helped_fraction/{module}"][end] == pytest.approx(helped, rel=1e-12)
            for cumulative in (f"lca/layer_cumulative/{module}", f"lca/tensor_cumulative/{module}/weight"):
                assert windowed[cumulative][end] == pytest.approx(per_step[cumulative][end], rel=1e-9)
    assert "lca/window_steps" not in per_step


def test_run_level_scalars_stay_per_measured_step(two_runs):
    per_step, windowed = two_runs
    for tag in ("lca/total", "lca/delta_loss", "lca/abs_error", "lca/helped_fraction", "lca/part/gradient"):
        assert sorted(windowed[tag]) == list(range(STEPS)), tag
        for step in range(STEPS):
            assert windowed[tag][step] == per_step[tag][step], tag  # same seed, bitwise the same run


def test_windows_cut_the_number_of_scalar_events(two_runs):
    per_step, windowed = two_runs
    count = lambda series: sum(len(points) for points in series.values())  # noqa: E731
    assert count(windowed) < count(per_step)


def _events(log_dir: str) -> EventAccumulator:
    events = EventAccumulator(log_dir, size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


@pytest.fixture(scope="module")
def tensorboard_run(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("windows")
    callback = _Keeping(**FLAGS)
    logger = TensorBoardLogger(logdir, name="run", version=0)
    _fit(callback, logger)
    return callback, logger.log_dir, logdir


def test_unit_tensor_read_back_equals_the_observed_per_unit_allocation(tensorboard_run):
    callback, log_dir, _ = tensorboard_run
    events = _events(log_dir)
    assert not [tag for tag in events.Tags()["scalars"] if tag.startswith("lca/unit/")]
    for module, units in (("net.0", 16), ("net.2", 10)):
        tag = f"lca/unit/{module}"
        assert tag in events.Tags()["tensors"]
        assert events.SummaryMetadata(tag).plugin_data.plugin_name == contract.TENSOR_PLUGIN
        points = events.Tensors(tag)
        assert [p.step for p in points] == sorted(WINDOWS)
        for point in points:
            value = tensor_util.make_ndarray(point.tensor_proto)
            expected = sum(callback.units[s][module] for s in WINDOWS[point.step])
            assert value.shape == (units,) and value.dtype.name == "float32"
            torch.testing.assert_close(torch.from_numpy(value).double(), expected, rtol=1e-6, atol=1e-9)


def test_the_data_provider_lists_and_reads_the_unit_tensors(tensorboard_run):
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer

    callback, _, logdir = tensorboard_run
    multiplexer = plugin_event_multiplexer.EventMultiplexer(tensor_size_guidance={contract.TENSOR_PLUGIN: 0})
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, str(logdir))
    ctx = context.RequestContext()
    listed = provider.list_tensors(ctx, experiment_id="", plugin_name=contract.TENSOR_PLUGIN)
    assert set(listed["run/version_0"]) == {"lca/unit/net.0", "lca/unit/net.2"}
    read = provider.read_tensors(ctx, experiment_id="", plugin_name=contract.TENSOR_PLUGIN, downsample=100)[
        "run/version_0"
    ]["lca/unit/net.2"]
    last = read[-1]
    assert last.step == 6
    torch.testing.assert_close(torch.from_numpy(last.numpy).double(), callback.units[6]["net.2"], rtol=1e-6, atol=1e-9)


def test_the_report_reads_the_unit_tensors_and_refuses_sync_on_windows(tensorboard_run):
    callback, _, logdir = tensorboard_run
    run = read_logdir(logdir, progress=False).runs["run/version_0"]
    units = run.lca.layers["net.0"].units
    assert units.steps.tolist() == sorted(WINDOWS) and units.values.shape == (len(WINDOWS), 16)
    torch.testing.assert_close(
        torch.from_numpy(units.values[0]), sum(callback.units[s]["net.0"] for s in WINDOWS[2]), rtol=1e-6, atol=1e-9
    )
    assert run.lca.window_steps.values.tolist() == [3.0, 3.0, 1.0]
    figure = plot_unit_lca(run, logdir / "unit_lca.png")
    assert figure is not None and figure.stat().st_size > 0
    with pytest.raises(SyncError, match=r"per_step_series=True"):
        run_synchronisation(run)
    require_per_step(None)  # a run without window_steps (per-step, or older) is tested
    require_per_step([1.0, 1.0])


def _layout(events: EventAccumulator) -> dict:
    from tensorboard.plugins.custom_scalar import layout_pb2

    (tensor,) = events.Tensors("custom_scalars__config__")[-1:]
    layout = layout_pb2.Layout()
    layout.ParseFromString(tensor_util.make_ndarray(tensor.tensor_proto).item())
    return {(c.title, chart.title): list(chart.multiline.tag) for c in layout.category for chart in c.chart}


def test_the_layout_charts_only_tags_the_run_writes_and_none_is_constant(tensorboard_run):
    _, log_dir, _ = tensorboard_run
    events = _events(log_dir)
    scalars = events.Tags()["scalars"]
    charts = _layout(events)
    assert charts, "no layout written"
    titles = {title for _, title in charts}
    # SGD without weight decay: no weight_decay chart; the exactly modelled residual is rounding
    assert "momentum part per layer" in titles and "weight_decay part per layer" not in titles
    assert "residual part per layer" not in titles and "skipped steps" not in titles
    assert "quadrature sub-intervals" not in titles  # simpson: a constant
    for key, patterns in charts.items():
        matched = [tag for tag in scalars if any(re.match(p, tag) for p in patterns)]
        assert matched, f"chart {key} matches no written tag"
        values = {round(e.value, 15) for tag in matched for e in events.Scalars(tag)}
        assert len(values) > 1, f"chart {key} is constant: {json.dumps(sorted(values))}"


def test_training_is_bitwise_unchanged_with_windows_and_unit_tensors(tmp_path):
    reference = _fit(LossChangeAllocation(probe_size=128, per_step_series=True), MemoryLogger())
    windowed = _fit(LossChangeAllocation(**FLAGS), TensorBoardLogger(tmp_path, name="run", version=0))
    assert_bitwise_equal(reference, windowed)
    torch.manual_seed(0)
    model = _model()
    t = trainer(max_steps=STEPS, log_every_n_steps=EVERY)
    t.fit(model, digits_loader(n=512))
    assert_bitwise_equal(reference, state_of(model, t.optimizers[0]))


def _resumable(tmp_path, epochs, ckpt=None):
    import lightning.pytorch as pl

    torch.manual_seed(0)
    logger = MemoryLogger()
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_epochs=1)
    t = trainer(
        callbacks=[LossChangeAllocation(**FLAGS), checkpoint],
        loggers=[logger],
        max_steps=-1,
        max_epochs=epochs,
        enable_checkpointing=True,
        limit_train_batches=4,
        log_every_n_steps=EVERY,
    )
    t.fit(_model(), digits_loader(n=512, shuffle=False), ckpt_path=ckpt)
    return logger.series


def test_a_checkpoint_ends_the_window_so_a_resumed_run_writes_the_same_points(tmp_path):
    # windows [0, 3), [3, 6), [6, 8), cut by the checkpoints after steps 3 and 7: points at 2, 3, 5, 7
    whole = _resumable(tmp_path / "a", 2)
    _resumable(tmp_path / "b", 1)
    resumed = _resumable(tmp_path / "c", 2, ckpt=str(tmp_path / "b" / "last.ckpt"))
    assert sorted(whole["lca/layer/net.0"]) == [2, 3, 5, 7]
    assert [whole["lca/window_steps"][s] for s in (2, 3, 5, 7)] == [3, 1, 2, 2]
    assert sorted(resumed["lca/layer/net.0"]) == [5, 7]
    for tag in ("lca/layer/net.0", "lca/tensor/net.2/bias", "lca/helped_fraction/net.0", "lca/window_steps"):
        for step in (5, 7):
            assert resumed[tag][step] == pytest.approx(whole[tag][step], rel=1e-12), (tag, step)


def test_per_step_series_flag_is_checked():
    with pytest.raises(ValueError, match="per_step_series"):
        LossChangeAllocation(per_step_series=1)
    assert LossChangeAllocation(per_step_series=True).config.per_step_series is True
