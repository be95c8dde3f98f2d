"""Acceptance tests of the NeuralFeatureAnsatz callback (issue #4) on the digits data.

The references are written here, independently of the library: AGOP from its
definition with ``torch.func.jacrev`` (each layer's own input as the free
variable), AGOP^α by an explicit eigendecomposition, Pearson by ``torch.corrcoef``.
"""

from __future__ import annotations

import importlib.util
import io
import math
import random
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2, metadata
from torch import nn
from torch.func import jacrev, vmap
from torch.utils.data import DataLoader, Dataset, TensorDataset

from learnscope import ProbeError
from learnscope.callbacks.nfa import NeuralFeatureAnsatz
from learnscope.functional.nfa import agop, preactivation_grams
from learnscope.render import TITLE_HEIGHT
from learnscope.tensorboard_layout import charts_matching
from models import Classifier, MemoryLogger, assert_bitwise_equal, digits, digits_loader, mlp, state_of, trainer

HIDDEN = ("net.0", "net.2")
READOUT = "net.4"
ALL_METRICS = {
    "pearson_a1",
    "cosine_a1",
    "pearson_a0.5",
    "cosine_a0.5",
    "null_a1",
    "null_a0.5",
    "null_se_a1",
    "null_se_a0.5",
    "null_draws",
    "excess_a1",
    "excess_a0.5",
    "sphericity",
    "sphericity_range",
    "align_a0.5",
    "stable_rank",
    "weight_change",
    "cnfa_pearson_a1",
}
READOUT_METRICS = {"pearson_a0.5", "cosine_a0.5", "align_a0.5", "stable_rank", "weight_change"}


# --------------------------------------------------------------------------- references


def reference_agop(net: nn.Sequential, index: int, x: torch.Tensor) -> torch.Tensor:
    """(1/n) Σ_x J(x)ᵀ J(x), J = ∂ net[index:](h)/∂h at h = net[:index](x), in float64."""
    net = _float64_copy(net)
    h = net[:index](x.double())
    jacobian = vmap(jacrev(net[index:]))(h)  # (n, c, d)
    return torch.einsum("ncd,nce->de", jacobian, jacobian) / h.shape[0]


def _float64_copy(net: nn.Sequential) -> nn.Sequential:
    copy = mlp().double().eval()
    copy.load_state_dict({k: v.double() for k, v in net.state_dict().items()})
    return copy.requires_grad_(False)


def reference_pearson(weight: torch.Tensor, agop_matrix: torch.Tensor, alpha: float) -> float:
    """Pearson of the flattened WᵀW and AGOP^α, AGOP^α by eigh (negative round-off → 0)."""
    eigenvalues, eigenvectors = torch.linalg.eigh(agop_matrix)
    powered = (eigenvectors * eigenvalues.clamp_min(0) ** alpha) @ eigenvectors.mT
    nfm = weight.double().mT @ weight.double()
    return float(torch.corrcoef(torch.stack([nfm.flatten(), powered.flatten()]))[0, 1])


# --------------------------------------------------------------------------- one shared run


@pytest.fixture(scope="module")
def fitted():
    """30 SGD-momentum steps on digits; probe = the first 300 images in chunks of 128, 128, 44."""
    x, y = digits()
    probe = DataLoader(TensorDataset(x[:300], y[:300]), batch_size=128)
    callback = NeuralFeatureAnsatz(every_n_steps=10, probe=probe)
    logger = MemoryLogger()
    torch.manual_seed(0)
    model = Classifier(optimizer="sgd", lr=0.1, momentum=0.9)
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer(callbacks=[callback], loggers=[logger], max_steps=30).fit(model, digits_loader())
    return dict(callback=callback, logger=logger, model=model, initial=initial, probe_inputs=x[:300])


def test_callback_gram_gives_the_jacrev_agop_of_every_layer(fitted):
    record, net = fitted["callback"].last_record, fitted["model"].net
    assert record.step == 30 and record.estimator == "exact"
    for index in (0, 2, 4):
        expected = reference_agop(net, index, fitted["probe_inputs"])
        measured = agop(net[index].weight, record.grams[f"net.{index}"])
        error = torch.linalg.matrix_norm(measured - expected) / torch.linalg.matrix_norm(expected)
        assert error < 1e-6, (index, float(error))  # float32 forward/backward, float64 sums
    # the readout's G is the identity: ∇_z f_j = e_j
    assert torch.allclose(record.grams[READOUT], torch.eye(10, dtype=torch.float64), atol=1e-12)


def test_logged_pearson_at_fit_end_equals_an_independent_computation(fitted):
    series, net = fitted["logger"].series, fitted["model"].net
    for name in HIDDEN:
        index = int(name.split(".")[1])
        expected_agop = reference_agop(net, index, fitted["probe_inputs"])
        for alpha, suffix in ((1.0, "a1"), (0.5, "a0.5")):
            expected = reference_pearson(net[index].weight.detach(), expected_agop, alpha)
            assert abs(series[f"nfa/{name}/pearson_{suffix}"][30] - expected) < 1e-4, (name, alpha)
        weight, initial = net[index].weight.detach().double(), fitted["initial"][f"{name}.weight"].double()
        change = float(torch.linalg.matrix_norm(weight - initial) / torch.linalg.matrix_norm(weight))
        assert series[f"nfa/{name}/weight_change"][30] == pytest.approx(change, rel=1e-6)


def test_readout_layer_logs_only_alpha_half_correlations_and_context(fitted):
    callback, series = fitted["callback"], fitted["logger"].series
    assert callback.readout == READOUT
    readout_tags = {tag.split("/")[2] for tag in series if tag.startswith(f"nfa/{READOUT}/")}
    assert readout_tags == READOUT_METRICS
    for name in HIDDEN:
        assert {tag.split("/")[2] for tag in series if tag.startswith(f"nfa/{name}/")} == ALL_METRICS


class _Temperature(nn.Module):
    """logits / T after the network: the last Linear's output is not the prediction tensor."""

    def __init__(self, net: nn.Module, temperature: float) -> None:
        super().__init__()
        self.net, self.temperature = net, temperature

    def forward(self, x):
        return self.net(x) / self.temperature


def test_a_readout_scaled_by_a_temperature_is_found_from_its_isotropic_gram():
    x, y = digits()
    callback = NeuralFeatureAnsatz(every_n_steps=10, probe=DataLoader(TensorDataset(x[:200], y[:200]), batch_size=100))
    logger = MemoryLogger()
    torch.manual_seed(0)
    model = Classifier(net=_Temperature(mlp(), 2.5), optimizer="sgd", lr=0.1)
    trainer(callbacks=[callback], loggers=[logger], max_steps=10).fit(model, digits_loader())
    readout = f"net.{READOUT}"
    assert callback.readout == readout
    expected = torch.eye(10, dtype=torch.float64) / 2.5**2  # G = s²·I with s = 1 / T
    assert torch.allclose(callback.last_record.grams[readout], expected, atol=1e-12)
    assert {t.split("/")[2] for t in logger.series if t.startswith(f"nfa/{readout}/")} == READOUT_METRICS
    for name in HIDDEN:  # the hidden layers' G are far from isotropic: all their metrics
        assert {t.split("/")[2] for t in logger.series if t.startswith(f"nfa/net.{name}/")} == ALL_METRICS


def test_measures_at_fit_start_every_n_steps_and_fit_end(fitted):
    series = fitted["logger"].series
    assert sorted(series["nfa/net.0/pearson_a1"]) == [0, 10, 20, 30]  # step 30 once, not again at fit end
    assert sorted(series["nfa/net.0/cnfa_pearson_a1"]) == [10, 20, 30]  # W − W₀ = 0 at step 0: undefined
    assert series["nfa/net.0/weight_change"][0] == 0.0
    assert set(series["nfa/skipped"].values()) == {0.0}


# --------------------------------------------------------------------------- Hutchinson


class Regressor(pl.LightningModule):
    """Mean squared error on (x, y) batches; SGD."""

    def __init__(self, net: nn.Module, lr: float = 0.05) -> None:
        super().__init__()
        self.net, self.lr = net, lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def test_auto_estimator_switches_to_hutchinson_for_a_hundred_outputs():
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(512, 20, generator=generator)
    y = torch.tanh(x @ torch.randn(20, 100, generator=generator))
    probe = DataLoader(TensorDataset(x[:256], y[:256]), batch_size=128)
    callback = NeuralFeatureAnsatz(every_n_steps=5, probe=probe, estimator="auto", num_probes=16)
    logger = MemoryLogger()
    torch.manual_seed(0)
    model = Regressor(nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 100)))
    trainer(callbacks=[callback], loggers=[logger], max_steps=5).fit(
        model, DataLoader(TensorDataset(x, y), batch_size=64)
    )
    assert callback.resolved_estimator == "hutchinson" and callback.last_record.estimator == "hutchinson"
    with torch.no_grad():
        exact = preactivation_grams(model.net.eval(), x[:256], ["0"])["0"]
    estimate = callback.last_record.grams["net.0"]
    relative = float(torch.linalg.matrix_norm(estimate - exact) / torch.linalg.matrix_norm(exact))
    assert relative < 0.15
    assert 0.0 < logger.series["nfa/net.0/pearson_a1"][5] <= 1.0
    assert "nfa/net.2/pearson_a1" not in logger.series  # the readout is found under Hutchinson too


# --------------------------------------------------------------------------- reproduction


def _load_example():
    path = Path(__file__).resolve().parents[1] / "examples" / "nfa_reproduction.py"
    spec = importlib.util.spec_from_file_location("nfa_reproduction", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_reproduction_hidden_layer_alignment_rises_from_initialisation():
    # 70 epochs = 770 SGD steps: past the plateau the rich regime escapes around step 500-600.
    history, callback, _ = _load_example().reproduce(epochs=70, every_n_steps=1000)
    series = history.series
    steps = sorted(series["nfa/skipped"])
    assert steps == [0, 770]
    assert callback.readout == "net.6"
    for name in ("net.2", "net.4"):  # the two 256×256 hidden layers
        start, end = (series[f"nfa/{name}/pearson_a1"][s] for s in steps)
        assert end > start + 0.2, (name, start, end)
        assert series[f"nfa/{name}/excess_a1"][770] > 0


# --------------------------------------------------------------------------- non-interference


class _DropoutBatchNormClassifier(Classifier):
    def __init__(self):
        super().__init__(net=mlp(dropout=0.3, batchnorm=True), optimizer="sgd", lr=0.05, momentum=0.9)

    def on_train_epoch_start(self):
        self.net[5].eval()  # the user keeps the second BatchNorm frozen: the probe must leave it so


def _train_state(callbacks, log_dir):
    torch.manual_seed(123)
    random.seed(5)
    np.random.seed(5)
    model = _DropoutBatchNormClassifier()
    t = trainer(callbacks=callbacks, loggers=[TensorBoardLogger(log_dir)], max_steps=25)
    t.fit(model, digits_loader(shuffle=True))
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    rng = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    return state_of(model, t.optimizers[0]), grads, rng, [m.training for m in model.modules()]


def test_training_with_the_callback_is_bitwise_identical(tmp_path):
    reference, grads, rng, modes = _train_state([], tmp_path / "off")
    callback = NeuralFeatureAnsatz(every_n_steps=4, probe_size=300, image_every_n_steps=8)
    probed, probed_grads, probed_rng, probed_modes = _train_state([callback], tmp_path / "on")
    assert callback.last_record is not None and callback.last_record.step == 25
    assert callback.last_record.matrices  # images were drawn at fit end
    assert_bitwise_equal(reference, probed)
    assert grads.keys() == probed_grads.keys()
    for name in grads:
        assert (grads[name] is None) == (probed_grads[name] is None)
        assert grads[name] is None or torch.equal(grads[name], probed_grads[name]), name
    assert torch.equal(rng[0], probed_rng[0]) and rng[1] == probed_rng[1]
    assert np.array_equal(rng[2], probed_rng[2])
    assert modes == probed_modes and not all(modes) and any(modes)
    assert any(k.startswith("buffer/") for k in reference) and any(k.startswith("optim/") for k in reference)


def test_standalone_validate_measures_under_inference_mode():
    x, y = digits()
    callback = NeuralFeatureAnsatz(every_n_steps=100, probe_size=256)
    torch.manual_seed(0)
    model = Classifier()
    fit_logger, validate_logger = MemoryLogger(), MemoryLogger()
    trainer(callbacks=[callback], loggers=[fit_logger], max_steps=4).fit(model, digits_loader())
    validator = trainer(callbacks=[callback], loggers=[validate_logger])
    assert validator.validate(model, DataLoader(TensorDataset(x[1500:], y[1500:]), batch_size=100), verbose=False)
    # a fresh trainer starts at step 0; the weights (and probe set) are those of fit end
    measured = validate_logger.series["nfa/net.2/pearson_a1"]
    assert list(measured) == [0]
    assert measured[0] == pytest.approx(fit_logger.series["nfa/net.2/pearson_a1"][4], abs=1e-12)


# --------------------------------------------------------------------------- event files


def test_event_files_hold_every_tag_histogram_and_image(tmp_path):
    torch.manual_seed(0)
    logger = TensorBoardLogger(tmp_path, name="run")
    callback = NeuralFeatureAnsatz(every_n_steps=5, probe_size=256, image_every_n_steps=10)
    trainer(callbacks=[callback], loggers=[logger], max_steps=12).fit(
        Classifier(optimizer="sgd", lr=0.05, momentum=0.9), digits_loader()
    )
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "histograms": 0, "images": 0, "tensors": 0})
    events.Reload()
    scalars, histograms, images = (set(events.Tags()[kind]) for kind in ("scalars", "histograms", "images"))
    expected = {"nfa/skipped", "nfa/probe_stochastic"}
    expected |= {f"nfa/{name}/{metric}" for name in HIDDEN for metric in ALL_METRICS}
    expected |= {f"nfa/{READOUT}/{metric}" for metric in READOUT_METRICS}
    assert {tag for tag in scalars if tag.startswith("nfa/")} == expected
    assert [e.step for e in events.Scalars("nfa/net.0/pearson_a1")] == [0, 5, 10, 12]
    # the determinism self-check's verdict, written once with the first measurement
    assert [(e.step, e.value) for e in events.Scalars("nfa/probe_stochastic")] == [(0, 0.0)]
    for name in (*HIDDEN, READOUT):
        # the readout's G = I: its spectrum would be all ones, so it is not logged
        assert (f"nfa/{name}/spectrum" in histograms) == (name != READOUT)
        assert f"nfa/{name}/matrices" in images
        assert [e.step for e in events.Images(f"nfa/{name}/matrices")] == [0, 10, 12]
    spectrum = events.Histograms("nfa/net.2/spectrum")[-1].histogram_value
    assert spectrum.num == 50  # rank of the 50×100 weight: one eigenvalue per direction of range(W)
    image = events.Images("nfa/net.0/matrices")[0]
    assert image.width > 3 * (image.height - 2 * TITLE_HEIGHT) > 0  # WᵀW, AGOP, AGOP^½ side by side, titled
    assert len(list(tmp_path.rglob("events.out.tfevents*"))) == 1
    # the custom-scalar layout (one event) charts every scalar logged, each layer's pearson beside its null
    layout = layout_pb2.Layout()
    (config,) = events.Tensors(metadata.CONFIG_SUMMARY_TAG)
    layout.ParseFromString(config.tensor_proto.string_val[0])
    for tag in expected:
        assert charts_matching(layout, tag), tag
    assert ("learnscope NFA", "net.2: pearson vs rotation null, α=1") in charts_matching(layout, "nfa/net.2/null_a1")


def _heatmap_panels_before_the_sink_drew_them(matrices, min_panel_pixels=128, gap=4):
    """``heatmap_panels`` as the callback drew the images itself (callbacks/nfa.py at 25deda3),
    verbatim: moving the drawing to the sink must not change a pixel."""
    panels = []
    for matrix in matrices:
        values = matrix.detach().to(torch.float32).cpu()
        scale = values.abs().max()
        values = values / scale if scale > 0 else values
        positive, negative = values.clamp(min=0), (-values).clamp(min=0)
        rgb = torch.stack([1 - negative, 1 - positive - negative, 1 - positive]).clamp(0, 1)
        factor = max(1, math.ceil(min_panel_pixels / max(values.shape)))
        panels.append(rgb.repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2))
    height = max(panel.shape[1] for panel in panels)
    separator = torch.full((3, height, gap), 0.5)
    row = []
    for panel in panels:
        if row:
            row.append(separator)
        padded = torch.ones(3, height, panel.shape[2])
        padded[:, : panel.shape[1]] = panel
        row.append(padded)
    return torch.cat(row, dim=2)


def _psd_power_before(matrix, alpha):
    """M^α as the callback formed AGOP^α for its images: eigh, eigenvalues ≤ r·ε·λ_max → 0."""
    if alpha == 1:
        return matrix
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    cutoff = matrix.shape[0] * torch.finfo(matrix.dtype).eps * eigenvalues.abs().max()
    powered = torch.where(eigenvalues > cutoff, eigenvalues.clamp_min(0) ** alpha, torch.zeros_like(eigenvalues))
    return (eigenvectors * powered) @ eigenvectors.mT


def _pixels(encoded_png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(encoded_png)).convert("RGB"))


def test_written_images_are_pixel_identical_to_the_images_the_callback_drew_before(tmp_path):
    from torch.utils.tensorboard.summary import image as image_summary

    torch.manual_seed(0)
    logger = TensorBoardLogger(tmp_path, name="run")
    callback = NeuralFeatureAnsatz(every_n_steps=5, probe_size=256, image_every_n_steps=10)
    model = Classifier(optimizer="sgd", lr=0.05, momentum=0.9)
    trainer(callbacks=[callback], loggers=[logger], max_steps=12).fit(model, digits_loader())
    record = callback.last_record  # fit end, step 12: images are always drawn there
    assert record.step == 12
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    for index, name in ((0, "net.0"), (2, "net.2"), (4, READOUT)):
        weight = model.net[index].weight.detach().to(torch.float64)
        agop_matrix = weight.mT @ record.grams[name] @ weight
        matrices = [weight.mT @ weight, agop_matrix, _psd_power_before(agop_matrix, 0.5)]
        expected = image_summary(name, _heatmap_panels_before_the_sink_drew_them(matrices), dataformats="CHW")
        written = events.Images(f"nfa/{name}/matrices")[-1]
        assert written.step == 12
        expected_pixels, written_pixels = (
            _pixels(expected.value[0].image.encoded_image_string),
            _pixels(written.encoded_image_string),
        )
        side = weight.shape[1] * math.ceil(128 / weight.shape[1])  # d×d panels enlarged to ≥ 128 pixels
        assert expected_pixels.shape == (side, 3 * side + 2 * 4, 3)
        # the panels sit between a title band and a colour-scale band, each TITLE_HEIGHT rows
        assert written_pixels.shape == (side + 2 * TITLE_HEIGHT, 3 * side + 2 * 4, 3)
        for band in (written_pixels[:TITLE_HEIGHT], written_pixels[-TITLE_HEIGHT:]):
            assert (band < 128).any(), "a title or scale band holds no text"
        written_pixels = written_pixels[TITLE_HEIGHT : TITLE_HEIGHT + side]
        assert np.array_equal(written_pixels, expected_pixels), name
        # a real picture: red (positive) and blue (negative) entries, not a blank
        assert (written_pixels[..., 2] < 128).any() and (written_pixels[..., 0] < 128).any()


class _ScaleOnly(pl.LightningModule):
    """No Linear or Conv layer anywhere."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(64))

    def forward(self, x):
        return x * self.scale

    def training_step(self, batch, batch_idx):
        x, _ = batch
        return (self(x) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_model_without_measurable_layers_warns_once_and_trains():
    logger = MemoryLogger()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(callbacks=[NeuralFeatureAnsatz(every_n_steps=1)], loggers=[logger], max_steps=3).fit(
            _ScaleOnly(), digits_loader()
        )
    ours = [w for w in caught if "NeuralFeatureAnsatz" in str(w.message)]
    assert len(ours) == 1 and "no measurable layer" in str(ours[0].message)
    assert not [tag for tag in logger.series if tag.startswith("nfa/")]


# --------------------------------------------------------------------------- skipped measurements


class _NaNInEval(nn.Module):
    """Identity in training; NaN in eval mode, where the probe measures."""

    def forward(self, x):
        return x if self.training else x * float("nan")


def test_non_finite_measurements_are_skipped_with_a_warning_each_and_training_goes_on():
    logger = MemoryLogger()
    torch.manual_seed(0)
    model = Classifier(net=nn.Sequential(*mlp(), _NaNInEval()))
    callback = NeuralFeatureAnsatz(every_n_steps=5, probe_size=128)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(callbacks=[callback], loggers=[logger], max_steps=10).fit(model, digits_loader())
    skipped = [w for w in caught if "skipped: non-finite" in str(w.message)]
    assert len(skipped) == 3 and callback.skipped == 3
    assert logger.series["nfa/skipped"] == {0: 1.0, 5: 2.0, 10: 3.0}
    assert not [tag for tag in logger.series if tag.startswith("nfa/net.")]
    assert all(math.isfinite(p.detach().sum()) for p in model.parameters())


# --------------------------------------------------------------------------- schedule and resume


def test_gradient_accumulation_measures_each_step_once():
    logger = MemoryLogger()
    torch.manual_seed(0)
    callback = NeuralFeatureAnsatz(every_n_steps=3, probe_size=128, null_draws=0)
    trainer(callbacks=[callback], loggers=[logger], max_steps=7, accumulate_grad_batches=2).fit(
        Classifier(), digits_loader()
    )
    assert sorted(logger.series["nfa/net.0/pearson_a1"]) == [0, 3, 6, 7]
    assert "nfa/net.0/null_a1" not in logger.series and "nfa/net.0/excess_a1" not in logger.series


def test_resume_restores_initial_weights_and_continues_exactly(tmp_path):
    torch.manual_seed(0)
    model = Classifier()
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    first = NeuralFeatureAnsatz(every_n_steps=5, probe_size=128)
    run = trainer(callbacks=[first], loggers=[MemoryLogger()], max_steps=5)
    run.fit(model, digits_loader(shuffle=False))
    run.save_checkpoint(tmp_path / "step5.ckpt")

    second = NeuralFeatureAnsatz(every_n_steps=5, probe_size=128)
    logger = MemoryLogger()
    resumed_model = Classifier()
    trainer(callbacks=[second], loggers=[logger], max_steps=10).fit(
        resumed_model, digits_loader(shuffle=False), ckpt_path=tmp_path / "step5.ckpt"
    )
    for name, weight in second.initial_weights.items():
        assert torch.equal(weight, initial[f"{name}.weight"]), name
    assert sorted(logger.series["nfa/net.0/weight_change"]) == [10]  # step 5 was measured before the save
    weight = resumed_model.net[0].weight.detach().double()
    change = torch.linalg.matrix_norm(weight - initial["net.0.weight"].double()) / torch.linalg.matrix_norm(weight)
    assert logger.series["nfa/net.0/weight_change"][10] == pytest.approx(float(change), rel=1e-6)


def test_non_finite_initial_weights_leave_out_weight_change_and_the_run_goes_on(tmp_path):
    """A checkpoint whose saved W₀ of one layer is not finite: that layer's weight_change and
    centred NFA are left out (undefined), everything else is measured, training goes on."""
    torch.manual_seed(0)
    first = NeuralFeatureAnsatz(every_n_steps=5, probe_size=128)
    run = trainer(callbacks=[first], loggers=[MemoryLogger()], max_steps=5)
    run.fit(Classifier(), digits_loader(shuffle=False))
    run.save_checkpoint(tmp_path / "step5.ckpt")
    checkpoint = torch.load(tmp_path / "step5.ckpt", weights_only=False)
    state = checkpoint["callbacks"][first.state_key]
    state["initial_weights"]["net.0"] = torch.full_like(state["initial_weights"]["net.0"], float("nan"))
    torch.save(checkpoint, tmp_path / "broken.ckpt")

    logger = MemoryLogger()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(callbacks=[NeuralFeatureAnsatz(every_n_steps=5, probe_size=128)], loggers=[logger], max_steps=10).fit(
            Classifier(), digits_loader(shuffle=False), ckpt_path=tmp_path / "broken.ckpt"
        )
    ours = [str(w.message) for w in caught if "initial weight" in str(w.message)]
    assert len(ours) == 1 and "'net.0' is not finite" in ours[0]
    assert sorted(logger.series["nfa/net.0/pearson_a1"]) == [10]
    assert "nfa/net.0/weight_change" not in logger.series and "nfa/net.0/cnfa_pearson_a1" not in logger.series
    assert sorted(logger.series["nfa/net.2/weight_change"]) == [10]
    assert sorted(logger.series["nfa/net.2/cnfa_pearson_a1"]) == [10]


def test_state_key_separates_instances_with_different_flags():
    keys = {
        NeuralFeatureAnsatz().state_key,
        NeuralFeatureAnsatz(alphas=[2.0]).state_key,
        NeuralFeatureAnsatz(layers=["net.0"]).state_key,
    }
    assert len(keys) == 3


# --------------------------------------------------------------------------- batches and outputs


class _DictDigits(Dataset):
    def __init__(self, n=512):
        self.x, self.y = digits()
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        return {"pixels": self.x[index], "label": self.y[index]}


class _DictClassifier(Classifier):
    def forward(self, pixels):
        return self.net(pixels)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(pixels=batch["pixels"]), batch["label"])


def test_dict_batches_are_passed_as_keyword_arguments_without_labels():
    logger = MemoryLogger()
    torch.manual_seed(0)
    callback = NeuralFeatureAnsatz(every_n_steps=2, probe_size=128)
    trainer(callbacks=[callback], loggers=[logger], max_steps=2).fit(
        _DictClassifier(), DataLoader(_DictDigits(), batch_size=64)
    )
    assert callback.readout == READOUT
    assert sorted(logger.series["nfa/net.0/pearson_a1"]) == [0, 2]


class _Graph:
    """A structured input (not a tensor, tuple or dict): the default input_fn cannot read it."""

    def __init__(self, nodes):
        self.nodes = nodes


def _graph_loader():
    x, y = digits()

    def collate(items):
        return _Graph(torch.stack([item[0] for item in items])), torch.stack([item[1] for item in items])

    return DataLoader(TensorDataset(x[:256], y[:256]), batch_size=64, collate_fn=collate)


class _GraphClassifier(Classifier):
    def training_step(self, batch, batch_idx):
        graph, y = batch
        return nn.functional.cross_entropy(self(graph.nodes), y)


def test_unreadable_batch_fails_at_the_first_measurement_naming_input_fn():
    with pytest.raises(ProbeError, match="pass input_fn="):
        trainer(callbacks=[NeuralFeatureAnsatz(probe_size=64)], max_steps=2).fit(_GraphClassifier(), _graph_loader())
    callback = NeuralFeatureAnsatz(every_n_steps=2, probe_size=64, input_fn=lambda batch: batch[0].nodes)
    trainer(callbacks=[callback], max_steps=2).fit(_GraphClassifier(), _graph_loader())
    assert callback.last_record.step == 2


class _DictOutputClassifier(Classifier):
    def forward(self, x):
        return {"scores": self.net(x)}

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x)["scores"], y)


def test_unreadable_output_fails_naming_output_fn_and_output_fn_fixes_it():
    with pytest.raises(ProbeError, match="output_fn"):
        trainer(callbacks=[NeuralFeatureAnsatz(probe_size=64)], max_steps=2).fit(
            _DictOutputClassifier(), digits_loader()
        )
    callback = NeuralFeatureAnsatz(every_n_steps=2, probe_size=64, output_fn=lambda out: out["scores"])
    trainer(callbacks=[callback], max_steps=2).fit(_DictOutputClassifier(), digits_loader())
    assert callback.readout == READOUT  # the dict entry is the readout layer's output tensor itself


class _NoForward(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = mlp()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_module_without_forward_fails_at_setup_saying_so():
    with pytest.raises(ProbeError, match="does not define forward"):
        trainer(callbacks=[NeuralFeatureAnsatz()], max_steps=1).fit(_NoForward(), digits_loader())


# --------------------------------------------------------------------------- flags


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(every_n_steps=0), "every_n_steps must be an int >= 1"),
        (dict(every_n_steps=True), "every_n_steps must be an int"),
        (dict(probe="batch"), "probe must be one of 'train', 'val'"),
        (dict(probe_size=0), "probe_size must be an int >= 1"),
        (dict(probe_batch_size=2.5), "probe_batch_size must be an int"),
        (dict(layers="net.0"), "layers must be None or a list of glob patterns"),
        (dict(alphas=[]), "alphas must be a non-empty list of positive finite floats"),
        (dict(alphas=[1.0, -0.5]), "each of alphas must be a positive finite float"),
        (dict(alphas=0.5), "alphas must be a non-empty list"),
        (dict(null_draws=-1), 'null_draws must be an int >= 0 or "auto"'),
        (dict(input_fn="x"), "input_fn must be None or a callable"),
        (dict(output_fn=3), "output_fn must be None or a callable"),
        (dict(estimator="sketch"), "estimator must be one of 'exact', 'hutchinson', 'auto'"),
        (dict(num_probes=0), "num_probes must be an int >= 1"),
        (dict(images="yes"), "images must be True or False"),
        (dict(image_every_n_steps=0), "image_every_n_steps must be an int >= 1"),
    ],
)
def test_bad_flags_raise_at_construction_naming_the_flag(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NeuralFeatureAnsatz(**kwargs)
