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
from learnscope.functional import allocate_step, gradient_evaluator, nfa_metrics
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
def test_nfa_on_a_2d_mesh_is_refused_before_the_first_step(tmp_path):
    """ModelParallelStrategy with HSDP (fully_shard on a 2-D mesh): refused, naming what is supported."""
    (rank,) = _run(tmp_path, "hsdp", ranks=1)
    assert rank["steps"] == 0
    assert rank["error"]["type"] == "ProbeError"
    assert rank["error"]["message"].startswith(
        "NeuralFeatureAnsatz supports ModelParallelStrategy only with FSDP2 (fully_shard on a 1-D data-parallel "
        "mesh, tensor_parallel_size=1) over every trainable parameter: 'net.0.weight' is a DTensor on a 2-D mesh"
    )


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


# -- the functional block: points written into the live parameters ---------------------------------


def test_written_into_exchanges_the_point_and_restores_both_bitwise(monkeypatch):
    """Inside, the parameters hold the point (exchanged in chunks of 7 elements here, so several
    chunks and a short last one; a float64 point is copied in instead) and the point holds the live
    values; after, both are bitwise as before, .grad is the same object and the buffers are restored."""
    from learnscope.functional import sharded

    monkeypatch.setattr(sharded, "EXCHANGE_CHUNK", 7)
    net = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4))
    params = dict(net.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    grad = params["0.weight"].grad = torch.randn(4, 5)
    point = {n: torch.randn_like(p) for n, p in params.items()}
    point["1.bias"] = point["1.bias"].double()  # another dtype: copied in, the live value saved
    original = {n: t.clone() for n, t in point.items()}
    buffers = {n: b.clone() for n, b in net.named_buffers()}
    with sharded.written_into(params, point, net):
        net(torch.randn(6, 5))  # a train-mode BatchNorm writes its running statistics
        for n, p in params.items():
            assert torch.equal(p.detach(), original[n].to(p.dtype)) and p.grad is None
        assert torch.equal(point["0.weight"], before["0.weight"])  # the live values, parked in the point
    for n, p in params.items():
        assert torch.equal(p.detach(), before[n]) and torch.equal(point[n], original[n])
    assert params["0.weight"].grad is grad
    assert all(torch.equal(b, buffers[n]) for n, b in net.named_buffers())


# -- LCA under ModelParallelStrategy (FSDP2) ----------------------------------------------------

LR, PROBE = 0.05, 256


@pytest.fixture(scope="module")
def fits(tmp_path_factory):
    """2-process fits of the sharded digits MLP (tests/scripts/fsdp_run.py): without callbacks,
    with LCA on every step, every 3rd step on the minibatch, the cheap preset, and resumed; with
    NFA on every step, and NFA every 3rd step beside LCA. ``fits["ranks"]``: each rank's report."""
    out = tmp_path_factory.mktemp("fsdp_fit")
    ranks = _run(out, "fit", ranks=2)
    for rank in ranks:
        assert rank["error"] is None and rank["steps"] == 6
    return {**torch.load(out / "fit.pt", weights_only=False), "ranks": ranks}


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


# -- NFA under ModelParallelStrategy (FSDP2) ----------------------------------------------------


def _reference_grams(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """G_l = (1/n) Σ_x J_xᵀ J_x, J_x = ∂f/∂z_l (10 × k) of one sample, by torch.func.jacrev in
    float64, on the 256 probe samples, at the gathered parameters."""
    net = mlp().double().requires_grad_(False)
    x = digits()[0][:PROBE].double()
    grams = {}
    for index in (0, 2, 4):
        with torch.no_grad():
            for i in (0, 2, 4):
                net[i].weight.copy_(weights[f"net.{i}.weight"].double())
                net[i].bias.copy_(weights[f"net.{i}.bias"].double())
            z = net[: index + 1](x)
        jacobians = torch.vmap(torch.func.jacrev(lambda zi, rest=net[index + 1 :]: rest(zi)))(z)
        grams[f"net.{index}"] = torch.einsum("nck,ncl->kl", jacobians, jacobians) / len(x)
    return grams


def _pearson_and_cosine(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    a, b = a.flatten(), b.flatten()
    cosine = float(a @ b / (a.norm() * b.norm()))
    a, b = a - a.mean(), b - b.mean()
    return float(a @ b / (a.norm() * b.norm())), cosine


def _psd_sqrt(m: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(m)
    return vectors @ torch.diag(values.clamp_min(0).sqrt()) @ vectors.T


@pytest.mark.slow
def test_sharded_nfa_equals_the_unsharded_run_on_the_same_probe_set(fits):
    """Every logged metric of every step equals one process's values at the same (gathered) W, W₀
    and the same probe set: G by jacrev; Pearson and cosine of WᵀW with (WᵀGW)^α (α = 1, ½) and
    ‖W − W₀‖/‖W‖ written out here, the remaining metrics (nulls, spheres, alignments) from
    learnscope.functional.nfa_metrics on those inputs."""
    series, weights = fits["nfa"]["series"], fits["nfa"]["weights"]
    assert sorted(weights) == list(range(7)) and sorted(series["nfa/net.0/pearson_a1"]) == list(range(7))
    for step, at_step in weights.items():
        grams = _reference_grams(at_step)
        if step == 6:  # G itself, whose scale the correlations do not see: every rank's G, not summed over ranks
            for layer, gram in grams.items():
                assert (fits["nfa"]["grams"][layer] - gram).abs().max() <= 1e-5 * gram.abs().max(), layer
        for layer, gram in grams.items():
            w, w0 = at_step[f"{layer}.weight"].double(), weights[0][f"{layer}.weight"].double()
            readout = layer == "net.4"
            expected = nfa_metrics(w, gram, initial_weight=w0, null_draws=8, readout=readout)
            nfm, agop = w.T @ w, w.T @ gram @ w
            expected["pearson_a0.5"], expected["cosine_a0.5"] = _pearson_and_cosine(nfm, _psd_sqrt(agop))
            expected["weight_change"] = float((w - w0).norm() / w.norm())
            if not readout:
                expected["pearson_a1"], expected["cosine_a1"] = _pearson_and_cosine(nfm, agop)
                expected["sphericity"] = float(gram.trace() ** 2 / (len(gram) * (gram @ gram).trace()))
            else:  # G = I there: only the α = ½ correlations and the context metrics are logged
                assert torch.allclose(gram, torch.eye(10, dtype=torch.float64))
            logged = {m.rpartition("/")[2]: v[step] for m, v in series.items() if f"/{layer}/" in m and step in v}
            assert "pearson_a0.5" in logged and ("pearson_a1" in logged) == (not readout)
            for metric, value in logged.items():
                # excess = pearson − null is small: its error is the pearson's, in absolute terms; the
                # null's draws run in float32 (nfa._NULL_DTYPE), where G's round-off shows at ~1e-7
                floor = 2e-5 if metric.startswith(("null_", "excess_")) else 1e-7
                assert value == pytest.approx(expected[metric], rel=1e-5, abs=floor), (step, layer, metric)


@pytest.mark.slow
def test_sharded_nfa_leaves_training_shards_grads_and_rng_bitwise_unchanged(fits):
    """The gathered final parameters and momentum buffers equal the fit without callbacks (NFA every
    step; NFA every 3rd step beside LCA); on each rank, every measurement left the parameter shards,
    their .grad and the RNG state bitwise as before, the parameters still DTensor shards; only rank 0
    holds (and logs) a record."""
    plain = fits["plain"]
    for run in ("nfa", "both"):
        for key, value in plain.items():
            assert torch.equal(value, fits[run]["state"][key]), f"{run}: {key} differs"
    for rank, report in enumerate(fits["ranks"]):
        assert report["nfa_untouched"] and report["param_types"] == ["DTensor"]
        assert report["nfa_record"] == (rank == 0)


@pytest.mark.slow
def test_sharded_nfa_every_third_step_beside_lca(fits):
    """NFA every 3rd step and LCA on every step in one sharded fit: NFA measures steps 0, 3, 6 with
    the values of the every-step fit (the same weights), and LCA's values are those of LCA alone."""
    both, nfa, lca = fits["both"]["series"], fits["nfa"]["series"], fits["every"]["series"]
    for tag in ("nfa/net.0/pearson_a1", "nfa/net.2/pearson_a0.5", "nfa/net.4/pearson_a0.5", "nfa/net.2/null_a1"):
        assert sorted(both[tag]) == [0, 3, 6]
        for step in (0, 3, 6):
            assert both[tag][step] == pytest.approx(nfa[tag][step], rel=1e-9)
    lca_tags = [tag for tag in lca if tag.startswith("lca/")]
    assert len(lca_tags) > 20
    for tag in lca_tags:
        assert both[tag] == lca[tag], tag


@pytest.mark.slow
def test_sharded_nfa_resumes_with_the_initial_weights_of_the_first_part(fits):
    """Stopped after 3 steps (a sharded checkpoint, W₀ saved whole) and resumed to 6: W₀ comes back
    as this rank's shard, and weight_change = ‖W − W₀‖/‖W‖ of the resumed steps is measured from
    the first part's W₀ (the initialisation of every fit here), not from the weights at resume."""
    resumed, initial = fits["nfa_resumed"], fits["nfa"]["weights"][0]
    assert resumed["initial_type"] == "DTensor"
    for layer in ("net.0", "net.2", "net.4"):
        logged = resumed["series"][f"nfa/{layer}/weight_change"]
        assert sorted(logged) == [4, 5, 6]
        w0 = initial[f"{layer}.weight"].double()
        for step in (4, 5, 6):
            w = resumed["weights"][step][f"{layer}.weight"].double()
            assert logged[step] == pytest.approx(float((w - w0).norm() / w.norm()), rel=1e-5)


# -- GPUs (NCCL): skipped without two CUDA devices -------------------------------------------------

two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="cuda: needs 2 GPUs (NCCL)")


@pytest.mark.cuda
@two_gpus
def test_cuda_fsdp1_strategy_is_refused_at_setup(tmp_path):
    """Lightning's FSDPStrategy (FSDP1, flat parameters) runs only on GPUs: refused before the first step."""
    for rank in _run(tmp_path, "fsdp1", ranks=2, accelerator="cuda"):
        assert rank["steps"] == 0
        assert rank["error"]["message"].startswith("LossChangeAllocation does not support FSDPStrategy ")


@pytest.mark.cuda
@two_gpus
def test_cuda_model_parallel_lca_equals_the_unsharded_run(tmp_path):
    """The CPU tests' fits on 2 GPUs with NCCL: bitwise training and the unsharded values."""
    for rank in _run(tmp_path, "fit", ranks=2, accelerator="cuda"):
        assert rank["error"] is None and rank["steps"] == 6
    fits = torch.load(tmp_path / "fit.pt", weights_only=False)
    test_sharded_training_is_bitwise_unchanged_by_lca(fits)
    test_sharded_lca_equals_the_unsharded_run_on_the_same_probe_set(fits)
    test_sharded_cheap_mode_is_the_applied_gradient_times_the_step(fits)
