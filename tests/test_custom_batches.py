"""Batches that are not tensors, tuples, lists or dicts: dataclasses, and objects sized by
``batch_size_fn`` (e.g. a graph batch whose first tensor holds nodes, not samples)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from learnscope import LossChangeAllocation, NeuralFeatureAnsatz, ProbeError
from models import Classifier, MemoryLogger, digits, trainer


class NodeBatch:
    """Like a graph batch: ``nodes`` (3 rows per sample and 5 more) comes first, so the
    leading dimension of the first tensor is not the number of samples."""

    def __init__(self, nodes: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> None:
        self.nodes, self.x, self.y = nodes, x, y

    @property
    def num_samples(self) -> int:
        return len(self.y)

    def to(self, *args, **kwargs) -> NodeBatch:
        return NodeBatch(self.nodes.to(*args, **kwargs), self.x.to(*args, **kwargs), self.y.to(*args, **kwargs))


@dataclass
class FieldBatch:
    x: torch.Tensor
    y: torch.Tensor


def _collate_nodes(items):
    x, y = torch.stack([a for a, _ in items]), torch.stack([b for _, b in items])
    nodes = torch.cat([x.repeat_interleave(3, dim=0), torch.zeros(5, x.shape[1])])[:, :4]
    return NodeBatch(nodes, x, y)


def _collate_fields(items):
    return FieldBatch(torch.stack([a for a, _ in items]), torch.stack([b for _, b in items]))


def _collate_tuples(items):
    return torch.stack([a for a, _ in items]), torch.stack([b for _, b in items])


def _loader(collate, seed=0):
    x, y = digits()
    return DataLoader(
        list(zip(x, y)), batch_size=64, shuffle=True, collate_fn=collate, generator=torch.Generator().manual_seed(seed)
    )


class FieldClassifier(Classifier):
    """Reads ``batch.x`` / ``batch.y`` (NodeBatch, FieldBatch) or a tuple."""

    def training_step(self, batch, batch_idx):
        x, y = (batch.x, batch.y) if hasattr(batch, "x") else batch
        return nn.functional.cross_entropy(self(x), y)


def _lca_run(collate, **flags):
    torch.manual_seed(0)
    logger = MemoryLogger()
    callback = LossChangeAllocation(probe_size=300, probe_batch_size=128, rule="trapezoid", **flags)
    trainer(callbacks=[callback], loggers=[logger], max_steps=6).fit(
        FieldClassifier(optimizer="adam", lr=1e-3), _loader(collate)
    )
    return logger.series, callback


def test_batch_size_fn_sizes_a_batch_whose_first_tensor_is_not_per_sample():
    reference, ref_cb = _lca_run(_collate_tuples)
    nodes, cb = _lca_run(_collate_nodes, batch_size_fn=lambda b: b.num_samples)
    # the same 300 probe samples, weighted by their own counts: the same allocations
    assert ref_cb.probe_samples == cb.probe_samples == 300
    assert sorted(nodes["lca/total"]) == list(range(6))
    for tag in ("lca/total", "lca/delta_loss", "lca/layer/net.0"):
        for step, value in reference[tag].items():
            assert nodes[tag][step] == pytest.approx(value, rel=1e-12, abs=1e-15), (tag, step)
    # counting nodes instead (3n + 5) weights the last, smaller chunk (300 = 128 + 128 + 44)
    # differently, and the probe loss changes: the count is what batch_size_fn fixes
    wrong, _ = _lca_run(_collate_nodes, batch_size_fn=lambda b: len(b.nodes))
    assert wrong["lca/delta_loss"][0] != pytest.approx(reference["lca/delta_loss"][0], rel=1e-6)


def test_a_dataclass_batch_needs_no_batch_size_fn():
    reference, _ = _lca_run(_collate_tuples)
    fields, cb = _lca_run(_collate_fields)
    assert cb.probe_samples == 300
    for step, value in reference["lca/total"].items():
        assert fields["lca/total"][step] == pytest.approx(value, rel=1e-12, abs=1e-15)


def test_an_unsized_batch_fails_before_training_naming_batch_size_fn():
    with pytest.raises(ProbeError, match="batch_size_fn=callable"):
        _lca_run(_collate_nodes)


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda b: -1, "int >= 0"),
        (lambda b: 2.5, "int >= 0"),
        (lambda b: b.missing, "batch_size_fn raised AttributeError"),
    ],
)
def test_a_bad_batch_size_fn_result_is_named(bad, match):
    with pytest.raises(ProbeError, match=match):
        _lca_run(_collate_nodes, batch_size_fn=bad)


@pytest.mark.parametrize("callback", [LossChangeAllocation, NeuralFeatureAnsatz])
def test_batch_size_fn_must_be_callable(callback):
    with pytest.raises(ValueError, match="batch_size_fn must be None or a callable"):
        callback(batch_size_fn=3)


def test_nfa_reads_custom_batches_with_input_fn_and_batch_size_fn():
    def run(collate, **flags):
        torch.manual_seed(0)
        logger = MemoryLogger()
        callback = NeuralFeatureAnsatz(every_n_steps=3, probe_size=200, images=False, null_draws=0, **flags)
        trainer(callbacks=[callback], loggers=[logger], max_steps=3).fit(
            FieldClassifier(optimizer="adam", lr=1e-3), _loader(collate)
        )
        return {tag: series for tag, series in logger.series.items() if tag.startswith("nfa/")}

    reference = run(_collate_tuples)
    custom = run(_collate_nodes, input_fn=lambda b: b.x, batch_size_fn=lambda b: b.num_samples)
    assert len(reference) > 5 and reference.keys() == custom.keys()
    for tag, series in reference.items():
        for step, value in series.items():
            assert custom[tag][step] == pytest.approx(value, rel=1e-9, abs=1e-12), (tag, step)


def test_batch_size_fn_counts_whole_batches_taken_from_a_loader_without_a_sampler():
    # a loader of ready-made batches (batch_size=None) cannot be subset: whole batches are
    # taken until probe_size samples; counted by batch_size_fn, 5 batches of 64 reach 300
    x, y = digits()
    ready = [_collate_nodes(list(zip(x[i : i + 64], y[i : i + 64]))) for i in range(0, 640, 64)]
    for count, batches in ((lambda b: b.num_samples, 5), (lambda b: len(b.nodes), 2)):
        callback = LossChangeAllocation(probe_size=300, rule="trapezoid", batch_size_fn=count)
        trainer(callbacks=[callback], max_steps=2).fit(FieldClassifier(), DataLoader(ready, batch_size=None))
        assert callback.probe_samples == sum(count(b) for b in ready[:batches])
