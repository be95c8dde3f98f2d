"""Optimizer-aware LCA through the callback: parts, the -lr g^2 identity, the ablation."""

import logging
import statistics

import pytest
import torch

from learnscope import LossChangeAllocation
from learnscope.functional.decompose import PARTS
from models import Classifier, MemoryLogger, digits_loader, trainer

MODULES = ("net.0", "net.2", "net.4")


def _fit(callback, optimizer, max_steps=25, precision="64-true", **options):
    torch.manual_seed(0)
    logger = MemoryLogger()
    t = trainer(callbacks=[callback], loggers=[logger], max_steps=max_steps, precision=precision)
    t.fit(Classifier(optimizer=optimizer, **options), digits_loader())
    return logger


CONFIGS = [
    ("sgd", dict(lr=0.05)),
    ("sgd", dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-3)),
    ("sgd", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3, maximize=False)),
    ("adam", dict(lr=1e-3, weight_decay=1e-2)),
    ("adam", dict(lr=1e-3, amsgrad=True)),
    ("adamw", dict(lr=1e-3, weight_decay=0.1, amsgrad=True)),
    ("rmsprop", dict(lr=1e-3, momentum=0.9, centered=True, weight_decay=1e-3)),
    ("adagrad", dict(lr=0.05, lr_decay=1e-3, weight_decay=1e-3)),
]


class _AnyOptimizer(Classifier):
    def configure_optimizers(self):
        classes = {
            "sgd": torch.optim.SGD,
            "adam": torch.optim.Adam,
            "adamw": torch.optim.AdamW,
            "rmsprop": torch.optim.RMSprop,
            "adagrad": torch.optim.Adagrad,
        }
        return classes[self.optimizer_name](self.parameters(), **self.optimizer_options)


@pytest.mark.parametrize("optimizer, options", CONFIGS, ids=[f"{o}-{i}" for i, (o, _) in enumerate(CONFIGS)])
def test_parts_sum_to_the_total_and_the_residual_vanishes(optimizer, options):
    torch.manual_seed(0)
    logger = MemoryLogger()
    callback = LossChangeAllocation(probe_size=256, per_step_series=True)  # per-module parts at every step
    trainer(callbacks=[callback], loggers=[logger], max_steps=12, precision="64-true").fit(
        _AnyOptimizer(optimizer=optimizer, **options), digits_loader()
    )
    series = logger.series
    for step, total in series["lca/total"].items():
        parts = {p: series[f"lca/part/{p}"][step] for p in PARTS}
        assert sum(parts.values()) == pytest.approx(total, rel=1e-6, abs=1e-15)
        assert abs(parts["residual"]) <= 1e-6 * sum(abs(v) for v in parts.values())
        for module in MODULES:
            module_parts = sum(series[f"lca/part/{p}/{module}"][step] for p in PARTS)
            assert module_parts == pytest.approx(series[f"lca/layer/{module}"][step], rel=1e-6, abs=1e-15)
    last = max(series["lca/total"])
    assert series["lca/part_cumulative/gradient"][last] == pytest.approx(
        sum(series["lca/part/gradient"].values()), rel=1e-9
    )


class _PartTensorSums(LossChangeAllocation):
    """Sums the per-part allocation tensors k ⊙ Δ_part of ``observe`` in float64, per step."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.sums = {}

    def observe(self, step, names, allocation, parts):
        sums = dict.fromkeys(PARTS, 0.0)
        for name in names:
            for part, tensor in parts(name).items():
                sums[part] += float(tensor.double().sum())
        self.sums[step] = sums


@pytest.mark.parametrize("precision", ["64-true", "32-true"])
@pytest.mark.parametrize("optimizer, options", CONFIGS, ids=[f"{o}-{i}" for i, (o, _) in enumerate(CONFIGS)])
def test_logged_parts_equal_the_sums_of_the_part_tensors(optimizer, options, precision):
    # The logged parts (fused dot products) against Σ k ⊙ Δ_part over the part tensors that
    # observe() receives (materialised by step_parts), both from the same k and Δ.
    # float64: regrouped float64 sums, ~1e-16 per term; float32: float32 denominators and
    # dots (2⁻²⁴ per rounding), bounded by 1e-5 of Σ|parts| with a wide margin.
    torch.manual_seed(0)
    logger = MemoryLogger()
    callback = _PartTensorSums(probe="batch", rule="first_order", histograms=False)
    trainer(callbacks=[callback], loggers=[logger], max_steps=6, precision=precision).fit(
        _AnyOptimizer(optimizer=optimizer, **options), digits_loader()
    )
    tol = 1e-10 if precision == "64-true" else 1e-5
    assert sorted(callback.sums) == sorted(logger.series["lca/total"])
    for step, expected in callback.sums.items():
        scale = sum(abs(v) for v in expected.values())
        for part in PARTS:
            assert logger.series[f"lca/part/{part}"][step] == pytest.approx(expected[part], abs=tol * scale)


class _GradientRecorder(LossChangeAllocation):
    """Keeps -lr * sum(g^2) per module, from the gradient the test reads itself."""

    def __init__(self, lr, **kwargs):
        super().__init__(**kwargs)
        self.lr, self.expected, self.per_parameter = lr, {}, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step - 1
        sums = {}
        for name, p in pl_module.named_parameters():
            module = name.rpartition(".")[0]
            sums[module] = sums.get(module, 0.0) - self.lr * float((p.grad.double() ** 2).sum())
        self.expected[step] = sums
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def observe(self, step, names, allocation, parts):
        self.per_parameter.append({name: {k: v.clone() for k, v in parts(name).items()} for name in names})


def test_plain_sgd_has_no_momentum_or_decay_part_and_the_gradient_part_is_minus_lr_g_squared():
    callback = _GradientRecorder(0.1, probe="batch", rule="first_order", per_step_series=True)
    series = _fit(callback, "sgd", lr=0.1).series
    assert set(series["lca/part/momentum"].values()) == {0.0}
    assert set(series["lca/part/weight_decay"].values()) == {0.0}
    for step, expected in callback.expected.items():
        for module in MODULES:
            assert series[f"lca/part/gradient/{module}"][step] == pytest.approx(expected[module], rel=1e-12)


def test_adam_gradient_part_never_hurts_while_momentum_sometimes_does():
    callback = _GradientRecorder(1e-3, probe="batch", rule="first_order")
    _fit(callback, "adam", lr=1e-3, max_steps=15)
    assert len(callback.per_parameter) == 15
    for step_parts in callback.per_parameter:
        for parts in step_parts.values():
            assert bool((parts["gradient"] <= 0).all())
    assert not any(bool((p["momentum"] != 0).any()) for p in callback.per_parameter[0].values())
    later_positive = sum(int((p["momentum"] > 0).sum()) for s in callback.per_parameter[1:] for p in s.values())
    assert later_positive > 0


class _HalfStepSGD(torch.optim.Optimizer):
    """An optimizer learnscope has no model for."""

    def __init__(self, params, lr=0.1):
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad.sign(), alpha=-group["lr"] * 0.01)
        return loss


class _CustomOptimizerModule(Classifier):
    def configure_optimizers(self):
        return _HalfStepSGD(self.parameters())


def test_unknown_optimizer_goes_to_the_residual_with_one_message(caplog):
    torch.manual_seed(0)
    logger = MemoryLogger()
    with caplog.at_level(logging.INFO):
        trainer(callbacks=[LossChangeAllocation(probe_size=256)], loggers=[logger], max_steps=8).fit(
            _CustomOptimizerModule(), digits_loader()
        )
    series = logger.series
    for step, total in series["lca/total"].items():
        assert series["lca/part/residual"][step] == pytest.approx(total, rel=1e-6)
        assert series["lca/part/gradient"][step] == 0.0
    messages = [r for r in caplog.records if "_HalfStepSGD" in r.getMessage()]
    assert len(messages) == 1


@pytest.mark.slow
def test_ablation_minibatch_first_order_helps_more_often_than_probe_simpson():
    callback = LossChangeAllocation(probe_size=512, ablation=True, histograms=False)
    series = _fit(callback, "sgd", max_steps=100, precision="32-true", lr=0.1, momentum=0.9).series
    corners = ("batch_first_order", "batch_simpson", "probe_first_order", "probe_simpson")
    for corner in corners:
        assert len(series[f"lca/ablation/{corner}/helped_fraction"]) == 100
    last = {p: series[f"lca/ablation/probe_simpson/part/{p}"][99] for p in PARTS}
    assert sum(last.values()) == pytest.approx(series["lca/total"][99], rel=1e-5)
    mean = {c: statistics.mean(series[f"lca/ablation/{c}/helped_fraction"].values()) for c in corners}
    assert mean["batch_first_order"] > mean["probe_simpson"]
    # the configured corner is the main measurement
    assert series["lca/ablation/probe_simpson/helped_fraction"] == series["lca/helped_fraction"]
