"""The offline report: reader, summary table, figures and the CLI on a
synthetic run written with the public tag names."""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")
import torch
from matplotlib.image import imread
from torch.utils.tensorboard import SummaryWriter

from learnscope._logging import tensor_summary
from learnscope.report.cli import main
from learnscope.report.reader import parse_tag, read_logdir
from learnscope.tensorboard_layout import build_layout, write_layout_once

LAYERS = ("net.0", "net.2", "net.10")  # net.10 after net.2: model order, not alphabetical
READOUT = "net.10"
PARTS = ("gradient", "momentum", "weight_decay", "residual")
STEPS = 60
NFA_EVERY = 5
UNITS = 4
HIDDEN_METRICS = (
    "pearson_a1", "cosine_a1", "pearson_a0.5", "cosine_a0.5", "null_a1", "null_a0.5", "excess_a1",
    "excess_a0.5", "sphericity", "sphericity_range", "align_a0.5", "stable_rank", "weight_change",
    "cnfa_pearson_a1",
)  # fmt: skip
READOUT_METRICS = tuple(m for m in HIDDEN_METRICS if not m.endswith("_a1"))

# Pixel size (height, width) of each figure for this run: DPI 100 × inches.
EXPECTED_SHAPES = {
    "cumulative_lca": (500, 800),
    "lca_per_layer": (500, 800),
    "helped_fraction": (450, 1200),
    "lca_parts": (500, 800),
    "nfa_alignment": (360, 1200),  # 3 layers in one row of 4 × 3.6 in panels
    "nfa_metrics": (840, 1400),  # 10 context metrics: 3 rows × 4 panels of 3.5 × 2.8 in
    "synchronisation": (700, 1200),
    "unit_lca": (500, 1000),  # two layers with unit scalars, 2.5 in each
    "lca_distribution": (420, 1500),  # lca/hist and the per-step kurtosis
    "synchronisation_driver_removed": (700, 1200),
    "lca_nfa_steps": (340, 1350),  # 3 layers with LCA and pearson_a0.5, one row of 4.5 × 3.4 in panels
}


def write_synthetic_run(logdir: Path, seed: int = 0) -> dict:
    """A run as the callbacks would log it; returns the numbers written."""
    rng = np.random.default_rng(seed)
    means = {"net.0": -0.02, "net.2": -0.01, "net.10": 0.01}
    shared_dips = rng.choice(np.arange(5, STEPS - 5), size=8, replace=False)
    allocation = {}
    for name in LAYERS:
        values = means[name] + 0.004 * rng.standard_normal(STEPS)
        values[shared_dips] -= 0.03  # the layers learn on the same steps
        allocation[name] = values
    parts = {}
    for name in LAYERS:
        gradient = 1.3 * allocation[name]
        momentum = -0.2 * allocation[name] + 0.001 * rng.standard_normal(STEPS)
        weight_decay = np.full(STEPS, 0.0005)
        parts[name] = {
            "gradient": gradient,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "residual": allocation[name] - gradient - momentum - weight_decay,
        }
    units = {name: rng.dirichlet(np.ones(UNITS), size=STEPS).T * allocation[name] for name in ("net.2", READOUT)}
    total = sum(allocation.values())
    delta_loss = total + 1e-4 * rng.standard_normal(STEPS)
    helped = {name: 0.5 + 0.05 * rng.standard_normal(STEPS) for name in LAYERS}

    writer = SummaryWriter(str(logdir / "lightning_logs" / "version_0"))
    write_layout_once(writer, build_layout(lca=True, nfa=False))
    write_layout_once(writer, build_layout(lca=False, nfa=True, nfa_layers=list(LAYERS)))
    for step in range(STEPS):
        scalars = {
            "lca/total": total[step],
            "lca/delta_loss": delta_loss[step],
            "lca/abs_error": abs(total[step] - delta_loss[step]),
            "lca/splits": 2.0,
            "lca/helped_fraction": float(np.mean([helped[n][step] for n in LAYERS])),
            "lca/hurt_fraction": 1 - float(np.mean([helped[n][step] for n in LAYERS])),
            "lca/cumulative_relative_error": abs(total[: step + 1].sum() - delta_loss[: step + 1].sum())
            / abs(delta_loss[: step + 1].sum()),
            "lca/helped_fraction_nonzero": 0.52,
            "lca/excess_kurtosis": 4.0 + step / 60,
            "lca/excess_kurtosis_nonzero": 1.5 + step / 60,
            "lca/skipped_steps": 0.0,
            "lca/ablation/batch_first_order/helped_fraction": 1.0,
            "lca/ablation/batch_first_order/part/gradient": -0.01,
            "epoch": step // 20,
        }
        for name in LAYERS:
            scalars[f"lca/layer/{name}"] = allocation[name][step]
            scalars[f"lca/layer_cumulative/{name}"] = allocation[name][: step + 1].sum()
            scalars[f"lca/helped_fraction/{name}"] = helped[name][step]
            scalars[f"lca/hurt_fraction/{name}"] = 1 - helped[name][step]
            for part in PARTS:
                scalars[f"lca/part/{part}/{name}"] = parts[name][part][step]
                scalars[f"lca/part_cumulative/{part}/{name}"] = parts[name][part][: step + 1].sum()
        for part in PARTS:
            scalars[f"lca/part/{part}"] = sum(parts[n][part][step] for n in LAYERS)
            scalars[f"lca/part_cumulative/{part}"] = sum(parts[n][part][: step + 1].sum() for n in LAYERS)
        unit_tensors = {f"lca/unit/{name}": torch.from_numpy(per_unit[:, step]) for name, per_unit in units.items()}
        writer.file_writer.add_summary(tensor_summary(unit_tensors), step)
        if step % NFA_EVERY == 0:
            scalars["nfa/skipped"] = 0.0
            for k, name in enumerate(LAYERS):
                metrics = READOUT_METRICS if name == READOUT else HIDDEN_METRICS
                for metric in metrics:
                    scalars[f"nfa/{name}/{metric}"] = nfa_value(metric, k, step)
        for tag, value in scalars.items():
            writer.add_scalar(tag, float(value), step)
        if step % 20 == 0:
            for name in LAYERS:
                writer.add_histogram(f"lca/hist/{name}", rng.standard_normal(200) * 1e-3, step)
                writer.add_histogram(f"nfa/{name}/spectrum", rng.exponential(size=16), step)
                writer.add_image(f"nfa/{name}/matrices", rng.random((3, 8, 16)), step)
    writer.close()
    cumulative = {name: float(allocation[name].sum()) for name in LAYERS}
    last_nfa_step = (STEPS - 1) // NFA_EVERY * NFA_EVERY
    return {
        "cumulative": cumulative,
        "helped": {name: float(helped[name].mean()) for name in LAYERS},
        "final_nfa": {
            name: {
                m: nfa_value(m, k, last_nfa_step) for m in ("pearson_a1", "pearson_a0.5", "excess_a1", "excess_a0.5")
            }
            for k, name in enumerate(LAYERS)
        },
        "part_totals": {name: {p: float(parts[name][p].sum()) for p in PARTS} for name in LAYERS},
        "relative_error": abs(total.sum() - delta_loss.sum()) / abs(delta_loss.sum()),
    }


def nfa_value(metric: str, layer_index: int, step: int) -> float:
    base = {"null": 0.4, "excess": 0.2, "stable": 3.0, "weight": 0.1}.get(metric.split("_")[0], 0.6)
    if metric.endswith("a0.5"):
        base -= 0.15
    return round(base + 0.1 * layer_index + 0.002 * step, 6)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("logs")
    written = write_synthetic_run(logdir)
    out = logdir / "out"
    return logdir, out, written


@pytest.fixture(scope="module")
def report_run(synthetic):
    """Run the CLI once for the module; capture what it prints."""
    logdir, out, written = synthetic
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["report", str(logdir), "--out", str(out), "--no-progress", "--draws", "500"])
    return code, stdout.getvalue(), out, written


def _row(stdout: str, layer: str) -> list[str]:
    for line in stdout.splitlines():
        cells = line.split()
        if cells and cells[0] == layer:
            return cells
    raise AssertionError(f"no table row for {layer!r} in:\n{stdout}")


def test_report_exits_zero_and_writes_every_figure_at_its_size(report_run):
    code, _, out, _ = report_run
    assert code == 0
    for name, shape in EXPECTED_SHAPES.items():
        path = out / f"{name}.png"
        assert path.is_file() and path.stat().st_size > 0, name
        image = imread(path)
        assert image.shape[:2] == shape, name
        assert image.std() > 0.01, f"{name} is blank"


def test_report_md_links_every_figure(report_run):
    _, _, out, _ = report_run
    markdown = (out / "report.md").read_text(encoding="utf-8")
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert sorted(links) == sorted(f"{name}.png" for name in EXPECTED_SHAPES)
    assert all((out / link).is_file() for link in links)
    for layer in LAYERS:
        assert f"| {layer} |" in markdown


def test_table_has_each_layer_with_its_cumulative_lca_and_helped_fraction(report_run):
    _, stdout, _, written = report_run
    layer_sum = sum(written["cumulative"].values())
    for layer in LAYERS:
        cells = _row(stdout, layer)
        cumulative, share, helped = float(cells[1]), float(cells[2].rstrip("%")), float(cells[3])
        assert cumulative == pytest.approx(written["cumulative"][layer], rel=1e-5)
        assert share == pytest.approx(100 * written["cumulative"][layer] / layer_sum, abs=0.051)
        assert helped == pytest.approx(written["helped"][layer], abs=5e-4)
    assert float(_row(stdout, "net.10")[1]) > 0  # the readout hurt, as written


def test_table_has_final_nfa_values_and_omits_readout_alpha_one(report_run):
    _, stdout, _, written = report_run
    for layer in LAYERS:
        cells = _row(stdout, layer)
        pearson_a1, pearson_a05, excess_a1, excess_a05 = cells[4:8]
        final = written["final_nfa"][layer]
        assert float(pearson_a05) == pytest.approx(final["pearson_a0.5"], abs=5e-4)
        assert float(excess_a05) == pytest.approx(final["excess_a0.5"], abs=5e-4)
        if layer == READOUT:
            assert pearson_a1 == "-" and excess_a1 == "-"
        else:
            assert float(pearson_a1) == pytest.approx(final["pearson_a1"], abs=5e-4)
            assert float(excess_a1) == pytest.approx(final["excess_a1"], abs=5e-4)


def test_table_reports_cumulative_relative_error_and_synchronisation(report_run):
    _, stdout, _, written = report_run
    match = re.search(r"cumulative relative error: ([0-9.e+-]+)%", stdout)
    assert match and float(match.group(1)) == pytest.approx(100 * written["relative_error"], rel=1e-2)
    assert "mean helped fraction (parameters with A != 0): 0.520" in stdout
    assert re.search(r"mean excess kurtosis of the allocations: 4\.49", stdout)
    assert re.search(r"mean excess kurtosis of the allocations \(parameters with A != 0\): 1\.99", stdout)
    match = re.search(r"synchronisation: .* p = ([0-9.e+-]+)", stdout)
    assert match and float(match.group(1)) < 0.05  # the synthetic layers share 8 planted dips


def test_reader_groups_tags_into_layers_parts_and_nfa_metrics(synthetic):
    logdir, _, written = synthetic
    records = read_logdir(logdir, progress=False)
    assert list(records.runs) == ["lightning_logs/version_0"]
    run = records.runs["lightning_logs/version_0"]
    assert list(run.lca.layers) == list(LAYERS)
    layer = run.lca.layers["net.0"]
    assert len(layer.allocation) == STEPS and layer.allocation.steps.tolist() == list(range(STEPS))
    assert layer.allocation.sum() == pytest.approx(written["cumulative"]["net.0"], rel=1e-5)
    assert set(layer.parts) == set(PARTS) == set(run.lca.parts)
    assert len(layer.histogram) == 3 and layer.histogram.histograms[0].num == 200
    units = run.lca.layers[READOUT].units
    assert units.values.shape == (STEPS, UNITS) and units.steps.tolist() == list(range(STEPS))
    assert run.lca.ablations["batch_first_order"].rule == "first_order"
    assert set(run.nfa.layers[READOUT].metrics) == set(READOUT_METRICS)
    assert len(run.nfa.layers["net.2"].metrics["pearson_a0.5"]) == STEPS // NFA_EVERY
    assert len(run.nfa.layers["net.2"].spectrum) == 3 and len(run.nfa.layers["net.2"].matrices) == 3
    assert set(run.other_scalars) == {"epoch"} and run.unrecognised_tags == []


def test_reader_splices_a_resumed_run_without_double_counting(tmp_path):
    run_dir = tmp_path / "version_0"
    first = SummaryWriter(str(run_dir), filename_suffix=".a")
    for step in range(10):
        first.add_scalar("lca/layer/net.0", 1.0, step)
    first.close()
    second = SummaryWriter(str(run_dir), filename_suffix=".b")  # resumed from the step-6 checkpoint
    for step in range(6, 12):
        second.add_scalar("lca/layer/net.0", 2.0, step)
    second.close()
    series = read_logdir(tmp_path, progress=False).runs["version_0"].lca.layers["net.0"].allocation
    assert series.steps.tolist() == list(range(12))
    assert series.sum() == 6 * 1.0 + 6 * 2.0


def test_event_files_are_read_in_creation_order_when_writer_counters_gain_a_digit():
    """torch names event files ...tfevents.<time>.<host>.<pid>.<counter><suffix>: writers 9 and
    10 created in the same second sort wrongly by name; the reader orders them by number."""
    from learnscope.report.reader import _creation_order

    names = ["events.out.tfevents.1700000001.host.a.12.9.a", "events.out.tfevents.1700000001.host.a.12.10.b"]
    assert sorted(names) == names[::-1]  # the bug a name sort has
    assert sorted((Path(n) for n in names), key=_creation_order) == [Path(n) for n in names]
    earlier = Path("events.out.tfevents.999999999.host.1.10")
    assert sorted([Path(names[0]), earlier], key=_creation_order)[0] == earlier


@pytest.mark.parametrize(
    ("tag", "family", "fields"),
    [
        ("lca/helped_fraction", "lca_run", {"metric": "helped_fraction"}),
        ("lca/helped_fraction/encoder.layers.3.fc1", "lca_layer_helped", {"layer": "encoder.layers.3.fc1"}),
        ("lca/part/weight_decay", "lca_part", {"part": "weight_decay"}),
        ("lca/part_cumulative/residual/net.0", "lca_layer_part_cumulative", {"part": "residual", "layer": "net.0"}),
        ("lca/ablation/probe_first_order/part/momentum", "lca_ablation_part", {"data": "probe", "rule": "first_order"}),
        ("lca/unit/net.4", "lca_unit", {"layer": "net.4"}),
        ("nfa/blocks.0.mlp.fc2/pearson_a0.5", "nfa_metric", {"layer": "blocks.0.mlp.fc2", "metric": "pearson_a0.5"}),
        ("nfa/skipped", "nfa_skipped", {}),
    ],
)
def test_parse_tag_reads_layer_names_with_dots_and_digits(tag, family, fields):
    parsed = parse_tag(tag)
    assert parsed.family == family
    for key, value in fields.items():
        assert getattr(parsed, key) == value


@pytest.mark.parametrize(
    "tag", ["epoch", "lca", "lca/unit/net.0/x", "lca/ablation/train_x/helped_fraction", "nfa/a/b/c"]
)
def test_parse_tag_rejects_other_tags(tag):
    assert parse_tag(tag) is None


def test_empty_logdir_exits_2_with_a_message(tmp_path, capsys):
    code = main(["report", str(tmp_path), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 2
    assert "no learnscope data" in captured.err and "no event files" in captured.err
    assert not (tmp_path / "learnscope_report").exists()


def test_missing_logdir_exits_2_with_a_message(tmp_path, capsys):
    code = main(["report", str(tmp_path / "nope")])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err


def test_run_without_learnscope_tags_exits_2(tmp_path, capsys):
    writer = SummaryWriter(str(tmp_path / "version_0"))
    writer.add_scalar("train_loss", 1.0, 0)
    writer.close()
    assert main(["report", str(tmp_path), "--no-progress"]) == 2
    assert "1 event file(s) in 1 run(s)" in capsys.readouterr().err


def test_lca_only_run_skips_nfa_figures(tmp_path, capsys):
    writer = SummaryWriter(str(tmp_path / "version_0"))
    for step in range(3):
        writer.add_scalar("lca/layer/net.0", -1.0, step)
    writer.close()
    out = tmp_path / "out"
    assert main(["report", str(tmp_path), "--out", str(out), "--no-progress"]) == 0
    stdout = capsys.readouterr().out
    assert stdout.splitlines()[stdout.splitlines().index("") + 1].split() == ["layer", "cum.", "LCA", "share"]
    assert "synchronisation: not tested (synchronisation needs at least 2 layer series" in stdout
    assert sorted(p.name for p in out.glob("*.png")) == ["cumulative_lca.png", "lca_per_layer.png"]


def test_python_dash_m_runs_the_report(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "learnscope.report", "report", str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2 and "no learnscope data" in result.stderr and "Traceback" not in result.stderr


def _write_lca_only_run(run_dir: Path, layers=("net.0", "net.2"), steps=12) -> None:
    writer = SummaryWriter(str(run_dir))
    for step in range(steps):
        for k, name in enumerate(layers):
            writer.add_scalar(f"lca/layer/{name}", -0.1 * (k + 1) + 0.01 * np.sin(step + k), step)
    writer.close()


def test_several_runs_get_one_section_and_figure_folder_each(tmp_path, capsys):
    for version in (0, 1):
        _write_lca_only_run(tmp_path / "lightning_logs" / f"version_{version}")
    out = tmp_path / "report"
    assert main(["report", str(tmp_path), "--out", str(out), "--no-progress", "--draws", "50"]) == 0
    stdout = capsys.readouterr().out
    assert "run lightning_logs/version_0" in stdout and "run lightning_logs/version_1" in stdout
    markdown = (out / "report.md").read_text(encoding="utf-8")
    for version in (0, 1):
        folder = f"lightning_logs_version_{version}"
        assert f"## Run `lightning_logs/version_{version}`" in markdown
        assert f"]({folder}/cumulative_lca.png)" in markdown
        assert (out / folder / "synchronisation.png").is_file()


def test_progress_bar_goes_to_stderr(tmp_path, capsys):
    _write_lca_only_run(tmp_path / "version_0")
    records = read_logdir(tmp_path, progress=True)
    captured = capsys.readouterr()
    assert "reading event files" in captured.err and captured.out == ""
    assert list(records.learnscope_runs) == ["version_0"]


def test_figures_leave_no_pyplot_state_behind(report_run):
    from matplotlib import _pylab_helpers

    assert report_run[0] == 0
    assert _pylab_helpers.Gcf.get_num_fig_managers() == 0
