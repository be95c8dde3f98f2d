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
    callback = _Keeping(probe_size=128, per_step_series=True)  # per-module skewness at every step
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


# ---------------------------------------------------------------------------- per-parameter counts


def _expected_counts(kept, upto=None):
    """(helped, hurt) per tensor from the observed allocations of the steps ≤ ``upto``."""
    out = {}
    for step, allocations in kept.items():
        if upto is not None and step > upto:
            continue
        for name, a in allocations.items():
            helped, hurt = out.get(name, (0, 0))
            out[name] = (helped + (a < 0).int(), hurt + (a > 0).int())
    return out


@pytest.mark.parametrize("flags", [dict(probe_size=128), dict(preset="cheap")], ids=["simpson", "cheap"])
def test_per_parameter_counts_equal_the_observed_signs(flags):
    callback = _Keeping(parameter_counts=True, **flags)
    logger = _fit(callback, steps=7)
    counts, steps = callback.per_parameter_counts, callback.per_parameter_steps
    expected = _expected_counts(callback.kept)
    assert set(counts) == set(expected) == {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}
    for name, (helped, hurt) in counts.items():
        assert helped.dtype == hurt.dtype == torch.int32 and helped.shape == expected[name][0].shape
        assert torch.equal(helped, expected[name][0]) and torch.equal(hurt, expected[name][1])
        assert steps[name] == 7
    total_helped = sum(int(h.sum()) for h, _ in counts.values())
    assert 0 < total_helped < 7 * sum(h.numel() for h, _ in counts.values())
    counts["net.0.bias"][0].add_(1)  # a copy
    assert torch.equal(callback.per_parameter_counts["net.0.bias"][0], expected["net.0.bias"][0])
    assert "lca/total" in logger.series


def test_helped_fraction_histograms_are_written_at_the_histogram_cadence(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    callback = _Keeping(probe_size=128, parameter_counts=True, histograms=False)
    tb = TensorBoardLogger(tmp_path, name="run", version=0)
    _fit(callback, steps=7, logger=tb, log_every_n_steps=3)
    events = EventAccumulator(tb.log_dir, size_guidance={"histograms": 0})
    events.Reload()
    assert "lca/hist/net.0" not in events.Tags()["histograms"]
    overall = events.Histograms("lca/param_helped_fraction")
    assert [e.step for e in overall] == [0, 3, 6]
    expected = _expected_counts(callback.kept, upto=6)
    fractions = torch.cat([h.reshape(-1).double() / 7 for h, _ in expected.values()])
    last = overall[-1].histogram_value
    assert last.num == fractions.numel() == 64 * 16 + 16 + 16 * 10 + 10
    assert last.sum == pytest.approx(float(fractions.sum()), rel=1e-12)
    assert last.min == float(fractions.min()) and last.max == float(fractions.max())
    module = events.Histograms("lca/param_helped_fraction/net.2")[-1].histogram_value
    mine = torch.cat([expected[n][0].reshape(-1).double() / 7 for n in ("net.2.weight", "net.2.bias")])
    assert module.num == mine.numel() and module.sum == pytest.approx(float(mine.sum()), rel=1e-12)


def test_training_is_bitwise_unchanged_with_parameter_counts():
    from models import assert_bitwise_equal, trained_state

    def make_model():
        return Classifier(mlp((64, 16, 10)), "sgd", lr=0.1, momentum=0.9)

    reference = trained_state(make_model)
    probed = trained_state(make_model, [LossChangeAllocation(probe_size=128, parameter_counts=True)])
    assert_bitwise_equal(reference, probed)
    cheap = trained_state(make_model, [LossChangeAllocation(preset="cheap", parameter_counts=True)])
    assert_bitwise_equal(reference, cheap)


def test_resume_continues_the_parameter_counts(tmp_path):
    whole, _ = _resumable(tmp_path / "a", 2, parameter_counts=True)
    _resumable(tmp_path / "b", 1, parameter_counts=True)
    resumed, _ = _resumable(tmp_path / "c", 2, ckpt=str(tmp_path / "b" / "last.ckpt"), parameter_counts=True)
    assert sorted(resumed.kept) == [4, 5, 6, 7]
    expected = _expected_counts(whole.kept)
    for name, (helped, hurt) in resumed.per_parameter_counts.items():
        assert torch.equal(helped, expected[name][0]) and torch.equal(hurt, expected[name][1])
        assert resumed.per_parameter_steps[name] == 8


def test_parameter_counts_flag_is_checked():
    with pytest.raises(ValueError, match="parameter_counts"):
        LossChangeAllocation(parameter_counts="yes")
    assert LossChangeAllocation(parameter_counts=True).config.parameter_counts is True
