"""The probe loss is a deterministic function of θ, for any model: every module in eval
mode except batch-statistics normalisation, fixed random streams per chunk, and a
self-check that names the module when randomness is left."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from learnscope import LossChangeAllocation
from models import Classifier, MemoryLogger, assert_bitwise_equal, digits_loader, state_of, trainer


class DigitsTransformer(nn.Module):
    """Digits as 8 tokens of 8 pixels through one ``nn.TransformerEncoderLayer``:
    its ``self_attn`` applies attention-weight dropout functionally, gated on its own
    ``training`` flag (no ``nn.Dropout`` module is involved)."""

    def __init__(self, dropout: float = 0.1) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 32)
        self.encoder = nn.TransformerEncoderLayer(32, 2, 64, dropout=dropout, batch_first=True)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x.reshape(x.shape[0], 8, 8))
        return self.head(self.encoder(tokens).mean(dim=1))


class DropPath(nn.Module):
    """timm's stochastic depth: drops the whole residual branch per sample when training."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep = torch.rand(x.shape[0], 1, device=x.device) >= self.p
        return x * keep / (1 - self.p)


class ResidualDropPath(nn.Module):
    def __init__(self, p: float = 0.3) -> None:
        super().__init__()
        self.branch = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
        self.drop_path = DropPath(p)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x + self.drop_path(self.branch(x)))


class AlwaysNoisy(nn.Module):
    """Adds noise whatever its mode: a module the eval switch cannot quieten."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.05 * torch.randn_like(x)


class FunctionalDropoutBlock(nn.Module):
    """Functional dropout in its own forward, not gated on ``self.training``, before a child."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.inner(F.dropout(x, 0.2, training=True)))


def _fit(make_net, callbacks, max_steps: int = 12, **options):
    """Train ``make_net()`` (built after seeding: every run starts from the same weights)."""
    torch.manual_seed(0)
    logger = MemoryLogger()
    model = Classifier(make_net(), "sgd", **(options or {"lr": 0.05, "momentum": 0.9}))
    trainer(callbacks=callbacks, loggers=[logger], max_steps=max_steps).fit(model, digits_loader())
    return logger, model


def _eval_loss(net: nn.Module, loader) -> float:
    """The reference probe loss: a copy of the network in eval mode, every probe sample."""
    copy_ = copy.deepcopy(net).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in loader:
            total += float(F.cross_entropy(copy_(x), y, reduction="sum"))
            count += len(y)
    return total / count


class _Snapshots:
    """Weights after every optimizer step (a plain callback, independent of learnscope)."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []


@pytest.mark.parametrize("make", [DigitsTransformer, ResidualDropPath], ids=["attention_dropout", "drop_path"])
def test_probe_loss_is_the_eval_mode_loss_and_the_integral_closes(make):
    import lightning.pytorch as pl

    probe = torch.utils.data.DataLoader(digits_loader(shuffle=False).dataset, batch_size=128)
    snapshots = _Snapshots()

    class Snap(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            snapshots.states.append({k: v.detach().clone() for k, v in pl_module.net.state_dict().items()})

        def on_train_start(self, trainer, pl_module):
            snapshots.states.append({k: v.detach().clone() for k, v in pl_module.net.state_dict().items()})

    callback = LossChangeAllocation(probe=probe, rule="simpson", histograms=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logger, _ = _fit(make, [Snap(), callback], max_steps=10)
    assert not [w for w in caught if "not deterministic" in str(w.message)]
    assert callback.probe_is_stochastic is False
    assert logger.series["lca/probe_stochastic"] == {0: 0.0}
    # independent reference: L(θ) of an eval-mode copy at the snapshots
    reference = make()
    deltas = []
    for before, after in zip(snapshots.states[:-1], snapshots.states[1:]):
        reference.load_state_dict(before)
        start = _eval_loss(reference, probe)
        reference.load_state_dict(after)
        deltas.append(_eval_loss(reference, probe) - start)
    logged = [logger.series["lca/delta_loss"][step] for step in range(10)]
    assert logged == pytest.approx(deltas, rel=1e-4, abs=1e-7)
    assert callback.cumulative_relative_error < 1e-3


def test_training_is_bitwise_unchanged_with_stochastic_layers():
    _, plain = _fit(DigitsTransformer, [], max_steps=6)
    _, probed = _fit(DigitsTransformer, [LossChangeAllocation(probe_size=128, histograms=False)], max_steps=6)
    assert_bitwise_equal(state_of(plain), state_of(probed))


@pytest.mark.parametrize(
    "net, culprit",
    [
        (
            lambda: nn.Sequential(nn.Linear(64, 64), AlwaysNoisy(), nn.ReLU(), nn.Linear(64, 10)),
            "'net.1' (AlwaysNoisy)",
        ),
        (
            lambda: nn.Sequential(nn.Linear(64, 64), FunctionalDropoutBlock(), nn.Linear(64, 10)),
            "'net.1' (FunctionalDropoutBlock)",
        ),
    ],
    ids=["noisy_module", "functional_dropout_in_parent"],
)
def test_self_check_names_the_module_that_draws_random_numbers(net, culprit):
    callback = LossChangeAllocation(probe_size=256, histograms=False)
    with pytest.warns(UserWarning, match="not deterministic") as caught:
        logger, _ = _fit(net, [callback], max_steps=5)
    messages = [str(w.message) for w in caught if "not deterministic" in str(w.message)]
    assert len(messages) == 1
    assert culprit in messages[0] and "loss_fn=" in messages[0]
    assert callback.probe_is_stochastic is True
    assert logger.series["lca/probe_stochastic"] == {0: 1.0}
    # the same random numbers at every θ: the integral of that one noisy loss still closes
    assert callback.cumulative_relative_error < 1e-3


def test_stochastic_training_step_is_training_bitwise_unchanged():
    def net():
        return nn.Sequential(nn.Linear(64, 64), AlwaysNoisy(), nn.ReLU(), nn.Linear(64, 10))

    _, plain = _fit(net, [], max_steps=5)
    with pytest.warns(UserWarning, match="not deterministic"):
        _, probed = _fit(net, [LossChangeAllocation(probe_size=128, histograms=False)], max_steps=5)
    assert_bitwise_equal(state_of(plain), state_of(probed))


def test_batchnorm_keeps_chunk_statistics_and_modes_are_restored():
    from learnscope._probe import module_modes

    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.BatchNorm1d(4))
    net[3].eval()  # a user-frozen BatchNorm stays in eval mode (its running statistics)
    before = [m.training for m in net.modules()]
    with module_modes(net, "deterministic"):
        assert [m.training for m in net] == [False, True, False, False]
        assert net.training is False
    assert [m.training for m in net.modules()] == before
    with module_modes(net, "eval"):
        assert not any(m.training for m in net.modules())
    assert [m.training for m in net.modules()] == before


# --------------------------------------------------------------------------- NFA's forward passes


def test_nfa_self_check_names_the_noisy_module_and_logs_it():
    from learnscope import NeuralFeatureAnsatz

    def net():
        return nn.Sequential(nn.Linear(64, 64), AlwaysNoisy(), nn.ReLU(), nn.Linear(64, 10))

    callback = NeuralFeatureAnsatz(every_n_steps=2, probe_size=128, images=False)
    with pytest.warns(UserWarning, match=r"not deterministic.*'net\.1' \(AlwaysNoisy\)"):
        logger, _ = _fit(net, [callback], max_steps=4)
    assert callback.probe_is_stochastic is True
    assert logger.series["nfa/probe_stochastic"] == {0: 1.0}


def test_nfa_forward_with_stochastic_layers_in_eval_mode_is_deterministic():
    from learnscope import NeuralFeatureAnsatz

    callback = NeuralFeatureAnsatz(every_n_steps=2, probe_size=128, images=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logger, _ = _fit(ResidualDropPath, [callback], max_steps=4)
    assert not [w for w in caught if "not deterministic" in str(w.message)]
    assert callback.probe_is_stochastic is False
    assert logger.series["nfa/probe_stochastic"] == {0: 0.0}


def test_nfa_refuses_a_prediction_whose_rows_are_not_the_samples():
    """A model that flattens tokens into rows ((n·T, c)) would make the exact G add up a
    sequence's token gradients before squaring them: refused at fit start, with the recipe."""
    from learnscope import NeuralFeatureAnsatz, ProbeError

    class Flattening(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = DigitsTransformer(dropout=0.0)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            tokens = self.inner.encoder(self.inner.embed(x.reshape(x.shape[0], 8, 8)))
            return self.inner.head(tokens).reshape(-1, 10)  # (n·8, 10)

    with pytest.raises(ProbeError, match=r"rows for a probe chunk of .* output_fn=lambda out: out\.view\(-1, T"):
        _fit(Flattening, [NeuralFeatureAnsatz(every_n_steps=2, probe_size=64, images=False)], max_steps=2)


class AuxiliaryHead(nn.Module):
    """Returns (logits, auxiliary logits) when training and logits alone in eval mode, as
    torchvision's GoogLeNet and Inception do: a training_step written for training mode
    cannot run with the module in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Dropout(0.2))
        self.head = nn.Linear(64, 10)
        self.aux = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor):
        hidden = self.body(x)
        return (self.head(hidden), self.aux(hidden)) if self.training else self.head(hidden)


class AuxiliaryClassifier(Classifier):
    def training_step(self, batch, batch_idx):
        x, y = batch
        logits, aux = self(x)
        return F.cross_entropy(logits, y) + 0.3 * F.cross_entropy(aux, y)


def test_a_model_that_fails_in_eval_mode_falls_back_to_its_own_modes_with_one_warning():
    callback = LossChangeAllocation(probe_size=256, histograms=False)
    torch.manual_seed(0)
    logger = MemoryLogger()
    model = AuxiliaryClassifier(AuxiliaryHead(), "sgd", lr=0.05, momentum=0.9)
    with pytest.warns(UserWarning, match=r"cannot be evaluated with the modules in eval mode \(ValueError") as caught:
        trainer(callbacks=[callback], loggers=[logger], max_steps=6).fit(model, digits_loader())
    assert len([w for w in caught if "cannot be evaluated" in str(w.message)]) == 1
    assert sorted(logger.series["lca/total"]) == list(range(6))
    # its own modes with nn.Dropout off: deterministic, and the integral closes
    assert callback.probe_is_stochastic is False
    assert callback.cumulative_relative_error < 1e-3


@pytest.mark.parametrize(
    "tensor",
    [
        torch.randn(3, 70_000, generator=torch.Generator().manual_seed(0)),  # 210 000 elements: 4 blocks
        torch.randn(700, 300, generator=torch.Generator().manual_seed(1)).t(),  # not contiguous
        torch.randn(5000, 2, generator=torch.Generator().manual_seed(2), dtype=torch.complex64),
        torch.tensor(1.5),
    ],
)
def test_self_check_fingerprint_is_the_double_precision_sums_in_blocks(tensor):
    from learnscope._probe import _sums

    wide = tensor.to(torch.complex128 if tensor.is_complex() else torch.float64)
    expected_sum = sum(complex(v).real for v in wide.reshape(-1).tolist())
    expected_abs = sum(abs(complex(v)) for v in wide.reshape(-1).tolist())
    total, magnitude = _sums(tensor)
    assert total == pytest.approx(expected_sum, rel=1e-9, abs=1e-9)
    assert magnitude == pytest.approx(expected_abs, rel=1e-9)


def test_self_check_fingerprint_keeps_no_double_copy_of_an_activation():
    """The fingerprint of a float32 activation allocates at most a quarter of its bytes at
    once (a double copy of it and of ``|x|``, as before, would be four times them)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    from learnscope._probe import _sums

    x = torch.randn(256, 8, 28, 28)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _sums(x)
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, int(node.extra_fields.alloc_size), int(node.extra_fields.ptr)))
        stack.extend(node.children)
    live: dict[int, int] = {}
    total = peak = 0
    for _, size, ptr in sorted(events):
        if size > 0:
            live[ptr] = size
            total += size
            peak = max(peak, total)
        elif ptr in live:
            total -= live.pop(ptr)
    assert 0 < peak <= x.numel() * x.element_size() / 4
