"""Each private API learnscope relies on (learnscope._compat) still exists and behaves
as the library expects: a release that renames or changes one fails here, by name."""

from __future__ import annotations

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.tensorboard import SummaryWriter

from learnscope import _compat
from models import Classifier, digits, digits_loader


def test_reparametrized_binds_other_tensors_and_restores_the_module():
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    x = torch.randn(5, 3)
    weight = torch.randn(2, 3)
    before = net.weight
    with _compat.reparametrized(net, {"weight": weight}):
        inside = net(x)
    torch.testing.assert_close(inside, x @ weight.T + net.bias, rtol=0, atol=0)
    assert net.weight is before  # the module's own parameter is back


def test_reparametrized_ties_shared_weights():
    torch.manual_seed(0)
    embedding = nn.Embedding(4, 3)
    head = nn.Linear(3, 4, bias=False)
    head.weight = embedding.weight  # tied, as in a language model
    model = nn.Sequential(embedding, head)
    other = torch.randn(4, 3)
    with _compat.reparametrized(model, {"0.weight": other}, tie_weights=True):
        assert model[1].weight is other  # the tied use sees the same tensor


def test_tensor_version_counts_in_place_changes():
    t = torch.zeros(3)
    before = _compat.tensor_version(t)
    t.add_(1.0)
    assert _compat.tensor_version(t) == before + 1
    t + 1.0  # out of place: no change
    assert _compat.tensor_version(t) == before + 1


def test_summary_file_writer_writes_events(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.compat.proto.summary_pb2 import Summary

    writer = SummaryWriter(str(tmp_path))
    file_writer = _compat.summary_file_writer(writer)
    assert file_writer is not None
    file_writer.add_summary(Summary(value=[Summary.Value(tag="a/b", simple_value=2.5)]), 7)
    writer.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    (scalar,) = events.Scalars("a/b")
    assert (scalar.step, scalar.value) == (7, 2.5)


def test_logger_prefix_reads_the_tensorboard_loggers_prefix(tmp_path):
    assert _compat.logger_prefix(TensorBoardLogger(str(tmp_path))) == ""
    assert _compat.logger_prefix(TensorBoardLogger(str(tmp_path), prefix="run1")) == "run1"


def test_validation_data_source_tells_whether_validation_data_is_defined(tmp_path):
    def fit(val):
        torch.manual_seed(0)
        t = Trainer(
            max_steps=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,
            limit_val_batches=1,
        )
        t.fit(Classifier(), digits_loader(), val)
        return _compat.validation_data_source(t)

    x, y = digits()
    with_val = fit(DataLoader(TensorDataset(x[:8], y[:8]), batch_size=4))
    assert with_val is not None and with_val.is_defined() and with_val.instance is not None
    assert len(list(with_val.dataloader())) == 2
    without = fit(None)
    assert without is not None and not without.is_defined()
