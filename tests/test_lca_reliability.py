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

from learnscope import LossChangeAllocation
from learnscope._probe import ProbeError, collect_batches
from learnscope.functional import allocate_step, gradient_evaluator
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
    # 3 steps × (start + end) × 4 micro-batches of 32
    assert seen == [32] * 24


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
    callback = LossChangeAllocation(probe=probe, loss_fn=_ce)
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
    trainer(callbacks=[recorder, callback], loggers=[MemoryLogger()], max_steps=5, max_epochs=1, limit_train_batches=5).fit(
        model, digits_loader(shuffle=False)
    )
    assert callback._measured_steps == 5
    net = mlp()
    loss_fn = _probe_loss(net, [(x[:256], y[:256]), (x[256:512], y[256:512])], 512)
    names = lambda p: {k.removeprefix("net."): v for k, v in p.items()}  # noqa: E731
    direct = loss_fn(names(dict(model.named_parameters()))) - loss_fn(names(recorder.params[0]))
    assert callback._sum_delta_loss == pytest.approx(float(direct), rel=1e-5)
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
    trainer(callbacks=[callback], loggers=[logger], max_steps=10, gradient_clip_val=0.05, gradient_clip_algorithm="norm").fit(
        Classifier(optimizer="sgd", lr=0.1), digits_loader()
    )
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
