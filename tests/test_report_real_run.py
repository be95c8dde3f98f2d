"""``learnscope report`` on a real run: the digits MLP trained with both callbacks
and a TensorBoardLogger, then the report read back from the event files."""

from __future__ import annotations

import contextlib
import io
import re

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")

from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.image import imread

import learnscope
from learnscope.report.cli import FIGURE_EXPLANATIONS, main
from models import Classifier, digits_loader, trainer

STEPS = 60
NFA_EVERY = 10
LAYERS = ("net.0", "net.2", "net.4")  # mlp(): 64 → 100 → 50 → 10, net.4 the readout
# (height, width) in pixels: figures.DPI (100) × the inch sizes in learnscope.report.figures
EXPECTED_SHAPES = {
    "cumulative_lca": (500, 800),  # (a)
    "lca_per_layer": (500, 800),  # (b) help/hurt bars
    "helped_fraction": (450, 1200),  # (c)
    "lca_parts": (500, 800),  # (d) parts stacked
    "nfa_alignment": (360, 1200),  # (e) 3 layers: one row of 3 panels of 4 × 3.6 in
    "nfa_metrics": (840, 1400),  # (e) 10 context metrics: 3 rows × 4 panels of 3.5 × 2.8 in
    "synchronisation": (700, 1200),  # (f)
    "unit_lca": (750, 1000),  # (g) 3 layers with ≤ 512 units, 2.5 in each
    "param_helped_fraction": (450, 1200),  # parameter_counts=True
    "lca_distribution": (420, 1500),
    "synchronisation_driver_removed": (700, 1200),
    "lca_nfa_steps": (340, 1350),  # 3 layers with LCA and pearson_a0.5: one row of 4.5 × 3.4 in panels
}
EXPECTED_SHAPES["tensor_lca"] = (370, 800)  # tensor_series=True: 6 tensors (3 × weight, bias), 1.6 + 0.35 in each


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """Train once; every test reads the same run."""
    root = tmp_path_factory.mktemp("real_run")
    # per-step series: the synchronisation test refuses series summed over logging windows
    lca = learnscope.LossChangeAllocation(
        probe_size=256,
        unit_allocations=True,
        ablation=True,
        parameter_counts=True,
        tensor_series=True,
        per_step_series=True,
    )
    nfa = learnscope.NeuralFeatureAnsatz(every_n_steps=NFA_EVERY, probe_size=256, images=False)
    logger = TensorBoardLogger(str(root / "logs"), name="mlp")
    fit = trainer([lca, nfa], loggers=logger, max_steps=STEPS, log_every_n_steps=20)
    fit.fit(Classifier(optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=1e-4), digits_loader(batch_size=64))
    logger.experiment.flush()
    return dict(root=root, logdir=logger.log_dir, lca=lca, nfa=nfa, global_step=fit.global_step)


@pytest.fixture(scope="module")
def report(real_run):
    out = real_run["root"] / "report"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["report", str(real_run["logdir"]), "--out", str(out), "--no-progress"])
    return dict(code=code, out=out, printed=printed.getvalue())


def printed_table(text: str) -> dict[str, list[str]]:
    """The rows of the printed per-layer table, keyed by layer, and its header."""
    lines = text.splitlines()
    start = next(k for k, line in enumerate(lines) if line.startswith("layer ") and "cum. LCA" in line)
    assert set(lines[start + 1]) <= {"-", " "}
    rows = {"header": re.split(r"\s{2,}", lines[start].strip())}
    for line in lines[start + 2 :]:
        if not line.strip():
            break
        cells = re.split(r"\s{2,}", line.strip())
        rows[cells[0]] = cells
    return rows


@pytest.mark.slow
def test_the_run_measured_every_step_and_nfa_every_n(real_run):
    assert real_run["global_step"] == STEPS
    assert set(real_run["lca"].cumulative) == set(LAYERS)
    assert real_run["nfa"].last_record is not None


@pytest.mark.slow
def test_report_exits_zero_and_draws_every_figure_at_its_size(report):
    assert report["code"] == 0
    for name, shape in EXPECTED_SHAPES.items():
        path = report["out"] / f"{name}.png"
        assert path.is_file() and path.stat().st_size > 10_000, name
        image = imread(path)
        assert image.shape[:2] == shape, name
        assert image[..., :3].std() > 0.05, f"{name} is blank"
    assert set(EXPECTED_SHAPES) == set(FIGURE_EXPLANATIONS)


@pytest.mark.slow
def test_report_md_links_every_figure(report):
    text = (report["out"] / "report.md").read_text(encoding="utf-8")
    for name, (title, _) in FIGURE_EXPLANATIONS.items():
        if name in EXPECTED_SHAPES:
            assert f"![{title}]({name}.png)" in text
    assert "Not drawn" not in text
    assert "| net.0 |" in text


@pytest.mark.slow
def test_printed_cumulative_lca_per_layer_is_the_callbacks_own(real_run, report):
    table = printed_table(report["printed"])
    column = table["header"].index("cum. LCA")
    cumulative = real_run["lca"].cumulative
    assert set(table) - {"header"} == set(LAYERS)
    for layer in LAYERS:
        assert float(table[layer][column]) == pytest.approx(cumulative[layer], rel=1e-6, abs=1e-6), layer
    # the layers helped on the whole: the loss fell
    assert sum(cumulative.values()) < 0


@pytest.mark.slow
def test_printed_headline_matches_the_callback(real_run, report):
    text = report["printed"]
    assert f"measured steps: {STEPS}" in text
    error = float(re.search(r"cumulative relative error: ([0-9.e+-]+)%", text).group(1)) / 100
    assert error == pytest.approx(real_run["lca"].cumulative_relative_error, rel=5e-3)
    assert "synchronisation: " in text and "not tested" not in text
    # NFA columns are filled for the hidden layers; the readout has no α = 1 value
    table = printed_table(text)
    pearson_a1 = table["header"].index("pearson_a1")
    assert -1 <= float(table["net.0"][pearson_a1]) <= 1
    assert table["net.4"][pearson_a1] == "-"
