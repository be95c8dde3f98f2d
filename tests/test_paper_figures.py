"""The papers' figures: the report's new figures (per-parameter helped fraction, per-tensor
split, distribution shape, LCA/NFA step alignment) drawn when their tags are there and
skipped when not, their numbers against the values written, and a smoke run of
examples/paper_figures.py's core on a tiny subset."""

from __future__ import annotations

import contextlib
import io
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")
from torch.utils.tensorboard import SummaryWriter

from learnscope.report import figures
from learnscope.report.cli import STEP_CONVENTION, main
from learnscope.report.reader import read_logdir
from learnscope.report.shape import lca_before, read_tensor_lca, tensor_totals
from learnscope.report.summary import summarise_run

STEPS = 30
MODULES = ("net.0", "net.2")
TENSORS = ("weight", "bias")
NEW_FIGURES = ("param_helped_fraction", "tensor_lca", "lca_distribution", "lca_nfa_steps")


def _write_run(logdir: Path, with_new_tags: bool, seed: int = 0) -> dict:
    """A run as the callbacks log it: per-layer LCA always; with ``with_new_tags`` also the
    per-tensor series (the cumulative one only for net.0), the per-parameter helped-fraction
    histograms, allocation histograms, skewness and kurtosis, and NFA. Returns what was written."""
    rng = np.random.default_rng(seed)
    per_tensor = {(m, t): rng.normal(-0.01 if t == "weight" else 0.004, 0.003, STEPS) for m in MODULES for t in TENSORS}
    helped = rng.beta(5, 5, size=500)
    writer = SummaryWriter(str(logdir))
    for step in range(STEPS):
        scalars = {"lca/total": sum(v[step] for v in per_tensor.values())}
        for module in MODULES:
            scalars[f"lca/layer/{module}"] = sum(per_tensor[(module, t)][step] for t in TENSORS)
        if with_new_tags:
            scalars |= {"lca/skewness": 0.1 * step - 1, "lca/excess_kurtosis": 5.0 + step, "lca/skewness_pooled": -0.5}
            scalars["lca/excess_kurtosis_pooled"] = 40.0
            for (module, tensor), values in per_tensor.items():
                scalars[f"lca/tensor/{module}/{tensor}"] = values[step]
                if module == "net.0":
                    scalars[f"lca/tensor_cumulative/{module}/{tensor}"] = values[: step + 1].sum()
            if step % 10 == 0:
                scalars["nfa/skipped"] = 0.0
                for module in MODULES:
                    scalars[f"nfa/{module}/pearson_a0.5"] = 0.5 + 0.01 * step
        for tag, value in scalars.items():
            writer.add_scalar(tag, float(value), step)
        if with_new_tags and step % 10 == 0:
            writer.add_histogram("lca/param_helped_fraction", helped * (0.5 + step / 60), step)
            for module in MODULES:
                writer.add_histogram(f"lca/param_helped_fraction/{module}", helped[:250], step)
                writer.add_histogram(f"lca/hist/{module}", rng.standard_t(3, size=400) * 1e-4, step)
    writer.close()
    return {"per_tensor": per_tensor, "last_helped": helped * (0.5 + 20 / 60)}


def _report(logdir: Path, out: Path) -> str:
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["report", str(logdir), "--out", str(out), "--no-progress", "--draws", "200"]) == 0
    return (out / "report.md").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("full")
    return logdir, _write_run(logdir, with_new_tags=True)


def _run(logdir: Path):
    with warnings.catch_warnings():  # "not in the tag contract" until the contract knows lca/tensor
        warnings.simplefilter("ignore")
        records = read_logdir(logdir, progress=False)
    return records.learnscope_runs["."]


def test_report_draws_the_new_figures_when_their_tags_are_present(full_run, tmp_path):
    logdir, _ = full_run
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        markdown = _report(logdir, tmp_path / "out")
    for name in NEW_FIGURES:
        assert (tmp_path / "out" / f"{name}.png").is_file(), name
        assert f"]({name}.png)" in markdown, name
    assert STEP_CONVENTION in markdown  # the run shows both LCA and NFA
    assert "per-parameter helped fraction" in markdown


def test_report_skips_the_new_figures_when_their_tags_are_absent(tmp_path):
    _write_run(tmp_path / "logs", with_new_tags=False)
    markdown = _report(tmp_path / "logs", tmp_path / "out")
    for name in NEW_FIGURES:
        assert not (tmp_path / "out" / f"{name}.png").exists(), name
    assert "LCA per parameter tensor" in markdown.split("Not drawn")[1]
    assert STEP_CONVENTION not in markdown  # no NFA in this run


def test_per_tensor_totals_and_bars_equal_the_values_written(full_run):
    logdir, written = full_run
    run = _run(logdir)
    tensors = read_tensor_lca(run)
    assert list(tensors) == list(MODULES) and all(list(t) == list(TENSORS) for t in tensors.values())
    totals = tensor_totals(tensors)
    for key, values in written["per_tensor"].items():
        # net.0 from its cumulative tag (last value), net.2 from the per-step sum: both Σ_t
        assert totals[key] == pytest.approx(float(np.sum(values.astype(np.float32))), rel=1e-5, abs=1e-7)
    figure = figures.tensor_lca_figure(totals)
    bars = sorted(figure.axes[0].patches, key=lambda bar: -bar.get_y())  # top to bottom = model order
    assert [bar.get_width() for bar in bars] == pytest.approx(list(totals.values()))
    ticks = sorted(figure.axes[0].get_yticklabels(), key=lambda label: -label.get_position()[1])
    labels = [label.get_text() for label in ticks]
    assert labels == [f"{m} · {t}" for m, t in totals]
    assert figures.plot_tensor_lca({}, "unused.png") is None


def test_per_parameter_helped_fraction_mean_is_the_last_histograms_mean(full_run):
    logdir, written = full_run
    summary = summarise_run(_run(logdir), None)
    assert summary.param_helped_fraction == pytest.approx(float(np.mean(written["last_helped"])), rel=1e-6)


def test_lca_before_sums_the_lca_of_the_steps_before_each_nfa_step():
    rng = np.random.default_rng(1)
    lca_steps = np.array([0, 1, 2, 4, 5, 8])  # every_n_steps or skipped steps leave gaps
    values = rng.standard_normal(len(lca_steps))
    nfa_steps = np.array([0, 1, 3, 5, 9, 20])
    expected = [sum(v for s, v in zip(lca_steps, values) if s < t) for t in nfa_steps]
    assert lca_before(lca_steps, values, nfa_steps) == pytest.approx(expected, abs=1e-12)


def test_paper_figures_core_measures_the_helped_fraction_of_the_callbacks_counts(tmp_path):
    """A tiny run of the example's core: its claim table's per-parameter helped fraction
    (from the event files) equals the mean over parameters of helped / steps from the
    callback's own per_parameter_counts."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    try:
        import paper_figures
    finally:
        sys.path.pop(0)
    settings = paper_figures.Settings(steps=21, n_train=256, probe_size=64, nfa_every=10, batch_size=32)
    result = paper_figures.reproduce(tmp_path, ["fc"], settings)
    lca = result.trained["fc"].lca
    counts, steps = lca.per_parameter_counts, lca.per_parameter_steps
    assert set(steps.values()) == {21}
    helped = np.concatenate([(c[0].double() / steps[name]).numpy().ravel() for name, c in counts.items()])
    assert len(helped) == 64 * 100 + 100 + 100 * 100 + 100 + 100 * 10 + 10
    expected = float(helped.mean())
    assert result.analyses["fc"].summary.param_helped_fraction == pytest.approx(expected, rel=1e-6)
    row = next(c for c in result.claims["fc"] if c.claim == "per-parameter helped fraction")
    assert row.measured.startswith(f"mean {100 * expected:.1f} % over parameters")
    assert f"| {row.measured} |" in result.table
    median = float(np.median(helped))  # the claim's median, from the histogram's buckets (≈ 10 % wide near 0.5)
    assert float(row.measured.split("median ")[1].split(" %")[0]) == pytest.approx(100 * median, abs=6)
    for name in ("helped_fraction", "param_helped_fraction", "synchronisation", "lca_overlay", "nfa_alignment"):
        assert (tmp_path / "fc" / f"{name}.png").is_file(), name
