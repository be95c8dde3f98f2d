"""The callbacks under sharded training (docs/fsdp.md).

Lightning's ModelParallelStrategy (FSDP2 ``fully_shard``) runs on CPU with gloo, so the
2-process tests run here and in CI; ``GLOO_SOCKET_IFNAME=lo`` keeps gloo on the loopback
interface (without it gloo crashed in ``init_process_group`` on this machine when the
processes were launched by hand). Lightning's FSDPStrategy (FSDP1) refuses a CPU
accelerator: it is covered by the ``cuda``-marked tests, skipped without GPUs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy, SingleDeviceStrategy
from torch import nn

from learnscope._probe import ProbeError, require_supported_strategy
from learnscope.functional import allocate_step, gradient_evaluator
from models import digits, mlp

SCRIPTS = Path(__file__).parent / "scripts"
ENV = {**os.environ, "GLOO_SOCKET_IFNAME": "lo"}
REFUSAL = "Supported: a single device or DDP"


def _run(tmp_path: Path, mode: str, ranks: int, accelerator: str = "cpu") -> list[dict]:
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / "fsdp_run.py"), str(tmp_path), mode],
        capture_output=True,
        text=True,
        timeout=240,
        env={**ENV, "LEARNSCOPE_FSDP_ACCELERATOR": accelerator},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(ranks)]


# -- refusal at setup ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("strategy", "refused"),
    [
        (FSDPStrategy(), True),
        (ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1), True),
        (DDPStrategy(), False),
        (SingleDeviceStrategy("cpu"), False),
    ],
)
def test_sharding_strategies_are_refused_by_name(strategy, refused):
    trainer = SimpleNamespace(strategy=strategy)
    if not refused:
        require_supported_strategy(trainer, owner="LossChangeAllocation")
        return
    with pytest.raises(ProbeError, match=f"LossChangeAllocation does not support {type(strategy).__name__} ") as err:
        require_supported_strategy(trainer, owner="LossChangeAllocation")
    assert REFUSAL in str(err.value) and "docs/fsdp.md" in str(err.value)


@pytest.mark.slow
def test_nfa_under_model_parallel_is_refused_at_setup_on_every_rank(tmp_path):
    """Before the check, NeuralFeatureAnsatz crashed the run in its first probe forward (and
    LossChangeAllocation at its first measured step: ``NotImplementedError: Operator
    c10d.allreduce_.default does not have a sharding strategy registered``)."""
    for rank in _run(tmp_path, "refuse_nfa", ranks=2):
        assert rank["steps"] == 0  # refused before the first optimizer step
        assert rank["error"]["type"] == "ProbeError"
        assert rank["error"]["message"].startswith("NeuralFeatureAnsatz does not support ModelParallelStrategy ")
        assert REFUSAL in rank["error"]["message"]


@pytest.mark.slow
def test_lca_flags_it_cannot_shard_are_refused_at_setup(tmp_path):
    for rank in _run(tmp_path, "bad_config", ranks=2):
        assert rank["steps"] == 0
        assert rank["error"]["message"].startswith(
            "LossChangeAllocation under ModelParallelStrategy (FSDP2) does not support rule='adaptive'"
        )


@pytest.mark.slow
def test_hand_sharded_parameters_are_refused_before_the_first_step(tmp_path):
    (rank,) = _run(tmp_path, "dtensor", ranks=1)
    assert rank["steps"] == 0
    assert rank["error"]["message"].startswith(
        "LossChangeAllocation does not support sharded parameters: 'net.0.weight' is a DTensor"
    )


# -- LCA under ModelParallelStrategy (FSDP2) ----------------------------------------------------

LR, PROBE = 0.05, 256


@pytest.fixture(scope="module")
def fits(tmp_path_factory):
    """2-process fits of the sharded digits MLP (tests/scripts/fsdp_run.py): without callbacks,
    with LCA on every step, every 3rd step on the minibatch, the cheap preset, and resumed."""
    out = tmp_path_factory.mktemp("fsdp_fit")
    for rank in _run(out, "fit", ranks=2):
        assert rank["error"] is None and rank["steps"] == 6
    return torch.load(out / "fit.pt", weights_only=False)


def _probe_evaluator():
    """The probe loss in one process: Σ_c ½ CE(net(x_c), y_c) over the two 128-sample chunks (summed in
    float64, as the probe sums its chunks)."""
    x, y = digits()
    net = mlp()
    chunks = [(x[i : i + 128], y[i : i + 128]) for i in range(0, PROBE, 128)]

    def loss(params):
        params = {n.removeprefix("net."): p for n, p in params.items()}
        return sum(
            nn.functional.cross_entropy(torch.func.functional_call(net, params, (cx,)), cy).double() * 0.5
            for cx, cy in chunks
        )

    return gradient_evaluator(loss)


def _module_sums(tensors: dict[str, torch.Tensor]) -> dict[str, float]:
    sums: dict[str, float] = {}
    for name, t in tensors.items():
        module = name.rpartition(".")[0]
        sums[module] = sums.get(module, 0.0) + float(t.double().sum())
    return sums


@pytest.mark.slow
def test_sharded_training_is_bitwise_unchanged_by_lca(fits):
    plain = fits["plain"]
    assert len(plain) == 12  # 6 parameters and their momentum buffers, gathered
    for run in ("every", "third", "cheap"):
        for key, value in plain.items():
            assert torch.equal(value, fits[run]["state"][key]), f"{run}: {key} differs"


@pytest.mark.slow
def test_sharded_lca_equals_the_unsharded_run_on_the_same_probe_set(fits):
    """Per-module totals, ΔL, the SGD-momentum parts and the helped fraction of every step equal
    one process's values at the same θ_t, θ_{t+1} (gathered), recomputed here from scratch."""
    series, steps = fits["every"]["series"], fits["every"]["steps"]
    assert sorted(steps) == [0, 1, 2, 3, 4, 5]
    evaluate = _probe_evaluator()
    for step, recorded in steps.items():
        end, delta, grad = recorded["end"], recorded["delta"], recorded["grad"]
        single = allocate_step(evaluate, {n: end[n] - delta[n] for n in end}, end, rule="simpson")
        k = single.path_gradient
        for module, value in _module_sums(single.allocations).items():
            assert series[f"lca/layer/{module}"][step] == pytest.approx(value, rel=1e-5)
        assert series["lca/total"][step] == pytest.approx(sum(_module_sums(single.allocations).values()), rel=1e-5)
        assert series["lca/delta_loss"][step] == pytest.approx(single.delta_loss, rel=1e-5)
        # SGD with momentum: Δ = −lr·g − lr·μ·buf_{t−1}, so the gradient part is k·(−lr·g), the momentum part the rest
        gradient_part = _module_sums({n: k[n] * (-LR * grad[n]) for n in end})
        momentum_part = _module_sums({n: k[n] * (delta[n] + LR * grad[n]) for n in end})
        for module in gradient_part:
            assert series[f"lca/part/gradient/{module}"][step] == pytest.approx(gradient_part[module], rel=1e-5)
            assert series[f"lca/part/momentum/{module}"][step] == pytest.approx(
                momentum_part[module],
                rel=1e-5,
                abs=1e-9 if step == 0 else 0.0,  # no momentum before the first step
            )
        helped = sum(int((a < 0).sum()) for a in single.allocations.values())
        assert series["lca/helped_fraction"][step] == helped / sum(t.numel() for t in end.values())


@pytest.mark.slow
def test_sharded_lca_every_third_step_on_the_minibatch(fits):
    """every_n_steps=3, probe='batch' (each rank its own micro-batch: the ranks' losses summed):
    steps 0 and 3 are measured, no rank hangs, and the allocations sum to ΔL up to the trapezoid's error."""
    series = fits["third"]["series"]
    assert sorted(series["lca/total"]) == [0, 3]
    for step in (0, 3):
        assert series["lca/abs_error"][step] < 0.01 * abs(series["lca/delta_loss"][step])


@pytest.mark.slow
def test_sharded_cheap_mode_is_the_applied_gradient_times_the_step(fits):
    """preset='cheap': A = g ⊙ Δ with the gradient the optimizer applied, on the shards."""
    series, steps = fits["cheap"]["series"], fits["cheap"]["steps"]
    assert sorted(steps) == [0, 1, 2, 3, 4, 5] and "lca/delta_loss" not in series
    for step, recorded in steps.items():
        allocations = {n: recorded["grad"][n] * recorded["delta"][n] for n in recorded["end"]}
        for module, value in _module_sums(allocations).items():
            assert series[f"lca/layer/{module}"][step] == pytest.approx(value, rel=1e-5)


@pytest.mark.slow
def test_resume_from_a_sharded_checkpoint_continues_the_cumulative_values(fits):
    """Stopped after 3 steps (a torch.distributed.checkpoint directory) and resumed to 6: the
    cumulative tags go on from the first part's values, and the measured-step count too."""
    first, resumed = fits["resumed"]["first"], fits["resumed"]["series"]
    assert fits["resumed"]["measured_steps"] == 6
    assert sorted(resumed["lca/total"]) == [3, 4, 5]
    for tag in ("layer_cumulative/net.0", "layer_cumulative/net.4", "part_cumulative/gradient"):
        per_step = tag.replace("layer_cumulative", "layer").replace("part_cumulative", "part")
        expected = first[f"lca/{tag}"][2] + sum(resumed[f"lca/{per_step}"][s] for s in (3, 4, 5))
        assert resumed[f"lca/{tag}"][5] == pytest.approx(expected, rel=1e-9)


# -- GPUs (NCCL): skipped without two CUDA devices -------------------------------------------------

two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="cuda: needs 2 GPUs (NCCL)")


@two_gpus
def test_cuda_fsdp1_strategy_is_refused_at_setup(tmp_path):
    """Lightning's FSDPStrategy (FSDP1, flat parameters) runs only on GPUs: refused before the first step."""
    for rank in _run(tmp_path, "fsdp1", ranks=2, accelerator="cuda"):
        assert rank["steps"] == 0
        assert rank["error"]["message"].startswith("LossChangeAllocation does not support FSDPStrategy ")


@two_gpus
def test_cuda_model_parallel_lca_equals_the_unsharded_run(tmp_path):
    """The CPU tests' fits on 2 GPUs with NCCL: bitwise training and the unsharded values."""
    for rank in _run(tmp_path, "fit", ranks=2, accelerator="cuda"):
        assert rank["error"] is None and rank["steps"] == 6
    fits = torch.load(tmp_path / "fit.pt", weights_only=False)
    test_sharded_training_is_bitwise_unchanged_by_lca(fits)
    test_sharded_lca_equals_the_unsharded_run_on_the_same_probe_set(fits)
    test_sharded_cheap_mode_is_the_applied_gradient_times_the_step(fits)
