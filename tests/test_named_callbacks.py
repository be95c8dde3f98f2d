"""Several callbacks of one kind in one Trainer (``name=``): distinct tag roots, an
error at setup when two would write the same tags, checkpoints that keep both, and a
report with a section for each (plus the train / held-out overlay)."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader

from learnscope import LossChangeAllocation, NeuralFeatureAnsatz
from learnscope.report.cli import main
from learnscope.report.reader import read_logdir
from models import Classifier, MemoryLogger, digits_loader, trainer


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def _held_out() -> DataLoader:
    x, y = digits_loader(shuffle=False).dataset.tensors
    return DataLoader(torch.utils.data.TensorDataset(x[1500:], y[1500:]), batch_size=100)


def _fit(callbacks, max_steps=4, loggers=None, **kwargs):
    torch.manual_seed(0)
    model = Classifier(_net(), "sgd", lr=0.05, momentum=0.9)
    trainer(callbacks=callbacks, loggers=loggers, max_steps=max_steps, **kwargs).fit(model, digits_loader())
    return model


def test_two_callbacks_with_distinct_names_log_separately():
    logger = MemoryLogger()
    train_lca = LossChangeAllocation(probe_size=256, histograms=False)
    val_lca = LossChangeAllocation(probe=_held_out(), name="lca_val", histograms=False)
    _fit([train_lca, val_lca], loggers=[logger])
    assert sorted(logger.series["lca/total"]) == sorted(logger.series["lca_val/total"]) == [0, 1, 2, 3]
    assert logger.series["lca/total"] != logger.series["lca_val/total"]  # different probe sets
    assert train_lca.state_key != val_lca.state_key
    assert train_lca.cumulative_relative_error < 1e-3 and val_lca.cumulative_relative_error < 1e-3


@pytest.mark.parametrize(
    "callbacks",
    [
        lambda: [LossChangeAllocation(probe_size=64), LossChangeAllocation(probe="batch")],
        lambda: [NeuralFeatureAnsatz(), NeuralFeatureAnsatz(probe_size=64)],
        lambda: [LossChangeAllocation(name="probe"), NeuralFeatureAnsatz(name="probe")],
    ],
    ids=["two_lca", "two_nfa", "lca_and_nfa"],
)
def test_two_callbacks_with_one_name_fail_at_setup_naming_name(callbacks):
    with pytest.raises(ValueError, match=r"would write the same tags: give each a distinct name="):
        _fit(callbacks(), max_steps=1)


@pytest.mark.parametrize("bad", ["", "lca/val", "a b", 3, None])
@pytest.mark.parametrize("cls", [LossChangeAllocation, NeuralFeatureAnsatz])
def test_name_is_validated_in_the_constructor(cls, bad):
    with pytest.raises(ValueError, match="name must be"):
        cls(name=bad)


def test_checkpoint_keeps_both_and_resume_continues_each(tmp_path):
    def callbacks():
        return [
            LossChangeAllocation(probe_size=256, histograms=False),
            LossChangeAllocation(probe=_held_out(), name="lca_val", histograms=False),
        ]

    def run(callbacks, epochs, directory, ckpt_path=None):
        torch.manual_seed(0)
        model = Classifier(_net(), "sgd", lr=0.05, momentum=0.9)
        checkpoint = ModelCheckpoint(dirpath=directory, save_last=True, every_n_epochs=1)
        trainer(
            callbacks=[*callbacks, checkpoint],
            max_steps=-1,
            max_epochs=epochs,
            enable_checkpointing=True,
            limit_train_batches=3,
        ).fit(model, digits_loader(shuffle=False), ckpt_path=ckpt_path)

    straight = callbacks()
    run(straight, 2, tmp_path / "a")
    run(callbacks(), 1, tmp_path / "b")
    resumed = callbacks()
    run(resumed, 2, tmp_path / "c", ckpt_path=str(tmp_path / "b" / "last.ckpt"))
    for done, again in zip(straight, resumed):
        assert again.cumulative.keys() == done.cumulative.keys()
        for module, value in done.cumulative.items():
            assert again.cumulative[module] == pytest.approx(value, rel=1e-9, abs=1e-12)
        assert again.cumulative_relative_error == pytest.approx(done.cumulative_relative_error, rel=1e-6)
    assert resumed[0].cumulative != resumed[1].cumulative


def test_report_shows_each_callback_as_its_own_section(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="run", version=0)
    callbacks = [
        LossChangeAllocation(probe_size=256, histograms=False),
        LossChangeAllocation(probe=_held_out(), name="lca_val", histograms=False),
        NeuralFeatureAnsatz(every_n_steps=2, probe_size=128, images=False),
    ]
    _fit(callbacks, max_steps=4, loggers=[logger])
    records = read_logdir(tmp_path, progress=False)
    runs = records.learnscope_runs
    assert set(runs) == {"run/version_0", "run/version_0 [lca_val]"}
    main_section, val_section = runs["run/version_0"], runs["run/version_0 [lca_val]"]
    assert main_section.roots == ("lca", "nfa") and val_section.roots == ("lca_val",)
    assert len(main_section.lca.total) == len(val_section.lca.total) == 4  # never mixed: 4 steps each, not 8
    assert val_section.nfa is None and main_section.nfa is not None
    assert val_section.lca.cumulative_relative_error.last() == pytest.approx(
        callbacks[1].cumulative_relative_error, rel=1e-6
    )
    out = tmp_path / "report"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["report", str(tmp_path), "--out", str(out), "--no-progress"]) == 0
    text = (out / "report.md").read_text()
    assert "## Run `run/version_0`" in text and "## Run `run/version_0 [lca_val]`" in text
    assert text.count("measured steps: 4") == 2
    assert "## LCA of each probe set: `run/version_0`" in text
    assert (out / "lca_overlay_run_version_0.png").stat().st_size > 10_000


def test_checkpoint_identities_are_those_of_checkpoints_already_written():
    # Lightning files each callback's state under its state_key: a changed key would
    # orphan the cumulative state of every checkpoint written before (resume restarts at 0).
    lca = LossChangeAllocation(probe="val", rule="adaptive", name="lca_val")
    assert lca.state_key == (
        "LossChangeAllocation{'every_n_steps': 1, 'probe': 'val', 'rule': 'adaptive', 'probe_size': 1024, "
        "'decompose': True, 'ablation': False, 'name': 'lca_val'}"
    )
    nfa = NeuralFeatureAnsatz(every_n_steps=5, alphas=[0.5])
    assert nfa.state_key == (
        "NeuralFeatureAnsatz{'every_n_steps': 5, 'probe': 'train', 'probe_size': 1024, 'layers': None, "
        "'alphas': [0.5], 'name': 'nfa'}"
    )
