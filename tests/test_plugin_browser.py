"""The learnscope tab in a real browser: a real run (digits MLP, both callbacks), a real
``python -m tensorboard.main`` on a loopback port, headless Chromium driven by Playwright.

Skips (with the reason) only when Playwright or a Chromium binary cannot be found;
.ci/run installs Debian's ``chromium`` for it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("playwright", reason="playwright is not installed (pip install playwright)")

from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import learnscope
from models import Classifier, digits_loader, trainer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from screenshot_plugin import chromium_page, find_chromium, open_learnscope_tab, tensorboard_server

CHROMIUM = find_chromium()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="no Chromium binary found (apt-get install -y chromium)"),
]
STEPS = 30


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A small real run: LCA every step (with its parts), NFA every 10 steps with images."""
    root = tmp_path_factory.mktemp("browser")
    lca = learnscope.LossChangeAllocation(probe_size=256, decompose=True)
    nfa = learnscope.NeuralFeatureAnsatz(every_n_steps=10, probe_size=256, null_draws=4)
    logger = TensorBoardLogger(str(root), name="digits")
    fit = trainer([lca, nfa], loggers=logger, max_steps=STEPS, log_every_n_steps=1)
    fit.fit(Classifier(optimizer="sgd", lr=0.05, momentum=0.9), digits_loader(batch_size=64))
    logger.experiment.flush()
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return root, events


def last_values(events: EventAccumulator, prefix: str) -> dict[str, float]:
    return {
        tag[len(prefix) :]: events.Scalars(tag)[-1].value for tag in events.Tags()["scalars"] if tag.startswith(prefix)
    }


def test_the_tab_shows_one_row_per_layer_with_the_event_files_totals(run):
    root, events = run
    totals = last_values(events, "lca/layer_cumulative/")
    nfa_layers = {tag.split("/")[1] for tag in events.Tags()["scalars"] if tag.endswith("/pearson_a0.5")}
    assert set(totals) == {"net.0", "net.2", "net.4"} and nfa_layers == set(totals)
    errors: list[str] = []
    with tensorboard_server(root) as url, chromium_page(CHROMIUM) as page:
        page.on("pageerror", lambda error: errors.append(str(error)))
        frame = open_learnscope_tab(page, url)
        rows = frame.locator("tr.ls-lca-row")
        assert rows.count() == len(totals)
        shown = {rows.nth(i).get_attribute("data-layer"): rows.nth(i) for i in range(rows.count())}
        assert set(shown) == set(totals)
        for layer, row in shown.items():
            assert float(row.get_attribute("data-total")) == totals[layer]  # the stored float32, exactly
            assert float(row.locator("td.total").inner_text()) == pytest.approx(totals[layer], rel=1e-3)
        assert frame.locator("tr.ls-nfa-row").count() == len(nfa_layers)
        relative_error = events.Scalars("lca/cumulative_relative_error")[-1].value
        status = frame.locator(".banner").get_attribute("data-status")
        assert status == ("ok" if relative_error <= 0.01 else "bad")
        images = frame.locator(".nfa-image img")
        assert images.count() >= 1
        frame.wait_for_function("[...document.querySelectorAll('.nfa-image img')].every(i => i.complete)")
        assert frame.evaluate("document.querySelector('.nfa-image img').naturalWidth") > 0
        frame.fill("#ls-filter", r"net\.[02]$")
        assert sorted(frame.locator("tr.ls-lca-row").evaluate_all("rows => rows.map(r => r.dataset.layer)")) == [
            "net.0",
            "net.2",
        ]
    assert errors == []
