"""The allocation distribution's shape (skewness, both kurtosis definitions) and the
per-parameter helped / hurt counts, against independent float64 computations from the
tensors ``observe()`` receives."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from learnscope import LossChangeAllocation
from learnscope.step_summary import RunTotals
from models import Classifier, MemoryLogger, digits_loader, mlp, trainer


class _Keeping(LossChangeAllocation):
    """Keeps every measured step's allocation tensors A = k ⊙ Δ (float64 copies)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.kept: dict[int, dict[str, torch.Tensor]] = {}

    def observe(self, step, names, allocation, parts) -> None:
        self.kept[step] = {name: allocation.allocation(name).detach().double().clone() for name in names}


def _central(values: torch.Tensor) -> tuple[float, float, float]:
    """Population central moments m₂, m₃, m₄ by two passes (mean first)."""
    d = values - values.mean()
    return float((d**2).mean()), float((d**3).mean()), float((d**4).mean())


def _skewness(values: torch.Tensor) -> float:
    m2, m3, _ = _central(values)
    return m3 / m2**1.5


def _excess_kurtosis(values: torch.Tensor) -> float:
    m2, _, m4 = _central(values)
    return m4 / m2**2 - 3.0


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _fit(callback, steps: int = 6, logger=None, **kwargs) -> MemoryLogger:
    torch.manual_seed(0)
    logger = logger or MemoryLogger()
    model = Classifier(mlp((64, 16, 10)), "sgd", lr=0.1, momentum=0.9)
    trainer(callbacks=[callback], loggers=[logger], max_steps=steps, **kwargs).fit(model, digits_loader(n=512))
    return logger


@pytest.fixture(scope="module")
def shape_run():
    callback = _Keeping(probe_size=128)
    logger = _fit(callback)
    return callback, logger


def test_per_step_and_per_module_skewness_match_the_observed_allocations(shape_run):
    callback, logger = shape_run
    assert sorted(callback.kept) == list(range(6))
    for step, allocations in callback.kept.items():
        everything = _flat(allocations.values())
        assert logger.series["lca/skewness"][step] == pytest.approx(_skewness(everything), rel=1e-9, abs=0)
        assert logger.series["lca/excess_kurtosis"][step] == pytest.approx(
            _excess_kurtosis(everything), rel=1e-9, abs=0
        )
        for module in ("net.0", "net.2"):
            mine = _flat(a for name, a in allocations.items() if name.rpartition(".")[0] == module)
            assert logger.series[f"lca/skewness/{module}"][step] == pytest.approx(_skewness(mine), rel=1e-9, abs=0)


def test_pooled_skewness_and_kurtosis_are_over_every_allocation_of_the_steps_so_far(shape_run):
    callback, logger = shape_run
    for step in callback.kept:
        pooled = _flat(a for s in range(step + 1) for a in callback.kept[s].values())
        assert logger.series["lca/skewness_pooled"][step] == pytest.approx(_skewness(pooled), rel=1e-9, abs=0)
        assert logger.series["lca/excess_kurtosis_pooled"][step] == pytest.approx(
            _excess_kurtosis(pooled), rel=1e-9, abs=0
        )
    # the two kurtosis definitions differ (pooled: the steps' scales mix too)
    last = max(callback.kept)
    assert logger.series["lca/excess_kurtosis_pooled"][last] != pytest.approx(
        sum(logger.series["lca/excess_kurtosis"].values()) / len(callback.kept), rel=1e-3
    )


def _resumable(tmp_path, epochs, ckpt=None, **flags):
    torch.manual_seed(0)
    callback = _Keeping(probe_size=128, **flags)
    logger = MemoryLogger()
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_epochs=1)
    model = Classifier(mlp((64, 16, 10)), "sgd", lr=0.1, momentum=0.9)
    t = trainer(
        callbacks=[callback, checkpoint],
        loggers=[logger],
        max_steps=-1,
        max_epochs=epochs,
        enable_checkpointing=True,
        limit_train_batches=4,
    )
    t.fit(model, digits_loader(n=512, shuffle=False), ckpt_path=ckpt)
    return callback, logger


def test_resume_continues_the_pooled_sums(tmp_path):
    whole, whole_log = _resumable(tmp_path / "a", 2)
    _resumable(tmp_path / "b", 1)
    resumed, resumed_log = _resumable(tmp_path / "c", 2, ckpt=str(tmp_path / "b" / "last.ckpt"))
    assert sorted(resumed_log.series["lca/total"]) == [4, 5, 6, 7]
    for tag in ("lca/skewness_pooled", "lca/excess_kurtosis_pooled"):
        assert resumed_log.series[tag][7] == pytest.approx(whole_log.series[tag][7], rel=1e-9)
    pooled = _flat(a for s in range(8) for a in whole.kept[s].values())
    assert resumed_log.series["lca/skewness_pooled"][7] == pytest.approx(_skewness(pooled), rel=1e-9)
    assert resumed.run_totals.moments.n == pooled.numel()


def test_checkpoints_without_the_pooled_sums_still_load():
    old = RunTotals(sum_total=-1.5, measured_steps=3).state_dict()
    del old["moments"]
    totals = RunTotals.from_state_dict(old)
    assert totals.measured_steps == 3 and totals.sum_total == -1.5 and totals.moments.n == 0
