"""LCA is correct and harmless in every training setup users have (issue 5)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from learnscope import LossChangeAllocation, NeuralFeatureAnsatz, ProbeError
from learnscope._probe import collect_batches
from learnscope.functional import allocate_step, gradient_evaluator
from learnscope.functional.nfa import nfa_metrics, preactivation_grams
from models import Classifier, MemoryLogger, assert_bitwise_equal, digits, digits_loader, mlp, state_of, trainer

SCRIPTS = Path(__file__).parent / "scripts"


def _probe_loss(net, chunks, total):
    """The probe loss written out by hand: Σ_c n_c/N CE(net(x_c), y_c), BatchNorm on chunk statistics."""

    def loss_fn(params):
        buffers = {n: b.clone() for n, b in net.named_buffers()}
        loss = 0.0
        for x, y in chunks:
            out = torch.func.functional_call(net, (params, buffers), (x,))
            loss = loss + nn.functional.cross_entropy(out, y) * (len(x) / total)
        return loss

    return loss_fn


# -- 1. gradient accumulation -----------------------------------------------------------------


def test_gradient_accumulation_integrates_once_per_optimizer_step():
    callback = LossChangeAllocation(probe_size=512)
    torch.manual_seed(0)
    logger = MemoryLogger()
    trainer(callbacks=[callback], loggers=[logger], max_steps=20, accumulate_grad_batches=4).fit(
        Classifier(optimizer="sgd", lr=0.05, momentum=0.9), digits_loader(batch_size=32)
    )
    assert sorted(logger.series["lca/total"]) == list(range(20))
    assert callback.cumulative_relative_error < 0.01


def test_minibatch_probe_under_accumulation_uses_all_micro_batches():
    seen = []

    def loss_fn(module, batch):
        seen.append(len(batch[0]))
        x, y = batch
        return nn.functional.cross_entropy(module(x), y)

    callback = LossChangeAllocation(probe="batch", rule="trapezoid", loss_fn=loss_fn, decompose=False)
    torch.manual_seed(0)
    trainer(callbacks=[callback], loggers=[MemoryLogger()], max_steps=3, accumulate_grad_batches=4).fit(
        Classifier(), digits_loader(batch_size=32)
    )
    # 3 steps × (start + end) × 4 micro-batches of 32, and the determinism self-check's two
    # evaluations of the first micro-batch on the first step
    assert seen == [32] * (24 + 2)


# -- 2. manual optimization, two optimizers, a raw optimizer ----------------------------------


class _TwoOptimizers(Classifier):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def configure_optimizers(self):
        return (
            torch.optim.SGD(self.net[:2].parameters(), lr=0.05, momentum=0.9),
            torch.optim.Adam(self.net[2:].parameters(), lr=1e-3),
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        for opt in self.optimizers():
            opt.zero_grad()
            self.manual_backward(nn.functional.cross_entropy(self(x), y))
            opt.step()


class _RawOptimizer(Classifier):
    """Steps a torch optimizer it made itself, outside Lightning's bookkeeping."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.raw = None

    def configure_optimizers(self):
        self.raw = torch.optim.SGD(self.parameters(), lr=0.05)
        return self.raw

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.raw.zero_grad()
        self.manual_backward(nn.functional.cross_entropy(self(x), y))
        self.raw.step()


def _ce(module, batch):
    x, y = batch
    return nn.functional.cross_entropy(module(x), y)


class _RecordSteps(pl.Callback):
    def __init__(self):
        self.params = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.params[batch_idx] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


def test_manual_optimization_with_two_optimizers_allocates_each_step_to_its_parameters():
    x, y = digits()
    probe = DataLoader(TensorDataset(x[:512], y[:512]), batch_size=256)
    callback = LossChangeAllocation(probe=probe, loss_fn=_ce, per_step_series=True)
    torch.manual_seed(0)
    logger = MemoryLogger()
    model = _TwoOptimizers()
    trainer(callbacks=[callback], loggers=[logger], max_steps=10).fit(model, digits_loader())
    series = logger.series
    # Lightning counts each optimizer step: SGD moves net.0 on even steps, Adam net.2 / net.4 on odd ones
    assert sorted(series["lca/total"]) == list(range(10))
    assert set(series["lca/layer/net.0"]) == set(range(0, 10, 2))
    assert set(series["lca/layer/net.4"]) == set(range(1, 10, 2))
    assert callback.cumulative_relative_error < 0.01


def test_a_raw_optimizer_stepped_by_the_module_is_measured_against_direct_loss_evaluation():
    x, y = digits()
    probe = DataLoader(TensorDataset(x[:512], y[:512]), batch_size=256)
    callback = LossChangeAllocation(probe=probe, loss_fn=_ce)
    recorder = _RecordSteps()
    torch.manual_seed(0)
    model = _RawOptimizer()
    trainer(
        callbacks=[recorder, callback], loggers=[MemoryLogger()], max_steps=5, max_epochs=1, limit_train_batches=5
    ).fit(model, digits_loader(shuffle=False))
    assert callback.measured_steps == 5
    net = mlp()
    loss_fn = _probe_loss(net, [(x[:256], y[:256]), (x[256:512], y[256:512])], 512)
    names = lambda p: {k.removeprefix("net."): v for k, v in p.items()}  # noqa: E731
    direct = loss_fn(names(dict(model.named_parameters()))) - loss_fn(names(recorder.params[0]))
    assert callback.run_totals.sum_delta_loss == pytest.approx(float(direct), rel=1e-5)
    assert callback.cumulative_relative_error < 0.01


# -- 3. LBFGS -----------------------------------------------------------------------------------


class _LBFGS(Classifier):
    def configure_optimizers(self):
        return torch.optim.LBFGS(self.parameters(), lr=0.1, max_iter=4)


def test_lbfgs_gets_one_allocation_per_real_step():
    calls = []

    class Count(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            calls.append(trainer.global_step)

    callback = LossChangeAllocation(probe_size=512)
    torch.manual_seed(0)
    logger = MemoryLogger()
    trainer(callbacks=[Count(), callback], loggers=[logger], max_steps=8).fit(_LBFGS(), digits_loader(batch_size=256))
    assert len(calls) > 8  # the closure ran several times per step
    assert sorted(logger.series["lca/total"]) == list(range(8))
    assert callback.cumulative_relative_error < 0.01


# -- 4. gradient clipping -------------------------------------------------------------------------


def test_clipping_the_gradient_part_uses_the_clipped_gradient():
    class Clipped(LossChangeAllocation):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.max_norm = []

        def observe(self, step, names, allocation, parts):
            g = torch.cat([allocation.path_gradient[n].reshape(-1) for n in names])
            self.max_norm.append(float(g.norm()))

    callback = Clipped(probe="batch", rule="first_order")
    torch.manual_seed(0)
    logger = MemoryLogger()
    trainer(
        callbacks=[callback], loggers=[logger], max_steps=10, gradient_clip_val=0.05, gradient_clip_algorithm="norm"
    ).fit(Classifier(optimizer="sgd", lr=0.1), digits_loader())
    assert max(callback.max_norm) <= 0.05 * (1 + 1e-5)
    series = logger.series
    for step, total in series["lca/total"].items():
        # plain SGD on the clipped gradient: the step is exactly the gradient part
        assert series["lca/part/gradient"][step] == pytest.approx(total, rel=1e-5)
        assert abs(series["lca/part/residual"][step]) <= 1e-5 * abs(total)


# -- 8. DDP, 2 processes, gloo ----------------------------------------------------------------


@pytest.mark.slow
def test_ddp_totals_equal_one_process_on_the_same_probe_set(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / "lca_ddp.py"), str(tmp_path), "2"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]  # BatchNorm buffers differ between ranks; the values do not
    assert set(ranks[0]["nfa"]) == {"net.0", "net.3", "net.6"}
    params = torch.load(tmp_path / "params.pt")
    net = mlp(batchnorm=True)
    loader = digits_loader(batch_size=64, shuffle=False)
    chunks = collect_batches(loader, 600, 128)
    evaluate = gradient_evaluator(_probe_loss(net, chunks, 600))
    for step, recorded in params.items():
        end = {n.removeprefix("net."): t for n, t in recorded["end"].items()}
        start = {n: end[n] - recorded["delta"]["net." + n] for n in end}
        single = allocate_step(evaluate, start, end, rule="simpson")
        assert ranks[0]["totals"][str(step)] == pytest.approx(single.total, rel=1e-5)
        assert ranks[0]["delta_losses"][str(step)] == pytest.approx(single.delta_loss, rel=1e-5)
    events = list(tmp_path.rglob("events.out.tfevents*"))
    assert len(events) == 1  # written once, by rank 0
    # NFA: every rank holds the same metrics, equal to one process at rank 0's weights and buffers
    final = torch.load(tmp_path / "final.pt")
    model = Classifier(net=mlp(batchnorm=True))
    model.load_state_dict(final["state"])
    model.eval()
    inputs = torch.cat([x for x, _ in chunks])
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    grams = preactivation_grams(model, inputs, layers)
    for name in ("net.0", "net.3"):
        weight = layers[name].weight.detach().double()
        expected = nfa_metrics(weight, grams[name], initial_weight=final["initial"][name].double(), null_draws=0)
        for metric in ("pearson_a1", "pearson_a0.5", "sphericity", "weight_change"):
            assert ranks[0]["nfa"][name][metric] == pytest.approx(expected[metric], rel=1e-5)


# -- 5. mixed precision ---------------------------------------------------------------------------


SENTINEL = 1e4


class _Poisonable(Classifier):
    """Emits inf logits for any sample whose first pixel is the sentinel."""

    def forward(self, x):
        out = self.net(x)
        return out + torch.where(x[:, :1] == SENTINEL, torch.inf, 0.0).to(out.dtype)


def _poisoned_loader(batch_size=64, poisoned_batch=3):
    x, y = digits()
    x = x.clone()
    x[poisoned_batch * batch_size, 0] = SENTINEL
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def _clean_probe():
    x, y = digits()
    return DataLoader(TensorDataset(x[1000:1512], y[1000:1512]), batch_size=256)


def test_bf16_mixed_on_cpu_measures_in_float32():
    callback = LossChangeAllocation(probe_size=512)
    torch.manual_seed(0)
    logger = MemoryLogger()
    trainer(callbacks=[callback], loggers=[logger], max_steps=15, precision="bf16-mixed").fit(
        Classifier(optimizer="sgd", lr=0.05, momentum=0.9), digits_loader()
    )
    assert len(logger.series["lca/total"]) == 15
    assert callback.cumulative_relative_error < 0.01  # float32 probe math, not bf16


def test_fp16_grad_scaler_skipped_step_is_a_zero_change_and_counted():
    callback = LossChangeAllocation(probe=_clean_probe())
    torch.manual_seed(0)
    logger = MemoryLogger()
    plugin = MixedPrecision("16-mixed", "cpu")
    trainer(callbacks=[callback], loggers=[logger], max_steps=8, plugins=[plugin]).fit(
        _Poisonable(optimizer="sgd", lr=0.05), _poisoned_loader()
    )
    series = logger.series
    assert callback.skipped_steps == 1
    assert series["lca/skipped_steps"][3] == 1.0
    assert series["lca/total"][3] == 0.0 and series["lca/delta_loss"][3] == 0.0
    assert sorted(series["lca/total"]) == list(range(8))
    assert all(math.isfinite(v) for v in series["lca/total"].values())
    assert math.isfinite(callback.cumulative_relative_error) and callback.cumulative_relative_error < 0.01


# -- 6. non-finite probe values ---------------------------------------------------------------------


class _PoisonTheProbe(pl.Callback):
    """Makes the model emit NaN during the probe passes of one marked step only."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        pl_module.emit_nan = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        pl_module.emit_nan = trainer.global_step - 1 == self.step


class _NaNModel(Classifier):
    emit_nan = False

    def forward(self, x):
        out = self.net(x)
        return out * torch.nan if self.emit_nan else out


def _run_nan(callbacks):
    torch.manual_seed(0)
    model = _NaNModel(optimizer="sgd", lr=0.05, momentum=0.9)
    logger = MemoryLogger()
    t = trainer(callbacks=callbacks, loggers=[logger], max_steps=10)
    t.fit(model, digits_loader())
    return state_of(model, t.optimizers[0]), logger


def test_a_nan_probe_value_skips_the_step_with_one_warning_and_training_goes_on():
    reference, _ = _run_nan([_PoisonTheProbe(4)])
    callback = LossChangeAllocation(probe_size=256)
    with pytest.warns(UserWarning, match="step 4 skipped: non-finite") as record:
        probed, logger = _run_nan([_PoisonTheProbe(4), callback])
    assert len([w for w in record if "skipped" in str(w.message)]) == 1
    assert_bitwise_equal(reference, probed)
    assert callback.skipped_steps == 1
    assert 4 not in logger.series["lca/total"] and len(logger.series["lca/total"]) == 9
    assert all(math.isfinite(v) for v in callback.cumulative.values())
    assert math.isfinite(callback.cumulative_relative_error)


# -- 7. checkpoint and resume -----------------------------------------------------------------------


def _resume_run(tmp_path, stop_after_epochs=None, ckpt=None):
    torch.manual_seed(0)
    # two instances need distinct tag roots (name=): unnamed, they would write the same tags
    callbacks = [
        LossChangeAllocation(probe_size=256),
        LossChangeAllocation(probe_size=256, rule="first_order", name="lca_first_order"),
    ]
    logger = MemoryLogger()
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_epochs=1)
    t = trainer(
        callbacks=[*callbacks, checkpoint],
        loggers=[logger],
        max_steps=-1,
        max_epochs=stop_after_epochs or 2,
        enable_checkpointing=True,
        limit_train_batches=10,
    )
    t.fit(Classifier(optimizer="adam", lr=1e-3), digits_loader(shuffle=False), ckpt_path=ckpt)
    return callbacks, logger


def test_resume_continues_cumulative_values_exactly_and_two_instances_coexist(tmp_path):
    uninterrupted, full_log = _resume_run(tmp_path / "a")
    _resume_run(tmp_path / "b", stop_after_epochs=1)
    resumed, resumed_log = _resume_run(tmp_path / "c", ckpt=str(tmp_path / "b" / "last.ckpt"))
    assert sorted(resumed_log.series["lca/total"]) == list(range(10, 20))
    for tag in ("lca/layer_cumulative/net.0", "lca/layer_cumulative/net.4", "lca/cumulative_relative_error"):
        assert resumed_log.series[tag][19] == pytest.approx(full_log.series[tag][19], rel=1e-6)
    for a, b in zip(uninterrupted, resumed):
        assert a.state_key == b.state_key
        assert b.cumulative == pytest.approx(a.cumulative, rel=1e-6)
        assert b.cumulative_relative_error == pytest.approx(a.cumulative_relative_error, rel=1e-6)
        # log_every_n_steps=50: one histogram step (0) in 20 steps, also across the resume at step 10
        assert a.run_totals.last_histogram_step == b.run_totals.last_histogram_step == 0
    assert resumed[0].state_key != resumed[1].state_key
    assert resumed[0].cumulative_relative_error < resumed[1].cumulative_relative_error  # each got its own state


# -- 9. torch.compile --------------------------------------------------------------------------------


class _CompiledInside(Classifier):
    def __init__(self, compiled):
        super().__init__(optimizer="sgd", lr=0.05, momentum=0.9)
        if compiled:
            self.net = torch.compile(self.net, backend="aot_eager")


@pytest.mark.slow
def test_a_compiled_submodule_gives_the_same_allocations_as_the_eager_one():
    results, nfa_metrics_at_end = [], []
    for compiled in (False, True):
        callback = LossChangeAllocation(probe_size=256)
        nfa = NeuralFeatureAnsatz(every_n_steps=3, probe_size=256, images=False)
        torch.manual_seed(0)
        logger = MemoryLogger()
        trainer(callbacks=[callback, nfa], loggers=[logger], max_steps=6).fit(
            _CompiledInside(compiled), digits_loader()
        )
        results.append(logger.series)
        nfa_metrics_at_end.append([nfa.last_record.metrics[name] for name in sorted(nfa.last_record.metrics)])
    eager, compiled = results
    for step in range(6):
        assert compiled["lca/total"][step] == pytest.approx(eager["lca/total"][step], rel=1e-5)
        assert compiled["lca/delta_loss"][step] == pytest.approx(eager["lca/delta_loss"][step], rel=1e-5)
    eager_nfa, compiled_nfa = nfa_metrics_at_end
    assert len(eager_nfa) == len(compiled_nfa) == 3
    for a, b in zip(eager_nfa, compiled_nfa):
        assert a.keys() == b.keys()
        for metric in a:
            assert b[metric] == pytest.approx(a[metric], rel=1e-5, abs=1e-7)


# -- 10. inputs the probes cannot read --------------------------------------------------------------


class _Opaque:
    def __init__(self, x, y):
        self.x, self.y = x, y


class _OpaqueModule(Classifier):
    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch.x), batch.y)


def _opaque_loader():
    x, y = digits()
    return DataLoader(
        list(zip(x, y)),
        batch_size=64,
        collate_fn=lambda items: _Opaque(torch.stack([a for a, _ in items]), torch.stack([b for _, b in items])),
    )


def test_an_unreadable_batch_fails_before_training_naming_probe():
    with pytest.raises(ProbeError, match="probe=DataLoader"):
        trainer(callbacks=[LossChangeAllocation()], max_steps=3).fit(_OpaqueModule(), _opaque_loader())


def test_an_empty_probe_dataloader_fails_before_training_naming_probe():
    x, y = digits()
    empty = DataLoader(TensorDataset(x[:0], y[:0]), batch_size=8)
    with pytest.raises(ProbeError, match="set probe"):
        trainer(callbacks=[LossChangeAllocation(probe=empty)], max_steps=3).fit(Classifier(), digits_loader())


def test_a_training_step_returning_no_loss_names_loss_fn_at_the_first_measurement():
    class NoLoss(Classifier):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return (
                {"loss": loss} if self.trainer.training and batch_idx < 10**6 and getattr(self, "_real", True) else None
            )

    class Flip(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            pl_module._real = False

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            pl_module._real = True

    with pytest.raises(ProbeError, match="loss_fn"):
        trainer(callbacks=[Flip(), LossChangeAllocation(probe_size=64)], max_steps=3).fit(NoLoss(), digits_loader())


# -- 11. frozen parameters and submodules kept in eval mode -------------------------------------------


class _PartlyFrozen(Classifier):
    def __init__(self):
        super().__init__(net=mlp(dropout=0.5), optimizer="sgd", lr=0.05, momentum=0.9)
        for p in self.net[0].parameters():
            p.requires_grad_(False)

    def on_train_start(self):
        self.net[2].eval()  # the user keeps the first dropout in eval mode


def test_frozen_parameters_are_excluded_and_modes_and_values_untouched():
    def run(callbacks):
        torch.manual_seed(0)
        model = _PartlyFrozen()
        logger = MemoryLogger()
        t = trainer(callbacks=callbacks, loggers=[logger], max_steps=10)
        t.fit(model, digits_loader())
        return model, state_of(model, t.optimizers[0]), logger

    reference_model, reference, _ = run([])
    model, probed, logger = run([LossChangeAllocation(probe_size=256)])
    assert_bitwise_equal(reference, probed)
    assert [m.training for m in model.modules()] == [m.training for m in reference_model.modules()]
    assert model.net[2].training is False and model.net[5].training is True
    assert "lca/layer/net.0" not in logger.series and "lca/layer/net.3" in logger.series
    assert torch.equal(model.net[0].weight, reference_model.net[0].weight)


# -- 12. sharded training (FSDP2 fully_shard, 2 processes, gloo) ---------------------------------------


@pytest.mark.slow
def test_fsdp_sharded_allocations_equal_the_unsharded_value(tmp_path):
    import os

    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo"}  # gloo crashed in init_process_group here without it
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            "29563",
            str(SCRIPTS / "lca_fsdp.py"),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["untouched"] and ranks[1]["untouched"]  # shards and .grad restored bitwise
    for sharded_0, sharded_1 in zip(ranks[0]["results"], ranks[1]["results"]):
        assert sharded_0["modules"] == sharded_1["modules"]
        for module, value in sharded_0["modules"].items():
            assert value == pytest.approx(sharded_0["unsharded"][module], rel=1e-5)
        assert sharded_0["delta_loss"] == pytest.approx(sharded_0["unsharded_delta_loss"], rel=1e-5)
    assert len(ranks[0]["results"]) == 4
