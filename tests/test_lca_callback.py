"""Acceptance tests of the LossChangeAllocation callback on the digits data."""

import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from learnscope import LossChangeAllocation, ProbeError
from models import Classifier, MemoryLogger, assert_bitwise_equal, digits, digits_loader, mlp, state_of, trainer


def _fit(callback, optimizer="sgd", max_steps=200, model=None, loader=None, **optimizer_options):
    torch.manual_seed(0)
    logger = MemoryLogger()
    model = model or Classifier(optimizer=optimizer, **(optimizer_options or {"lr": 0.05}))
    trainer(callbacks=[callback] if callback else [], loggers=[logger], max_steps=max_steps).fit(
        model, loader or digits_loader()
    )
    return logger, model


# -- 1. Simpson within 1 % of the real loss change; first order worse -------------------------


@pytest.mark.slow
@pytest.mark.parametrize("optimizer, options", [("sgd", dict(lr=0.05, momentum=0.9)), ("adam", dict(lr=1e-3))])
def test_simpson_cumulative_relative_error_below_one_percent_and_below_first_order(optimizer, options):
    errors = {}
    for rule in ("simpson", "first_order"):
        callback = LossChangeAllocation(rule=rule, probe="train", probe_size=1024)
        logger, _ = _fit(callback, optimizer, **options)
        assert len(logger.series["lca/total"]) == 200
        errors[rule] = callback.cumulative_relative_error
        assert logger.series["lca/cumulative_relative_error"][199] == pytest.approx(errors[rule], rel=1e-12)
    assert errors["simpson"] < 0.01
    assert errors["first_order"] > 3 * errors["simpson"]


# -- 2. delta_loss equals direct probe-loss evaluation ----------------------------------------


class _RecordParameters(pl.Callback):
    """The test's own record of θ_t and θ_{t+1} around every step."""

    def __init__(self):
        self.before, self.after = {}, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before[trainer.global_step] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after[trainer.global_step - 1] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


@pytest.mark.parametrize("precision, dtype", [("64-true", torch.float64), ("32-true", torch.float32)])
def test_logged_delta_loss_matches_direct_evaluation(precision, dtype):
    x, y = digits(torch.float32)
    probe = DataLoader(TensorDataset(x[:700], y[:700]), batch_size=256)
    recorder = _RecordParameters()
    callback = LossChangeAllocation(probe=probe, rule="simpson")
    logger = MemoryLogger()
    torch.manual_seed(0)
    model = Classifier(optimizer="sgd", lr=0.1, momentum=0.9)
    trainer(callbacks=[recorder, callback], loggers=[logger], max_steps=30, precision=precision).fit(
        model, digits_loader()
    )
    net = mlp().to(dtype)
    names = [n.removeprefix("net.") for n, _ in model.named_parameters()]

    def probe_loss(params):
        loss = 0.0
        for xb, yb in probe:
            out = torch.func.functional_call(net, dict(zip(names, params.values())), (xb.to(dtype),))
            loss += float(nn.functional.cross_entropy(out, yb)) * len(xb) / 700
        return loss

    delta, total, error = (logger.series[f"lca/{k}"] for k in ("delta_loss", "total", "abs_error"))
    assert sorted(delta) == list(range(30))
    for step in range(30):
        before, after = probe_loss(recorder.before[step]), probe_loss(recorder.after[step])
        expected = after - before
        if dtype == torch.float64:
            assert delta[step] == pytest.approx(expected, rel=1e-8, abs=0)
        else:
            assert abs(delta[step] - expected) <= 8 * torch.finfo(torch.float32).eps * abs(before)
        assert abs(delta[step] - total[step]) == pytest.approx(error[step], rel=1e-9, abs=1e-15)


# -- 3. the -lr g^2 identity of the cheap mode ------------------------------------------------


def test_minibatch_first_order_plain_sgd_never_hurts():
    callback = LossChangeAllocation(probe="batch", rule="first_order")
    logger, model = _fit(callback, "sgd", max_steps=60, lr=0.1)
    hurt, helped = logger.series["lca/hurt_fraction"], logger.series["lca/helped_fraction"]
    assert len(hurt) == 60 and set(hurt.values()) == {0.0}
    assert all(v == 0.0 for tag, s in logger.series.items() if tag.startswith("lca/hurt_fraction/") for v in s.values())
    assert set(logger.series["lca/helped_fraction_nonzero"].values()) == {1.0}
    # weights reading always-blank pixels get zero gradient and allocate exactly 0
    x, _ = digits()
    blank_pixels = int((x.abs().sum(0) == 0).sum())
    assert blank_pixels > 0
    n_params = sum(p.numel() for p in model.parameters())
    zero_fraction = [1 - helped[s] - hurt[s] for s in helped]
    assert min(zero_fraction) >= 100 * blank_pixels / n_params - 1e-12
    assert all(v <= 0 for v in logger.series["lca/total"].values())
    for tag in ("lca/delta_loss", "lca/abs_error", "lca/cumulative_relative_error"):
        assert tag not in logger.series


# -- 4. training is bitwise untouched ---------------------------------------------------------


class _DropoutBatchNormClassifier(Classifier):
    def __init__(self):
        super().__init__(net=mlp(dropout=0.3, batchnorm=True), optimizer="sgd", lr=0.05, momentum=0.9)


def _train_state(callbacks, max_steps=40):
    torch.manual_seed(123)
    model = _DropoutBatchNormClassifier()
    t = trainer(callbacks=callbacks, loggers=[MemoryLogger()], max_steps=max_steps)
    t.fit(model, digits_loader(shuffle=True))
    return state_of(model, t.optimizers[0]), torch.get_rng_state(), [m.training for m in model.modules()]


@pytest.mark.parametrize(
    "flags",
    [
        dict(rule="simpson"),
        dict(rule="adaptive", tolerance=1e-4, every_n_steps=3),
        dict(probe="batch", rule="first_order"),
        dict(probe="batch", rule="trapezoid"),
    ],
    ids=["simpson", "adaptive", "cheap", "batch-trapezoid"],
)
def test_training_with_the_callback_is_bitwise_identical(flags):
    reference, rng, modes = _train_state([])
    probed, probed_rng, probed_modes = _train_state([LossChangeAllocation(probe_size=300, **flags)])
    assert_bitwise_equal(reference, probed)
    assert torch.equal(rng, probed_rng)
    assert modes == probed_modes
    assert any(k.startswith("buffer/") for k in reference) and any(k.startswith("optim/") for k in reference)


# -- 5. every tag reaches the event files -----------------------------------------------------


def test_event_files_hold_every_tag(tmp_path):
    torch.manual_seed(0)
    logger = TensorBoardLogger(tmp_path, name="run")
    t = trainer(callbacks=[LossChangeAllocation(probe_size=256)], loggers=[logger], max_steps=12, log_every_n_steps=5)
    t.fit(Classifier(optimizer="sgd", lr=0.05, momentum=0.9), digits_loader())
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    scalars, histograms = set(events.Tags()["scalars"]), set(events.Tags()["histograms"])
    expected = {
        f"lca/{k}"
        for k in (
            "total",
            "delta_loss",
            "abs_error",
            "splits",
            "helped_fraction",
            "hurt_fraction",
            "cumulative_relative_error",
        )
    }
    for module in ("net.0", "net.2", "net.4"):
        expected |= {f"lca/{k}/{module}" for k in ("layer", "layer_cumulative", "helped_fraction", "hurt_fraction")}
        assert f"lca/hist/{module}" in histograms
    assert expected <= scalars
    assert [e.step for e in events.Scalars("lca/total")] == list(range(12))
    # histograms at most every log_every_n_steps
    assert [e.step for e in events.Histograms("lca/hist/net.0")] == [0, 5, 10]
    # no dict-valued metrics: a single run directory
    assert len([p for p in tmp_path.rglob("events.out.tfevents*")]) == 1


class _WhenLogger(MemoryLogger):
    """A MemoryLogger that also notes the trainer's global_step at each write."""

    def __init__(self) -> None:
        super().__init__()
        self.trainer: pl.Trainer | None = None
        self.written_at: dict[int, int] = {}

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        super().log_metrics(metrics, step)
        if "lca/total" in metrics:
            self.written_at[int(step)] = self.trainer.global_step


class _FailAt(Classifier):
    def __init__(self, fail_at: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.fail_at = fail_at

    def training_step(self, batch, batch_idx):
        if self.global_step == self.fail_at:
            raise RuntimeError("user code failed")
        return super().training_step(batch, batch_idx)


def _fit_logged(log_every_n_steps, model=None, max_steps=12, **flags):
    torch.manual_seed(0)
    logger = _WhenLogger()
    # writes counted in steps only, however slow the machine
    callback = LossChangeAllocation(probe="batch", rule="first_order", flush_seconds=math.inf, **flags)
    t = trainer(callbacks=[callback], loggers=[logger], max_steps=max_steps, log_every_n_steps=log_every_n_steps)
    logger.trainer = t
    t.fit(model or Classifier(optimizer="adam", lr=1e-3), digits_loader())
    return logger


def test_scalars_are_written_a_batch_of_steps_at_a_time_with_every_step_and_value_unchanged():
    # per-step series: log_every_n_steps also sets the windows of the per-layer series
    batched, each = _fit_logged(5, per_step_series=True), _fit_logged(1, per_step_series=True)
    lca_tags = {tag for tag in each.series if tag.startswith("lca/")}
    assert len(lca_tags) > 10 and lca_tags == {tag for tag in batched.series if tag.startswith("lca/")}
    for tag in lca_tags:
        assert batched.series[tag] == each.series[tag], tag  # same steps, bitwise the same values
    assert sorted(batched.written_at) == list(range(12))
    lags = [batched.written_at[step] - step for step in range(12)]
    assert max(lags) <= 5  # nothing waits longer than log_every_n_steps
    assert sorted(set(batched.written_at.values())) == [5, 10, 12]  # three writes: steps 0-4, 5-9, 10-11
    assert sorted(set(each.written_at.values())) == list(range(1, 13))  # log_every_n_steps=1: every step
    # measuring every 3rd step, the wait is still counted in steps: steps 0 and 3 are written after step 4
    sparse = _fit_logged(5, every_n_steps=3)
    assert sparse.written_at == {0: 5, 3: 5, 6: 11, 9: 11}


def test_scalars_measured_before_an_exception_still_reach_the_logger():
    logger = _WhenLogger()
    torch.manual_seed(0)
    t = trainer(
        callbacks=[LossChangeAllocation(probe="batch", rule="first_order")],
        loggers=[logger],
        max_steps=12,
        log_every_n_steps=50,
    )
    logger.trainer = t
    with pytest.raises(RuntimeError, match="user code failed"):
        t.fit(_FailAt(7, optimizer="adam", lr=1e-3), digits_loader())
    assert sorted(logger.series["lca/total"]) == list(range(7))


def test_a_logger_failing_after_the_run_failed_does_not_mask_the_runs_exception():
    class BrokenAfterFailure(MemoryLogger):
        broken = False

        def log_metrics(self, metrics, step=None):
            if self.broken:
                raise OSError("disk full")
            super().log_metrics(metrics, step)

    class Fail(_FailAt):
        def training_step(self, batch, batch_idx):
            if self.global_step == self.fail_at:
                logger.broken = True
            return super().training_step(batch, batch_idx)

    logger = BrokenAfterFailure()
    torch.manual_seed(0)
    t = trainer(
        # by steps only: under load a 2 s flush could write every step before the failure
        callbacks=[LossChangeAllocation(probe="batch", rule="first_order", flush_seconds=math.inf)],
        loggers=[logger],
        max_steps=12,
        log_every_n_steps=50,
    )
    with (
        pytest.warns(UserWarning, match="could not write the last steps' scalars .OSError: disk full"),
        pytest.raises(RuntimeError, match="user code failed"),
    ):
        t.fit(Fail(7, optimizer="adam", lr=1e-3), digits_loader())


def test_a_checkpoint_finds_every_step_it_counts_already_logged(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Spy(pl.Callback):
        def __init__(self, logger):
            self.logger, self.seen = logger, []

        def on_save_checkpoint(self, trainer, pl_module, checkpoint):
            self.seen.append((trainer.global_step, sorted(self.logger.series["lca/total"])))

    logger = MemoryLogger()
    spy = Spy(logger)
    torch.manual_seed(0)
    t = trainer(
        callbacks=[
            LossChangeAllocation(probe="batch", rule="first_order"),
            spy,
            ModelCheckpoint(tmp_path, every_n_train_steps=4, save_top_k=-1),
        ],
        loggers=[logger],
        max_steps=12,
        log_every_n_steps=50,
        enable_checkpointing=True,
    )
    t.fit(Classifier(optimizer="adam", lr=1e-3), digits_loader())
    assert [g for g, _ in spy.seen] == [4, 8, 12]
    for global_step, logged in spy.seen:
        assert logged == list(range(global_step))


def test_deferred_log_writes_at_once_when_the_oldest_entry_is_older_than_max_delay():
    from types import SimpleNamespace

    from learnscope._logging import DeferredLog

    logger = MemoryLogger()
    fake = SimpleNamespace(is_global_zero=True, loggers=[logger], global_step=0)
    patient, hurried = DeferredLog(max_delay=3600.0), DeferredLog(max_delay=0.0)
    for step in range(3):
        fake.global_step = step + 1
        patient.add(fake, step, {"a": float(step)})
        patient.flush_if_due(fake, every=100)
        hurried.add(fake, step, {"b": float(step)})
        hurried.flush_if_due(fake, every=100)
    assert logger.series["b"] == {0: 0.0, 1: 1.0, 2: 2.0} and "a" not in logger.series and len(patient) == 3
    patient.flush(fake)
    assert logger.series["a"] == {0: 0.0, 1: 1.0, 2: 2.0} and len(patient) == 0
    off_rank_zero = DeferredLog()
    off_rank_zero.add(SimpleNamespace(is_global_zero=False, loggers=[logger]), 0, {"c": 1.0})
    assert len(off_rank_zero) == 0


# -- flags and their validation ---------------------------------------------------------------


def test_every_n_steps_measures_the_steps_divisible_by_n_and_reuses_nothing_stale():
    callback = LossChangeAllocation(every_n_steps=4, probe_size=512)
    logger, _ = _fit(callback, "sgd", max_steps=21, lr=0.05, momentum=0.9)
    assert sorted(logger.series["lca/total"]) == [0, 4, 8, 12, 16, 20]
    assert callback.cumulative_relative_error < 0.01


def test_endpoint_gradients_are_reused_between_consecutive_steps():
    calls = []

    def loss_fn(module, batch):
        calls.append(1)
        x, y = batch
        return nn.functional.cross_entropy(module(x), y)

    callback = LossChangeAllocation(probe_size=512, probe_batch_size=256, loss_fn=loss_fn)
    _fit(callback, "sgd", max_steps=10, lr=0.05)
    chunks = 2
    self_check = 2  # the determinism self-check: one chunk's loss under two random streams, once per run
    assert len(calls) == chunks * (1 + 2 * 10) + self_check  # g(θ_0) once, then midpoint + end per step


def test_adaptive_rule_meets_the_tolerance_on_each_step():
    callback = LossChangeAllocation(rule="adaptive", tolerance=1e-5, probe_size=256)
    logger, _ = _fit(callback, "sgd", max_steps=20, lr=0.5, momentum=0.9)
    for step, error in logger.series["lca/abs_error"].items():
        assert error <= 1e-5 or logger.series["lca/splits"][step] == 32
    assert max(logger.series["lca/splits"].values()) > 2


def test_val_probe_uses_the_validation_data():
    x, y = digits()
    val = DataLoader(TensorDataset(x[1500:], y[1500:]), batch_size=100)
    callback = LossChangeAllocation(probe="val", probe_size=None)
    torch.manual_seed(0)
    logger = MemoryLogger()
    trainer(callbacks=[callback], loggers=[logger], max_steps=5, limit_val_batches=0).fit(
        Classifier(), digits_loader(), val
    )
    assert callback.probe_samples == 297
    assert len(logger.series["lca/delta_loss"]) == 5


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(every_n_steps=0), "every_n_steps must be an int >= 1"),
        (dict(probe="test"), "probe must be one of 'train', 'val', 'batch'"),
        (dict(probe_size=0), "probe_size must be an int >= 1"),
        (dict(probe_batch_size=2.5), "probe_batch_size must be an int"),
        (dict(rule="rk4"), "rule must be one of 'first_order', 'trapezoid', 'simpson', 'adaptive'"),
        (dict(tolerance=-1.0), "tolerance must be a positive finite float"),
        (dict(loss_fn="mse"), "loss_fn must be a callable"),
        (dict(histograms="yes"), "histograms must be True or False"),
        (dict(compile_statistics="auto"), "compile_statistics must be True or False or None"),
        (dict(modules="net.0"), "modules must be None or a list of glob patterns"),
    ],
)
def test_bad_flags_raise_at_construction_naming_the_flag(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LossChangeAllocation(**kwargs)


def test_modules_restricts_the_reported_layers_but_not_the_total():
    callback = LossChangeAllocation(modules=["net.4"], probe_size=256)
    logger, _ = _fit(callback, "sgd", max_steps=10, lr=0.05)
    layer_tags = {t for t in logger.series if t.startswith("lca/layer/")}
    assert layer_tags == {"lca/layer/net.4"}
    assert callback.cumulative_relative_error < 0.01


class _ManualModule(Classifier):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        x, y = batch
        self.manual_backward(nn.functional.cross_entropy(self(x), y))
        opt.step()


def test_manual_optimization_without_loss_fn_fails_in_setup_naming_loss_fn():
    with pytest.raises(ProbeError, match="loss_fn"):
        _fit(LossChangeAllocation(), model=_ManualModule(), max_steps=2)


def test_val_probe_without_validation_data_fails_in_setup():
    with pytest.raises(ProbeError, match="probe='val'"):
        _fit(LossChangeAllocation(probe="val"), max_steps=2)


def test_a_run_without_any_logger_still_measures():
    callback = LossChangeAllocation(probe_size=128)
    torch.manual_seed(0)
    trainer(callbacks=[callback], loggers=False, max_steps=5).fit(Classifier(), digits_loader())
    assert set(callback.cumulative) == {"net.0", "net.2", "net.4"}
    assert math.isfinite(callback.cumulative_relative_error)


def test_presets_set_their_flags_and_explicit_flags_win():
    cheap = LossChangeAllocation(preset="cheap")
    assert (cheap.probe, cheap.rule, cheap.histograms, cheap.decompose) == ("batch", "first_order", False, False)
    paper = LossChangeAllocation(preset="paper", probe_size=512)
    assert (paper.probe, paper.rule, paper.tolerance, paper.probe_size) == ("train", "adaptive", 1e-3, 512)
    assert LossChangeAllocation(preset="cheap", rule="trapezoid").rule == "trapezoid"
    # a flag you set wins also when it equals the default
    cheap_split = LossChangeAllocation(preset="cheap", decompose=True, histograms=True)
    assert (cheap_split.probe, cheap_split.rule, cheap_split.decompose, cheap_split.histograms) == (
        "batch",
        "first_order",
        True,
        True,
    )
    assert LossChangeAllocation(preset="paper", rule="simpson").rule == "simpson"
    assert LossChangeAllocation(preset="cheap", probe="train").probe == "train"
    # without a preset, unset flags take the documented defaults
    plain = LossChangeAllocation()
    assert (plain.probe, plain.probe_size, plain.rule, plain.tolerance, plain.histograms, plain.decompose) == (
        "train",
        1024,
        "simpson",
        1e-3,
        True,
        True,
    )
    # probe_size (None: the whole set) counts as unset at its default value
    assert LossChangeAllocation(preset="paper").probe_size is None
    assert LossChangeAllocation(preset="paper", probe_size=1024).probe_size is None
    with pytest.raises(ValueError, match="preset must be one of 'cheap', 'default', 'paper'"):
        LossChangeAllocation(preset="fast")


def test_the_cheap_preset_runs_no_extra_gradient_pass():
    calls = []

    def loss_fn(module, batch):
        calls.append(1)
        return nn.functional.cross_entropy(module(batch[0]), batch[1])

    logger, _ = _fit(LossChangeAllocation(preset="cheap", loss_fn=loss_fn), "sgd", max_steps=5, lr=0.05)
    assert calls == [] and len(logger.series["lca/total"]) == 5


class _AllocationRecorder(LossChangeAllocation):
    """Keeps every measured step's allocations A = k ⊙ Δ, all parameters in one vector."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.allocations = {}

    def observe(self, step, names, allocation, parts):
        self.allocations[step] = torch.cat([allocation.allocation(n).detach().double().reshape(-1) for n in names])


def _direct_excess_kurtosis(a: torch.Tensor) -> float:
    centred = a - a.mean()
    return float(a.numel() * (centred**4).sum() / (centred**2).sum() ** 2 - 3.0)


def test_excess_kurtosis_tags_equal_direct_computations_over_all_and_over_nonzero_allocations():
    # digits' always-blank pixels give the first layer exact-zero gradients: A = 0 there
    callback = _AllocationRecorder(probe_size=256, histograms=False)
    logger, _ = _fit(callback, "sgd", max_steps=6, lr=0.05, momentum=0.9)
    series = logger.series
    assert sorted(series["lca/excess_kurtosis_nonzero"]) == sorted(callback.allocations)
    for step, a in callback.allocations.items():
        nonzero = a[a != 0]
        assert 0 < nonzero.numel() < a.numel()
        assert series["lca/excess_kurtosis"][step] == pytest.approx(_direct_excess_kurtosis(a), rel=1e-6)
        expected = _direct_excess_kurtosis(nonzero)
        assert series["lca/excess_kurtosis_nonzero"][step] == pytest.approx(expected, rel=1e-6)
        assert series["lca/excess_kurtosis_nonzero"][step] < series["lca/excess_kurtosis"][step]
