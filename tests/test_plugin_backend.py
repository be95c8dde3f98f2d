"""The learnscope TensorBoard plugin's routes, without a browser: JSON shapes and values
against the event file (read independently with TensorBoard's EventAccumulator), the
server-side downsampling, the health banner, and a hostile-input sweep of every route."""

from __future__ import annotations

import gzip
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend import application
from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins import base_plugin
from tensorboard.util import tensor_util
from werkzeug import test as werkzeug_test
from werkzeug import wrappers

from learnscope.tensorboard_plugin import LearnscopePlugin
from learnscope.tensorboard_plugin.columns import MAX_COLUMNS

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import plugin_synthetic_run as synthetic

LAYERS, STEPS, UNITS = 6, 40, 16
ROUTE = "/data/plugin/learnscope"


def f32(x: float) -> float:
    """A value as TensorBoard stores a scalar (float32)."""
    return float(np.float32(x))


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("plugin")
    synthetic.write_run(root / "good", layers=LAYERS, steps=STEPS, units=UNITS)
    synthetic.write_run(root / "inexact", layers=2, steps=10, relative_error=0.05)
    synthetic.write_run(root / "long", layers=2, steps=1234, nfa_every=1000, unit_layers=1, units=4)
    return root


def serve(logdir: Path, scalars_kept: int = 0):
    """The plugin on ``logdir`` behind TensorBoard's WSGI app; TensorBoard keeps a
    reservoir sample of ``scalars_kept`` points per scalar series (0: all)."""
    multiplexer = plugin_event_multiplexer.EventMultiplexer(
        tensor_size_guidance={"scalars": scalars_kept, "images": 0, synthetic.UNIT_PLUGIN: 0}
    )
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, str(logdir))
    plugin = LearnscopePlugin(base_plugin.TBContext(logdir=str(logdir), data_provider=provider))
    return werkzeug_test.Client(application.TensorBoardWSGI([plugin]), wrappers.Response), multiplexer


@pytest.fixture(scope="module")
def client(logdir):
    return serve(logdir)[0]


def events(path: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(path), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def scalar_series(accumulator: EventAccumulator, tag: str) -> tuple[list[int], list[float]]:
    found = accumulator.Scalars(tag)
    return [e.step for e in found], [e.value for e in found]


def get_json(client, route: str, **query):
    response = client.get(f"{ROUTE}/{route}", query_string=query)
    assert response.status_code == 200, response.get_data(as_text=True)
    return json.loads(response.get_data())


def test_routes_are_a_fixed_set_and_the_plugin_does_not_import_torch():
    assert set(LearnscopePlugin(base_plugin.TBContext()).get_plugin_apps()) == {
        "/index.js", "/style.css", "/runs", "/lca", "/nfa", "/units", "/image"
    }  # fmt: skip
    code = "import sys, learnscope.tensorboard_plugin; print(sorted({'torch', 'lightning'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_frontend_files_are_served_from_the_package(client):
    for name, kind in (("index.js", "text/javascript"), ("style.css", "text/css")):
        response = client.get(f"{ROUTE}/{name}")
        assert response.status_code == 200 and response.mimetype == kind
        body = response.get_data().replace(b"http://www.w3.org/2000/svg", b"")  # the SVG namespace, not a URL
        assert b"http://" not in body and b"https://" not in body and b"import " not in body  # no network, no CDN


def test_pyproject_registers_the_plugin_and_ships_its_frontend():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    entry = project["project"]["entry-points"]["tensorboard_plugins"]["learnscope"]
    module, _, name = entry.partition(":")
    assert getattr(__import__(module, fromlist=[name]), name) is LearnscopePlugin
    shipped = project["tool"]["setuptools"]["package-data"]["learnscope.tensorboard_plugin"]
    assert {"static/*.js", "static/*.css"} <= set(shipped)


def test_runs_lists_each_run_with_its_layers(client):
    runs = {run["name"]: run for run in get_json(client, "runs")["runs"]}
    assert set(runs) == {"good", "inexact", "long"}
    names = [synthetic.module_name(i) for i in range(LAYERS)]
    assert sorted(runs["good"]["lca"]) == sorted(names)
    assert sorted(runs["good"]["nfa"]) == sorted(names)
    assert runs["good"]["units"] == sorted(names[:2])
    assert runs["good"]["max_step"] == STEPS - 1 and runs["long"]["max_step"] == 1233


def test_lca_totals_and_per_step_values_equal_the_event_file(client, logdir):
    data = get_json(client, "lca", run="good")
    accumulator = events(logdir / "good")
    assert data["columns"] == {"first": list(range(STEPS)), "last": list(range(STEPS)), "downsampled": False}
    assert len(data["layers"]) == LAYERS
    for layer in data["layers"]:
        name = layer["name"]
        _, cumulative = scalar_series(accumulator, f"lca/layer_cumulative/{name}")
        assert layer["total"] == cumulative[-1]  # exactly the stored float32
        # the running sum of the per-step values read (float32 each)
        assert layer["cumulative"] == pytest.approx(cumulative, abs=1e-6 * max(map(abs, cumulative)))
        index = [synthetic.module_name(i) for i in range(LAYERS)].index(name)
        expected = [f32(synthetic.lca_value(index, s)) for s in range(STEPS)]
        assert layer["per_step"] == pytest.approx(expected, rel=1e-6)
        assert layer["parts"]["gradient"] == pytest.approx(0.7 * math.fsum(expected), rel=1e-5)
        _, helped = scalar_series(accumulator, f"lca/helped_fraction/{name}")
        assert layer["helped_mean"] == pytest.approx(sum(helped) / len(helped), rel=1e-9)
        assert layer["complete"] is True
    assert data["health"]["status"] == "ok"
    assert data["health"]["values"]["cumulative_relative_error"] == pytest.approx(0.002, rel=1e-6)


def test_long_runs_are_downsampled_to_column_sums(client, logdir):
    data = get_json(client, "lca", run="long")
    columns = data["columns"]
    assert columns["downsampled"] and len(columns["first"]) == MAX_COLUMNS
    # 1234 steps in 500 columns of 2 or 3 consecutive steps, none left out
    sizes = [b - a + 1 for a, b in zip(columns["first"], columns["last"])]
    assert set(sizes) == {2, 3} and sum(sizes) == 1234 and columns["first"][0] == 0 and columns["last"][-1] == 1233
    accumulator = events(logdir / "long")
    for layer in data["layers"]:
        steps, values = scalar_series(accumulator, f"lca/layer/{layer['name']}")
        _, cumulative = scalar_series(accumulator, f"lca/layer_cumulative/{layer['name']}")
        by_step = dict(zip(steps, values))
        for i, (a, b) in enumerate(zip(columns["first"], columns["last"])):
            assert layer["per_step"][i] == pytest.approx(math.fsum(by_step[s] for s in range(a, b + 1)), rel=1e-6)
            assert layer["cumulative"][i] == pytest.approx(cumulative[b], abs=1e-6 * abs(cumulative[-1]))
        assert math.fsum(layer["per_step"]) == pytest.approx(layer["total"], rel=1e-5)


def test_when_tensorboard_keeps_a_sample_columns_are_increases_of_the_cumulative(logdir):
    client, multiplexer = serve(logdir, scalars_kept=100)
    data = get_json(client, "lca", run="long")
    assert any("kept a sample" in note for note in data["health"]["notes"])
    last_steps = data["columns"]["last"]
    for layer in data["layers"]:
        assert not layer["complete"] and layer["points"] == 100
        kept = {
            e.step: float(tensor_util.make_ndarray(e.tensor_proto))
            for e in multiplexer.Tensors("long", f"lca/layer_cumulative/{layer['name']}")
        }
        assert layer["total"] == kept[max(kept)]  # the last point is always kept
        assert all(v is not None for v in layer["per_step"])
        prefix = np.cumsum(layer["per_step"])  # the cumulative series at each column's last step
        scale = max(abs(v) for v in kept.values())
        for j, step in enumerate(last_steps):
            if step in kept:
                assert prefix[j] == pytest.approx(kept[step], abs=1e-6 * scale)
        assert sum(step in kept for step in last_steps) > 10
        assert prefix[-1] == pytest.approx(layer["total"], rel=1e-5)


def test_the_health_banner_turns_red_with_the_reason(client):
    health = get_json(client, "lca", run="inexact")["health"]
    assert health["status"] == "bad"
    assert any("relative error 0.05 > 0.01" in reason for reason in health["reasons"])


def test_nfa_series_and_matrices_image_equal_the_event_file(client, logdir):
    data = get_json(client, "nfa", run="good")
    accumulator = events(logdir / "good")
    layer = next(item for item in data["layers"] if item["name"] == synthetic.module_name(0))
    for metric in ("pearson_a1", "pearson_a0.5", "null_a1", "null_se_a1", "excess_a0.5"):
        steps, values = scalar_series(accumulator, f"nfa/{layer['name']}/{metric}")
        assert layer["series"][metric] == {"steps": steps, "values": pytest.approx(values, rel=1e-7)}
    assert layer["image_steps"] == [e.step for e in accumulator.Images(f"nfa/{layer['name']}/matrices")]
    step = layer["image_steps"][-1]
    response = client.get(f"{ROUTE}/image", query_string={"run": "good", "layer": layer["name"], "step": str(step)})
    assert response.status_code == 200 and response.mimetype == "image/png"
    expected = next(e for e in accumulator.Images(f"nfa/{layer['name']}/matrices") if e.step == step)
    assert response.get_data() == expected.encoded_image_string


def test_units_route_gives_the_unit_by_step_matrix(client):
    name = synthetic.module_name(1)
    data = get_json(client, "units", run="good", layer=name)
    assert data["units"] == UNITS and data["units_per_row"] == 1
    expected = np.array([synthetic.unit_values(1, s, UNITS) for s in range(STEPS)], dtype=np.float32).T
    np.testing.assert_allclose(np.array(data["values"]), expected, rtol=1e-6)


BAD_TEXT = [
    "../../../../etc/passwd",
    "..%2F..%2Fetc%2Fpasswd",
    "/etc/passwd",
    "good/../good",
    "good\x00",
    "9" * 5000,
    "x" * 100_000,
    "${7*7}{{7*7}}__import__('os')",
    "<script>alert(1)</script>",
]
BAD_STEPS = ["-1", "1e3", "0x10", "9" * 13, "99999999999999999999999", "1.5", " 1", "٣", ""]


def assert_clean_400(response) -> None:
    body = response.get_data(as_text=True)
    assert response.status_code == 400, (response.status_code, body[:200])
    assert "Traceback" not in body and "File " not in body and len(body) < 300
    assert "<script>" not in body  # the input is never echoed


@pytest.mark.parametrize("route", ["lca", "nfa", "units", "image"])
def test_every_route_answers_hostile_input_with_a_short_400(client, route):
    good_layer = synthetic.module_name(0)
    for bad in BAD_TEXT:
        assert_clean_400(client.get(f"{ROUTE}/{route}", query_string={"run": bad, "layer": good_layer, "step": "0"}))
        if route in ("units", "image"):
            assert_clean_400(client.get(f"{ROUTE}/{route}", query_string={"run": "good", "layer": bad, "step": "0"}))
    # missing, repeated and non-UTF-8 parameters (raw bytes and percent-encoded)
    assert_clean_400(client.get(f"{ROUTE}/{route}"))
    assert_clean_400(client.get(f"{ROUTE}/{route}?run=good&run=long&layer={good_layer}&step=0"))
    assert_clean_400(client.get(f"{ROUTE}/{route}?run=%ff%fe%00&layer=%c3%28&step=%80"))
    environ = werkzeug_test.EnvironBuilder(path=f"{ROUTE}/{route}").get_environ()
    environ["QUERY_STRING"] = b"run=\xff\xfe&layer=\xc3\x28&step=\x80".decode("latin-1")
    assert_clean_400(client.open(environ))
    if route == "image":
        for step in BAD_STEPS:
            assert_clean_400(
                client.get(f"{ROUTE}/image", query_string={"run": "good", "layer": good_layer, "step": step})
            )


def test_no_route_serves_a_path(client):
    for path in ("/index.js/../../../etc/passwd", "/..%2f..%2fetc%2fpasswd", "/static/index.js", "/style.css%00.js"):
        response = client.get(ROUTE + path)
        assert response.status_code == 404, path
        assert b"root:" not in response.get_data()


def test_responses_are_gzipped_json_without_nan(client):
    response = client.get(f"{ROUTE}/lca", query_string={"run": "good"}, headers={"Accept-Encoding": "gzip"})
    assert response.headers["Content-Encoding"] == "gzip"
    text = gzip.decompress(response.get_data()).decode()
    json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in the JSON"))


# ---------- a real run: two LCA callbacks (lca, lca_val), NFA, windows, unit tensors ----------
REAL_STEPS, REAL_EVERY = 23, 5


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """A real tiny fit on digits: ``lca`` (unit allocations), ``lca_val`` and ``nfa``,
    per-layer series once per logging window of 5 steps, 23 steps."""
    pytest.importorskip("lightning")
    pytest.importorskip("sklearn")
    from lightning.pytorch.loggers import TensorBoardLogger

    import learnscope
    import models

    root = tmp_path_factory.mktemp("plugin_real")
    callbacks = [
        learnscope.LossChangeAllocation(probe_size=64, unit_allocations=True),
        learnscope.LossChangeAllocation(name="lca_val", probe_size=64),
        learnscope.NeuralFeatureAnsatz(every_n_steps=10, probe_size=64, images=False),
    ]
    model = models.Classifier(models.mlp((64, 12, 10)))
    logger = TensorBoardLogger(root, name="mlp", version=0)
    models.trainer(callbacks, [logger], max_steps=REAL_STEPS, log_every_n_steps=REAL_EVERY).fit(
        model, models.digits_loader(batch_size=32, n=256)
    )
    return root, events(root / "mlp" / "version_0")


def test_every_callback_root_is_a_section_with_the_event_file_totals(real_run):
    root, accumulator = real_run
    client = serve(root)[0]
    sections = {s["name"]: s for s in get_json(client, "runs")["runs"]}
    assert set(sections) == {"mlp/version_0", "mlp/version_0 · lca_val"}
    main, val = sections["mlp/version_0"], sections["mlp/version_0 · lca_val"]
    assert (main["root"], val["root"]) == ("lca", "lca_val") and main["roots"] == ["lca", "nfa"]
    assert main["nfa"] and not val["nfa"] and main["units"] and not val["units"]
    for section in (main, val):
        view = get_json(client, "lca", run=section["run"], root=section["root"])
        for layer in view["layers"]:
            tag = f"{section['root']}/layer_cumulative/{layer['name']}"
            assert layer["total"] == pytest.approx(scalar_series(accumulator, tag)[1][-1], rel=1e-6)
    for route in ("lca", "nfa", "units"):
        response = client.get(
            f"{ROUTE}/{route}", query_string={"run": "mlp/version_0", "root": "lca_test", "layer": "x"}
        )
        assert response.status_code == 400 and b"unknown root" in response.get_data()


def test_windowed_columns_are_the_event_file_window_sums(real_run):
    root, accumulator = real_run
    view = get_json(serve(root)[0], "lca", run="mlp/version_0", root="lca")
    steps, windows = scalar_series(accumulator, "lca/window_steps")
    assert view["window_steps"] == REAL_EVERY == max(windows) and sum(windows) == REAL_STEPS
    assert view["columns"]["first"] == steps and not view["columns"]["downsampled"]
    for layer in view["layers"]:
        tag_steps, values = scalar_series(accumulator, f"lca/layer/{layer['name']}")
        assert tag_steps == steps
        np.testing.assert_allclose(layer["per_step"], values, rtol=1e-6)
    # the page says what a column is
    js = (Path(__file__).resolve().parent.parent / "src/learnscope/tensorboard_plugin/static/index.js").read_text()
    assert "one column per logging window of ${w} measured steps (window sums" in js


def test_units_from_a_real_run_are_the_callbacks_unit_tensors(real_run):
    root, accumulator = real_run
    client = serve(root)[0]
    data = get_json(client, "units", run="mlp/version_0", root="lca", layer="net.0")
    found = accumulator.Tensors("lca/unit/net.0")
    expected = np.array([tensor_util.make_ndarray(e.tensor_proto) for e in found]).T
    assert data["units"] == 12 and data["columns"]["last"] == [e.step for e in found]
    np.testing.assert_allclose(data["values"], expected, rtol=1e-6)
