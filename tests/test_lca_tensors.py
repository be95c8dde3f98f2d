"""Per-parameter-tensor series (``tensor_series=True``): weight and bias apart, BatchNorm's
γ and β apart, against an independent float64 sum of the allocation tensors ``observe()``
receives."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from learnscope import LossChangeAllocation
from models import Classifier, MemoryLogger, assert_bitwise_equal, digits_loader, mlp, trained_state, trainer

#: the tiny BatchNorm MLP's parameter tensors: Linear, BatchNorm1d (γ = weight, β = bias), Linear
TENSORS = ("net.0.weight", "net.0.bias", "net.1.weight", "net.1.bias", "net.3.weight", "net.3.bias")


class _Keeping(LossChangeAllocation):
    """Keeps Σ A of every parameter tensor of every measured step (float64, from observe())."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.kept: dict[int, dict[str, float]] = {}

    def observe(self, step, names, allocation, parts) -> None:
        self.kept[step] = {name: float(allocation.allocation(name).detach().double().sum()) for name in names}


def _model() -> Classifier:
    return Classifier(mlp((64, 16, 10), batchnorm=True), "sgd", lr=0.1, momentum=0.9)


def _fit(callback, steps: int = 6, **kwargs) -> MemoryLogger:
    torch.manual_seed(0)
    logger = MemoryLogger()
    trainer(callbacks=[callback], loggers=[logger], max_steps=steps, **kwargs).fit(_model(), digits_loader(n=512))
    return logger


def _tags(name: str) -> tuple[str, str]:
    module, _, tensor = name.rpartition(".")
    return f"lca/tensor/{module}/{tensor}", f"lca/tensor_cumulative/{module}/{tensor}"


@pytest.fixture(scope="module")
def tensor_run():
    callback = _Keeping(probe_size=128, tensor_series=True, per_step_series=True)
    return callback, _fit(callback)


def test_tensor_series_equal_the_observed_allocations_summed_per_tensor(tensor_run):
    callback, logger = tensor_run
    assert sorted(callback.kept) == list(range(6))
    for step, sums in callback.kept.items():
        assert set(sums) == set(TENSORS)
        for name in TENSORS:
            per_step, cumulative = _tags(name)
            expected_cumulative = sum(callback.kept[s][name] for s in range(step + 1))
            assert logger.series[per_step][step] == pytest.approx(sums[name], rel=1e-6, abs=1e-12)
            assert logger.series[cumulative][step] == pytest.approx(expected_cumulative, rel=1e-6, abs=1e-12)
    totals = callback.cumulative_tensors
    assert set(totals) == set(TENSORS)
    for name in TENSORS:
        assert totals[name] == pytest.approx(sum(s[name] for s in callback.kept.values()), rel=1e-6, abs=1e-12)
    totals["net.0.weight"] += 1.0  # a copy
    assert callback.cumulative_tensors["net.0.weight"] != totals["net.0.weight"]


def test_weight_and_bias_sum_to_the_module_series(tensor_run):
    callback, logger = tensor_run
    for module in ("net.0", "net.1", "net.3"):  # net.1 is the BatchNorm: γ and β
        weight, bias = (logger.series[_tags(f"{module}.{t}")[0]] for t in ("weight", "bias"))
        for step in callback.kept:
            assert weight[step] + bias[step] == pytest.approx(
                logger.series[f"lca/layer/{module}"][step], rel=1e-9, abs=1e-15
            )
        assert callback.cumulative_tensors[f"{module}.weight"] + callback.cumulative_tensors[
            f"{module}.bias"
        ] == pytest.approx(callback.cumulative[module], rel=1e-9, abs=1e-15)
    # the tensors are not all alike: the split carries information the module sum hides
    assert callback.cumulative_tensors["net.0.weight"] != pytest.approx(callback.cumulative_tensors["net.0.bias"])


def test_tensor_series_follow_the_modules_filter():
    callback = LossChangeAllocation(probe_size=128, tensor_series=True, modules=["net.1"], per_step_series=True)
    logger = _fit(callback, steps=2)
    written = {tag for tag in logger.series if tag.startswith("lca/tensor")}
    assert written == {"lca/tensor/net.1/weight", "lca/tensor/net.1/bias"} | {
        "lca/tensor_cumulative/net.1/weight",
        "lca/tensor_cumulative/net.1/bias",
    }
    assert set(callback.cumulative_tensors) == {"net.1.weight", "net.1.bias"}


def test_no_tensor_tags_without_the_flag():
    callback = LossChangeAllocation(probe_size=128, per_step_series=True)
    logger = _fit(callback, steps=2)
    assert not [tag for tag in logger.series if tag.startswith("lca/tensor")]
    assert callback.cumulative_tensors == {}


def test_training_is_bitwise_unchanged_with_tensor_series():
    reference = trained_state(_model)
    probed = trained_state(_model, [LossChangeAllocation(probe_size=128, tensor_series=True)])
    assert_bitwise_equal(reference, probed)
    cheap = trained_state(_model, [LossChangeAllocation(preset="cheap", tensor_series=True)])
    assert_bitwise_equal(reference, cheap)


def _resumable(tmp_path, epochs, ckpt=None):
    torch.manual_seed(0)
    callback = _Keeping(probe_size=128, tensor_series=True, per_step_series=True)
    logger = MemoryLogger()
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_epochs=1)
    t = trainer(
        callbacks=[callback, checkpoint],
        loggers=[logger],
        max_steps=-1,
        max_epochs=epochs,
        enable_checkpointing=True,
        limit_train_batches=4,
    )
    t.fit(_model(), digits_loader(n=512, shuffle=False), ckpt_path=ckpt)
    return callback, logger


def test_resume_keeps_the_cumulative_tensor_totals(tmp_path):
    whole, whole_log = _resumable(tmp_path / "a", 2)
    _resumable(tmp_path / "b", 1)
    resumed, resumed_log = _resumable(tmp_path / "c", 2, ckpt=str(tmp_path / "b" / "last.ckpt"))
    assert sorted(resumed.kept) == [4, 5, 6, 7]
    for name in TENSORS:
        expected = sum(whole.kept[s][name] for s in range(8))
        assert resumed.cumulative_tensors[name] == pytest.approx(expected, rel=1e-6, abs=1e-12)
        cumulative = _tags(name)[1]
        assert resumed_log.series[cumulative][7] == pytest.approx(whole_log.series[cumulative][7], rel=1e-9)


def test_tensor_series_flag_is_checked():
    with pytest.raises(ValueError, match="tensor_series"):
        LossChangeAllocation(tensor_series="yes")
    assert LossChangeAllocation(tensor_series=True).config.tensor_series is True
