"""The CUDA subset (issue #19, target 7): the probes on a GPU, checked against
independent computations on the CPU. Every test here is marked ``cuda`` and skips,
with its reason printed by ``pytest -rs``, when no CUDA device is present; run the
subset alone with ``pytest -m cuda -rs``.

* LCA: on a CUDA module, the logged ΔL equals the probe loss evaluated directly (on the
  CPU, in float64) at the parameters the test recorded around each step, and the
  allocation sums to it within the rule's error;
* training with the probes on a GPU stays bitwise what it is without them;
* NFA: the per-layer AGOP WᵀGW from CUDA Grams equals ``torch.func.jacrev``'s on the CPU.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import jacrev, vmap
from torch.utils.data import DataLoader, TensorDataset

from learnscope import LossChangeAllocation, NeuralFeatureAnsatz
from learnscope.functional.nfa import PreactivationGramAccumulator
from models import Classifier, MemoryLogger, digits, digits_loader, mlp, trained_state, trainer

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="cuda: no CUDA device on this machine"),
]


class _RecordParameters:
    """θ_t and θ_{t+1} around every step, copied to the CPU (the test's own record)."""

    def __init__(self) -> None:
        self.before: dict[int, dict[str, torch.Tensor]] = {}
        self.after: dict[int, dict[str, torch.Tensor]] = {}

    def callback(self):
        import lightning.pytorch as pl

        record = self

        class Recorder(pl.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                record.before[trainer.global_step] = _cpu_parameters(pl_module)

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                record.after[trainer.global_step - 1] = _cpu_parameters(pl_module)

        return Recorder()


def _cpu_parameters(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n.removeprefix("net."): p.detach().to("cpu", torch.float64).clone() for n, p in module.named_parameters()}


def test_lca_on_cuda_allocates_the_directly_evaluated_loss_change():
    x, y = digits(torch.float64)
    probe = DataLoader(TensorDataset(x[:512], y[:512]), batch_size=256)
    record = _RecordParameters()
    callback = LossChangeAllocation(probe=probe, rule="simpson")
    logger = MemoryLogger()
    torch.manual_seed(0)
    model = Classifier(optimizer="adam", lr=1e-3)
    fit = trainer(
        callbacks=[record.callback(), callback], loggers=[logger], max_steps=20, precision="64-true", accelerator="cuda"
    )
    fit.fit(model, digits_loader(dtype=torch.float64))
    reference = mlp().to(torch.float64)

    def probe_loss(params: dict[str, torch.Tensor]) -> float:
        out = torch.func.functional_call(reference, params, (x[:512],))
        return float(nn.functional.cross_entropy(out, y[:512]))

    delta, total = logger.series["lca/delta_loss"], logger.series["lca/total"]
    assert sorted(delta) == list(range(20))
    for step in range(20):
        expected = probe_loss(record.after[step]) - probe_loss(record.before[step])
        assert delta[step] == pytest.approx(expected, rel=1e-7, abs=1e-12)
    assert callback.cumulative_relative_error < 0.01
    assert sum(total.values()) == pytest.approx(sum(delta.values()), rel=0.01)


@pytest.mark.parametrize(
    "callbacks",
    [
        lambda: [LossChangeAllocation(probe_size=256)],
        lambda: [LossChangeAllocation(probe="batch", rule="first_order", compile_statistics=False)],
        lambda: [NeuralFeatureAnsatz(every_n_steps=2, probe_size=128)],
    ],
    ids=["simpson", "cheap", "nfa"],
)
def test_training_on_cuda_is_bitwise_unchanged_by_the_probes(callbacks):
    def on_cuda(probes):
        return {k: v.cpu() for k, v in trained_state(Classifier, probes, accelerator="cuda").items()}

    plain, probed = on_cuda([]), on_cuda(callbacks())
    assert plain.keys() == probed.keys()
    for key in plain:
        assert torch.equal(plain[key], probed[key]), f"{key} differs"


def test_nfa_grams_on_cuda_give_the_jacrev_agop():
    x, _ = digits(torch.float64)
    x = x[:128]
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 10))
    net = net.to(torch.float64).eval()
    accumulator = PreactivationGramAccumulator(net.cuda(), ["0", "2"], estimator="exact")
    accumulator.update(x.cuda())
    grams = {name: gram.cpu() for name, gram in accumulator.compute().items()}
    net = net.cpu()
    for index in (0, 2):
        head, tail = net[:index], net[index:]
        h = head(x).detach()
        jacobian = vmap(jacrev(lambda v, tail=tail: tail(v.unsqueeze(0)).squeeze(0)))(h)  # n × c × d
        reference = torch.einsum("ncd,nce->de", jacobian, jacobian) / len(x)
        weight = net[index].weight.detach()
        ours = weight.mT @ grams[str(index)] @ weight
        assert torch.linalg.matrix_norm(ours - reference) <= 1e-10 * torch.linalg.matrix_norm(reference)
