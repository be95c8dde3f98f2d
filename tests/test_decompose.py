"""Specification of ``learnscope.functional.decompose``: the optimizer-aware split of Δ (BRIEF 2.5).

Every test trains a small float64 MLP on scikit-learn's bundled digits with real
torch.optim steps, with the step hooks registered exactly as the LCA callback
registers them: ``capture_step`` in the pre-hook (θ_t snapshotted there too),
``finish_step`` in the post-hook, parts requested after the step.
"""

from __future__ import annotations

import itertools
import math
import shutil
import warnings

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F

from learnscope.functional.decompose import (
    PARTS,
    allocate_part_values,
    allocate_parts,
    capture_step,
    finish_step,
    has_step_model,
    part_values,
    plan_part_values,
    step_parts,
)

DTYPE = torch.float64
MODELLED = ("gradient", "momentum", "weight_decay")


# --------------------------------------------------------------------------- #
# Data, model, hooks
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Four minibatches of 64 standardised digits (real data, bundled with sklearn)."""
    data = load_digits()
    x = torch.tensor(data.data[:256], dtype=DTYPE)
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-6)
    y = torch.tensor(data.target[:256], dtype=torch.long)
    return [(x[i : i + 64], y[i : i + 64]) for i in range(0, 256, 64)]


def make_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 24), nn.Tanh(), nn.Linear(24, 10)).to(DTYPE)


class StepProbe:
    """The callback's use of the module: capture in the pre-hook, finish in the post-hook."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
        self.params = params
        self.record = None
        self.before: list[torch.Tensor] = []
        optimizer.register_step_pre_hook(self._pre)
        optimizer.register_step_post_hook(self._post)

    def _pre(self, optimizer, args, kwargs) -> None:
        self.record = capture_step(optimizer)
        self.before = [p.detach().clone() for p in self.params]

    def _post(self, optimizer, args, kwargs) -> None:
        finish_step(self.record)

    def parts(self) -> list[tuple[nn.Parameter, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]:
        """(param, θ_t, Δ, parts) for every parameter, after a step."""
        out = []
        for param, before in zip(self.params, self.before):
            delta = param.detach() - before
            out.append((param, before, delta, step_parts(self.record, param, delta, before)))
        return out


class PreStepState:
    """Test-only reference: a clone of the optimizer state before each step."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
        optimizer.register_step_pre_hook(self._pre)

    def _pre(self, optimizer, args, kwargs) -> None:
        self.state = {
            p: {k: v.clone() for k, v in optimizer.state.get(p, {}).items() if torch.is_tensor(v)}
            for group in optimizer.param_groups
            for p in group["params"]
        }


def train(make_optimizer, batches, steps: int, *, closure: bool = True, seed: int = 0, hooks: bool = True):
    """Yield (optimizer, probe, reference) after each of ``steps`` real optimizer steps.

    ``closure=True`` steps like Lightning's automatic optimization: the gradient is
    computed inside ``step``, after the pre-hook has fired.
    """
    model = make_mlp(seed)
    params = list(model.parameters())
    optimizer = make_optimizer(params)
    probe = StepProbe(optimizer, params) if hooks else None
    reference = PreStepState(optimizer) if hooks else None

    for _, (x, y) in zip(range(steps), itertools.cycle(batches)):

        def compute_loss(x=x, y=y):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        if closure:
            optimizer.step(compute_loss)
        else:
            compute_loss()
            optimizer.step()
        yield optimizer, probe, reference


def relative_norm(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().sum() / b.abs().sum().clamp_min(1e-300))


# --------------------------------------------------------------------------- #
# Configurations
# --------------------------------------------------------------------------- #

SGD, Adam, AdamW, RMSprop, Adagrad = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.RMSprop,
    torch.optim.Adagrad,
)


def two_groups(cls, first: dict, second: dict):
    """Two parameter groups (layer 0 / layer 2) with different hyper-parameters."""
    return lambda ps: cls([{"params": ps[:2], **first}, {"params": ps[2:], **second}])


CONFIGS = [
    pytest.param(lambda ps: SGD(ps, lr=0.1), id="sgd-plain"),
    pytest.param(lambda ps: SGD(ps, lr=0.1, momentum=0.9), id="sgd-momentum"),
    pytest.param(lambda ps: SGD(ps, lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.05), id="sgd-dampening-wd"),
    pytest.param(lambda ps: SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.05), id="sgd-nesterov-wd"),
    pytest.param(lambda ps: SGD(ps, lr=0.05, momentum=0.8, weight_decay=0.05, maximize=True), id="sgd-maximize"),
    pytest.param(
        lambda ps: SGD(ps, lr=torch.tensor(0.1), momentum=0.9, weight_decay=torch.tensor(0.01)), id="sgd-tensor-lr-wd"
    ),
    pytest.param(two_groups(SGD, dict(lr=0.05, momentum=0.9), dict(lr=0.2)), id="sgd-two-groups"),
    pytest.param(lambda ps: Adam(ps, lr=0.01), id="adam-plain"),
    pytest.param(lambda ps: Adam(ps, lr=0.01, weight_decay=0.05), id="adam-coupled-wd"),
    pytest.param(lambda ps: Adam(ps, lr=0.01, weight_decay=0.05, amsgrad=True), id="adam-amsgrad-wd"),
    pytest.param(
        lambda ps: Adam(ps, lr=0.01, betas=(0.8, 0.99), weight_decay=0.05, maximize=True), id="adam-maximize-wd"
    ),
    pytest.param(
        lambda ps: Adam(ps, lr=0.01, weight_decay=0.05, decoupled_weight_decay=True), id="adam-decoupled-flag"
    ),
    pytest.param(lambda ps: Adam(ps, lr=torch.tensor(0.01), foreach=False), id="adam-tensor-lr"),
    pytest.param(two_groups(Adam, dict(lr=0.01, betas=(0.5, 0.9)), dict(lr=0.02, amsgrad=True)), id="adam-two-groups"),
    pytest.param(lambda ps: AdamW(ps, lr=0.01, weight_decay=0.1), id="adamw-wd"),
    pytest.param(
        lambda ps: AdamW(ps, lr=0.01, weight_decay=0.1, amsgrad=True, maximize=True), id="adamw-amsgrad-maximize"
    ),
    pytest.param(lambda ps: RMSprop(ps, lr=0.01), id="rmsprop-plain"),
    pytest.param(lambda ps: RMSprop(ps, lr=0.01, momentum=0.9), id="rmsprop-momentum"),
    pytest.param(
        lambda ps: RMSprop(ps, lr=0.01, momentum=0.9, centered=True, weight_decay=0.05),
        id="rmsprop-centered-momentum-wd",
    ),
    pytest.param(
        lambda ps: RMSprop(ps, lr=0.01, alpha=0.9, centered=True, maximize=True), id="rmsprop-centered-maximize"
    ),
    pytest.param(lambda ps: Adagrad(ps, lr=0.1), id="adagrad-plain"),
    pytest.param(lambda ps: Adagrad(ps, lr=0.1, lr_decay=0.2, weight_decay=0.05), id="adagrad-lr-decay-wd"),
    pytest.param(
        lambda ps: Adagrad(ps, lr=0.1, initial_accumulator_value=0.1, maximize=True), id="adagrad-accumulator-maximize"
    ),
]


def _float(x) -> float:
    return float(x) if torch.is_tensor(x) else x


def assert_split_matches_pre_step_state(optimizer, param, theta, parts, pre_state, post_state) -> None:
    """Check the split against the BRIEF formulas written with the *pre-step* state.

    The module never sees the pre-step state (it works from the state after the
    step), so this pins each part, not only their sum. Adam's and the adaptive
    methods' denominators D cancel in the cross-products used below.
    """
    group = next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))
    s = -1.0 if group["maximize"] else 1.0
    g = param.grad
    lr, wd = _float(group["lr"]), _float(group["weight_decay"])
    grad_part, momentum, decay = parts["gradient"], parts["momentum"], parts["weight_decay"]
    scale = grad_part.abs().max() * (g.abs().max() + theta.abs().max())

    def close(a, b, tol=1e-9):
        assert float((a - b).abs().max()) <= tol * float(scale) + 1e-300

    # The gradient part always opposes s·g: a positive per-parameter scaling of −s·g.
    assert bool((grad_part * (s * g) <= 0).all())

    if isinstance(optimizer, SGD):
        mu, tau = group["momentum"], group["dampening"]
        buf_prev = pre_state.get("momentum_buffer")
        first = mu == 0 or buf_prev is None
        a = 1.0 if first else 1.0 - tau
        coef = 1.0 + mu * a if (group["nesterov"] and mu != 0) else a
        close(grad_part, -lr * coef * s * g)
        close(decay, -lr * coef * wd * theta)
        expected_momentum = (
            torch.zeros_like(theta) if first else -lr * mu * (mu if group["nesterov"] else 1.0) * buf_prev
        )
        close(momentum, expected_momentum)
    elif isinstance(optimizer, Adam):  # AdamW too
        beta1 = group["betas"][0]
        decoupled = isinstance(optimizer, AdamW) or group["decoupled_weight_decay"]
        m_prev = pre_state.get("exp_avg", torch.zeros_like(theta))
        # momentum/gradient = β1·m_{t−1} / ((1−β1)·s·g) with D cancelling
        close(momentum * ((1 - beta1) * s * g), grad_part * (beta1 * m_prev))
        if decoupled:
            close(decay, -lr * wd * theta)
        else:
            close(decay * (s * g), grad_part * (wd * theta))
        if float(post_state["step"]) == 1:
            assert bool((momentum == 0).all())
    elif isinstance(optimizer, RMSprop):
        mu = group["momentum"]
        b_prev = pre_state.get("momentum_buffer", torch.zeros_like(theta))
        close(momentum, -lr * mu * b_prev)
        close(decay * (s * g), grad_part * (wd * theta))
    elif isinstance(optimizer, Adagrad):
        assert bool((momentum == 0).all())
        close(decay * (s * g), grad_part * (wd * theta))
    else:  # pragma: no cover
        raise AssertionError(type(optimizer))


# --------------------------------------------------------------------------- #
# The split is exact
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("make_optimizer", CONFIGS)
def test_parts_sum_to_delta_and_the_residual_vanishes(make_optimizer, batches):
    worst_sum, worst_residual = 0.0, 0.0
    for optimizer, probe, reference in train(make_optimizer, batches, steps=5):
        assert probe.record.modelled and probe.record.unmodelled_reason is None
        for param, theta, delta, parts in probe.parts():
            assert tuple(parts) == PARTS
            total = sum(parts[name] for name in PARTS)
            worst_sum = max(worst_sum, relative_norm(total, delta))
            modelled_size = sum(parts[name].abs().sum() for name in PARTS)
            worst_residual = max(worst_residual, float(parts["residual"].abs().sum() / modelled_size))
            assert_split_matches_pre_step_state(
                optimizer, param, theta, parts, reference.state[param], optimizer.state[param]
            )
    assert worst_sum <= 1e-6
    assert worst_residual <= 1e-6
    # float64: rounding only
    assert worst_residual <= 1e-12


def test_plain_sgd_has_only_a_gradient_part_equal_to_minus_lr_times_g(batches):
    lr = 0.1
    for _optimizer, probe, _ in train(lambda ps: SGD(ps, lr=lr), batches, steps=3):
        for param, _, delta, parts in probe.parts():
            assert torch.equal(parts["momentum"], torch.zeros_like(delta))
            assert torch.equal(parts["weight_decay"], torch.zeros_like(delta))
            assert torch.equal(parts["gradient"], -lr * param.grad)
            # θ_{t+1} = θ_t − lr·g in floating point: the residual is one rounding of θ
            assert float(parts["residual"].abs().max()) <= 4 * torch.finfo(DTYPE).eps * float(
                param.detach().abs().max()
            )


def test_adam_gradient_part_always_helps_while_its_momentum_part_sometimes_hurts(batches):
    momentum_hurt = []
    for step, (_optimizer, probe, _) in enumerate(train(lambda ps: Adam(ps, lr=0.01), batches, steps=4)):
        for param, theta, delta, parts in probe.parts():
            g = param.grad  # k = g: the first-order allocation on the minibatch
            nonzero = g != 0
            assert bool((torch.sign(parts["gradient"][nonzero]) == -torch.sign(g[nonzero])).all())
            if step == 0:
                assert torch.equal(parts["momentum"], torch.zeros_like(g))  # m_0 = 0
            else:
                momentum_hurt.append(float((g * parts["momentum"] > 0).float().mean()))
            allocation = allocate_parts(g, probe.record, param, delta, theta)
            assert float(allocation["gradient"]) < 0
    # After the first step some parameters' momentum share raises the minibatch loss.
    assert max(momentum_hurt) > 0.01


# --------------------------------------------------------------------------- #
# What is not modelled
# --------------------------------------------------------------------------- #


class SignSGD(torch.optim.Optimizer):
    """An optimizer learnscope has no model for: θ ← θ − lr·sign(g)."""

    def __init__(self, params, lr: float = 0.01) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(torch.sign(p.grad), alpha=-group["lr"])
        return loss


class SGDSubclass(torch.optim.SGD):
    """A subclass may override ``step``: it is not trusted to be SGD."""


@pytest.mark.parametrize(
    "make_optimizer, name",
    [(lambda ps: SignSGD(ps, lr=0.01), "SignSGD"), (lambda ps: SGDSubclass(ps, lr=0.1), "SGDSubclass")],
)
def test_unknown_optimizer_puts_the_whole_step_in_the_residual_and_says_so(make_optimizer, name, batches):
    for optimizer, probe, _ in train(make_optimizer, batches, steps=2):
        assert not has_step_model(optimizer)
        assert probe.record.modelled is False
        assert probe.record.optimizer_class == name
        assert name in probe.record.unmodelled_reason
        for _param, _, delta, parts in probe.parts():
            assert bool(delta.abs().max() > 0)
            assert torch.equal(parts["residual"], delta)
            for part in MODELLED:
                assert torch.equal(parts[part], torch.zeros_like(delta))


@pytest.mark.parametrize(
    "make_optimizer",
    [lambda ps: AdamW(ps, lr=0.01, weight_decay=0.1), lambda ps: SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1)],
    ids=["adamw", "sgd"],
)
def test_a_parameter_without_gradient_is_skipped_and_has_all_parts_zero(make_optimizer, batches):
    model = make_mlp()
    params = list(model.parameters())
    frozen = params[1]  # first layer's bias: in the optimizer, but it gets no gradient
    frozen.requires_grad_(False)
    optimizer = make_optimizer(params)
    probe = StepProbe(optimizer, params)
    for x, y in batches[:3]:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        parts = dict((id(p), (d, pt)) for p, _, d, pt in probe.parts())
        delta, frozen_parts = parts[id(frozen)]
        assert torch.equal(delta, torch.zeros_like(delta))
        for name in PARTS:
            assert torch.equal(frozen_parts[name], torch.zeros_like(delta))
        assert probe.record.modelled
        assert frozen not in optimizer.state  # the hooks add no state entry


# --------------------------------------------------------------------------- #
# Implementations, hooks, timing
# --------------------------------------------------------------------------- #

VARIANTS = {
    "sgd-plain": (lambda **kw: lambda ps: SGD(ps, lr=0.1, **kw), True),
    "sgd": (lambda **kw: lambda ps: SGD(ps, lr=0.1, momentum=0.9, dampening=0.2, weight_decay=0.05, **kw), True),
    "nesterov": (lambda **kw: lambda ps: SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.05, **kw), True),
    "adam": (lambda **kw: lambda ps: Adam(ps, lr=0.01, weight_decay=0.05, amsgrad=True, **kw), True),
    "adamw": (lambda **kw: lambda ps: AdamW(ps, lr=0.01, weight_decay=0.1, maximize=True, **kw), True),
    "rmsprop": (
        lambda **kw: lambda ps: RMSprop(ps, lr=0.01, momentum=0.9, centered=True, weight_decay=0.05, **kw),
        False,
    ),
    "adagrad": (lambda **kw: lambda ps: Adagrad(ps, lr=0.1, lr_decay=0.1, weight_decay=0.05, **kw), True),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_for_loop_foreach_and_fused_implementations_give_the_same_parts(name, batches):
    make, has_fused = VARIANTS[name]
    flavours = [dict(foreach=False), dict(foreach=True)] + ([dict(fused=True)] if has_fused else [])
    runs = []
    for flavour in flavours:
        steps = []
        for _, probe, _ in train(make(**flavour), batches, steps=4, closure=False):
            steps.append([{k: v.clone() for k, v in parts.items()} for *_, parts in probe.parts()])
            assert probe.record.modelled
        runs.append(steps)
    reference = runs[0]
    for other in runs[1:]:
        for step_ref, step_other in zip(reference, other):
            for parts_ref, parts_other in zip(step_ref, step_other):
                for part in MODELLED:
                    scale = float(parts_ref[part].abs().max()) + float(parts_ref["gradient"].abs().max())
                    assert float((parts_ref[part] - parts_other[part]).abs().max()) <= 1e-10 * scale
                assert float(parts_other["residual"].abs().max()) <= 1e-12 * float(parts_other["gradient"].abs().max())


@pytest.mark.parametrize("name", list(VARIANTS))
def test_hooks_leave_training_bitwise_identical(name, batches):
    make, _ = VARIANTS[name]

    def final_state(hooks: bool):
        model_params = None
        for optimizer, probe, _ in train(make(), batches, steps=20, hooks=hooks):
            if hooks:  # the callback asks for every part of every parameter each step
                for param, theta, delta, _ in probe.parts():
                    allocate_parts(param.grad, probe.record, param, delta, theta)
                    allocate_parts(param.grad, probe.record, param, delta, total=1.0)
                    allocate_part_values(param.grad, probe.record, param, delta)
                    allocate_part_values(torch.ones_like(param), probe.record, param, delta, theta)
            model_params = [p for g in optimizer.param_groups for p in g["params"]]
        return [p.detach().clone() for p in model_params], optimizer.state_dict()

    params_with, state_with = final_state(hooks=True)
    params_without, state_without = final_state(hooks=False)
    assert all(torch.equal(a, b) for a, b in zip(params_with, params_without))
    assert state_with["param_groups"] == state_without["param_groups"]
    assert state_with["state"].keys() == state_without["state"].keys()
    for index, entry in state_without["state"].items():
        assert entry.keys() == state_with["state"][index].keys()
        for key, value in entry.items():
            assert torch.equal(value, state_with["state"][index][key]), (index, key)


@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float-lr", "tensor-lr"])
def test_split_uses_the_learning_rate_in_force_before_the_scheduler_moves_it(tensor_lr, batches):
    schedulers = []

    def make_optimizer(params):
        optimizer = SGD(params, lr=torch.tensor(0.1) if tensor_lr else 0.1, momentum=0.9)
        schedulers.append(torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5))
        return optimizer

    for step, (optimizer, probe, _) in enumerate(train(make_optimizer, batches, steps=4)):
        schedulers[0].step()  # Lightning steps the scheduler before on_train_batch_end
        assert float(optimizer.param_groups[0]["lr"]) == pytest.approx(0.1 * 0.5 ** (step + 1))
        for _param, _, delta, parts in probe.parts():
            assert float(parts["residual"].abs().max()) <= 1e-12 * float(delta.abs().max())


def test_parts_requested_after_the_next_step_or_an_in_place_zero_grad_are_refused(batches):
    records = []
    for optimizer, probe, _ in train(lambda ps: Adam(ps, lr=0.01), batches, steps=2):  # noqa: B007  (the last step's optimizer is used below)
        records.append(probe.record)
    param = probe.params[0]
    with pytest.raises(RuntimeError, match="next step"):
        step_parts(records[0], param, torch.zeros_like(param))
    step_parts(records[1], param, torch.zeros_like(param))  # still current
    optimizer.zero_grad(set_to_none=False)
    with pytest.raises(RuntimeError, match="zeroed"):
        step_parts(records[1], param, torch.zeros_like(param))


def test_sparse_gradient_goes_to_the_residual_and_dense_parameters_stay_modelled():
    embedding = nn.Embedding(20, 4, sparse=True).to(DTYPE)
    head = nn.Linear(4, 1).to(DTYPE)
    params = [embedding.weight, head.weight, head.bias]
    optimizer = SGD(params, lr=0.1, momentum=0.9)
    probe = StepProbe(optimizer, params)
    tokens = torch.tensor([1, 3, 3, 7])
    for _ in range(2):
        optimizer.zero_grad()
        head(embedding(tokens)).pow(2).mean().backward()
        optimizer.step()
        [(_, _, delta, sparse_parts), *dense] = probe.parts()
        assert probe.record.modelled is False and "sparse" in probe.record.unmodelled_reason
        assert torch.equal(sparse_parts["residual"], delta) and bool(delta.abs().max() > 0)
        for _, _, delta, parts in dense:
            assert float(parts["residual"].abs().max()) <= 1e-12 * float(delta.abs().max())


# --------------------------------------------------------------------------- #
# Allocation, AMP, complex, differentiable
# --------------------------------------------------------------------------- #


def test_allocations_per_part_sum_to_the_total_allocation(batches):
    generator = torch.Generator().manual_seed(1)
    for _, probe, _ in train(lambda ps: AdamW(ps, lr=0.01, weight_decay=0.1), batches, steps=3):
        for param, theta, delta, _ in probe.parts():
            k = torch.randn(param.shape, generator=generator, dtype=DTYPE)
            allocation = allocate_parts(k, probe.record, param, delta, theta)
            assert tuple(allocation) == PARTS and all(a.dim() == 0 for a in allocation.values())
            total = float((k * delta).sum())
            assert abs(float(sum(allocation.values())) - total) <= 1e-12 * float((k * delta).abs().sum())
            assert abs(float(allocation["residual"])) <= 1e-12 * float((k * delta).abs().sum())


def test_fused_optimizer_under_grad_scaler_uses_unscaled_gradient_and_skips_inf_steps(batches):
    model = make_mlp()
    params = list(model.parameters())
    optimizer = Adam(params, lr=0.01, weight_decay=0.05, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    probe = StepProbe(optimizer, params)
    for step, (x, y) in enumerate(batches * 2):
        optimizer.zero_grad()
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        if step == 2:
            params[0].grad[0, 0] = float("inf")
        scaler.step(optimizer)  # fused: the kernel unscales p.grad and honours found_inf
        scaler.update()
        for _param, _, delta, parts in probe.parts():
            if step == 2:
                assert torch.equal(delta, torch.zeros_like(delta))
                assert all(torch.equal(parts[n], torch.zeros_like(delta)) for n in PARTS)
            else:
                assert float(parts["residual"].abs().sum()) <= 1e-12 * float(parts["gradient"].abs().sum())


def _complex_least_squares_steps(make_optimizer):
    """Four steps of a complex least-squares problem: (probe, z, generator) after each,
    the generator (seed 0) having drawn the problem's data first."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(32, 6, dtype=torch.complex128, generator=generator)
    b = torch.randn(32, dtype=torch.complex128, generator=generator)
    z = nn.Parameter(torch.zeros(6, dtype=torch.complex128))
    optimizer = make_optimizer([z])
    probe = StepProbe(optimizer, [z])
    for _ in range(4):
        optimizer.zero_grad()
        (a @ z - b).abs().pow(2).mean().backward()
        optimizer.step()
        yield probe, z, generator


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda ps: SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.05),
        lambda ps: Adam(ps, lr=0.01, weight_decay=0.05, amsgrad=True),
        lambda ps: RMSprop(ps, lr=0.01, momentum=0.5, centered=True),
        lambda ps: Adagrad(ps, lr=0.1, weight_decay=0.05),
    ],
    ids=["sgd", "adam", "rmsprop", "adagrad"],
)
def test_complex_parameters_are_split_on_their_real_view(make_optimizer):
    for probe, _, _ in _complex_least_squares_steps(make_optimizer):
        [(_, _, delta, parts)] = probe.parts()
        assert parts["gradient"].dtype == torch.complex128
        assert float(parts["residual"].abs().sum()) <= 1e-12 * float(delta.abs().sum())


differentiable_optimizers = pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda ps: SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.05, differentiable=True),
        lambda ps: Adam(ps, lr=0.01, weight_decay=0.05, differentiable=True),
        lambda ps: RMSprop(ps, lr=0.01, momentum=0.5, differentiable=True),
        lambda ps: Adagrad(ps, lr=0.1, differentiable=True),
    ],
    ids=["sgd", "adam", "rmsprop", "adagrad"],
)


def _differentiable_steps(make_optimizer, batches):
    """Three steps of a differentiable optimizer on plain tensors (it steps under grad mode,
    so gradients are assigned by hand); yields the probe after each step."""
    model = make_mlp()
    params = [p.detach().clone() for p in model.parameters()]
    optimizer = make_optimizer(params)
    probe = StepProbe(optimizer, params)
    for x, y in batches[:3]:
        leaves = [p.clone().requires_grad_(True) for p in params]
        out = F.linear(torch.tanh(F.linear(x, leaves[0], leaves[1])), leaves[2], leaves[3])
        grads = torch.autograd.grad(F.cross_entropy(out, y), leaves)
        for p, g in zip(params, grads):
            p.grad = g
        optimizer.step()
        yield probe


@differentiable_optimizers
def test_differentiable_optimizers_follow_the_same_model(make_optimizer, batches):
    # Adam's bias corrections are float32 numbers under differentiable=True
    for probe in _differentiable_steps(make_optimizer, batches):
        for _, _, delta, parts in probe.parts():
            assert float(parts["residual"].abs().sum()) <= 1e-12 * float(delta.abs().sum())


# --------------------------------------------------------------------------- #
# Fused allocations (no part tensors) against the materialised split
# --------------------------------------------------------------------------- #


def _real_view(tensor: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(tensor) if tensor.is_complex() else tensor


def materialised_allocations(k, record, param, delta, theta) -> tuple[dict[str, float], float, float]:
    """Σ_i k_i·part_i in float64 from ``step_parts`` (the part tensors, split in float64).

    Returns the allocations, Σ k·Δ and the scale Σ_part Σ_i |k_i·part_i| + Σ_i |k_i·Δ_i|,
    which bounds every intermediate of the fused forms (m_t/D = β1·m_{t−1}/D + (1−β1)·g'/D,
    buf_t = μ·buf_{t−1} + a·g', and likewise: each term is one part).
    """
    wide = torch.complex128 if delta.is_complex() else torch.float64
    parts = step_parts(record, param, delta.to(wide), theta.to(wide))
    k64 = _real_view(k).double()
    products = {name: k64 * _real_view(part) for name, part in parts.items()}
    values = {name: float(p.sum()) for name, p in products.items()}
    total_products = k64 * _real_view(delta.to(wide))
    scale = sum(float(p.abs().sum()) for p in products.values()) + float(total_products.abs().sum())
    return values, float(total_products.sum()), scale


def assert_fused_matches(k, record, param, delta, theta, tol: float) -> None:
    """Every entry point of the fused path equals the materialised float64 allocations within tol·scale."""
    expected, total, scale = materialised_allocations(k, record, param, delta, theta)
    work = torch.promote_types(_real_view(k).dtype, _real_view(delta).dtype)
    k_before = k.clone()
    results = {
        "parts(θ_t)": {n: float(v) for n, v in allocate_parts(k, record, param, delta, theta).items()},
        "parts()": {n: float(v) for n, v in allocate_parts(k, record, param, delta).items()},
        "parts(total)": {n: float(v) for n, v in allocate_parts(k, record, param, delta, total=total).items()},
        "values(θ_t)": allocate_part_values(k, record, param, delta, theta),
        "values(total)": allocate_part_values(k, record, param, delta, total=total),
    }
    tensors = allocate_parts(k, record, param, delta)
    assert tuple(tensors) == PARTS
    assert all(v.dim() == 0 and v.dtype == work for v in tensors.values())
    assert torch.equal(k, k_before)
    for how, got in results.items():
        assert tuple(got) == PARTS, how
        for name in PARTS:
            assert abs(got[name] - expected[name]) <= tol * scale, (how, name, got[name], expected[name], scale)
    # With the total given, the parts sum to it (float64 Python sums: to rounding of the total).
    given = results["values(total)"]
    assert abs(math.fsum(given.values()) - total) <= 4 * torch.finfo(torch.float64).eps * (abs(total) + scale)


# Float64 models: the fused forms regroup the same float64 products (D formed as
# (√v̂ + ε·√(1−β2^t))/√(1−β2^t) instead of √v̂/√(1−β2^t) + ε, dots instead of products
# then sums), a few units of 2⁻⁵³ per term; 1e-12 of the scale leaves > 100× margin
# for the ≤ 1536-element dots here and fails on any wrong coefficient or sign.
FLOAT64_TOL = 1e-12


@pytest.mark.parametrize("make_optimizer", CONFIGS)
def test_fused_allocations_equal_the_materialised_parts(make_optimizer, batches):
    generator = torch.Generator().manual_seed(3)
    for _, probe, _ in train(make_optimizer, batches, steps=4):
        for param, theta, delta, _ in probe.parts():
            # k = g (the cheap mode) and an unrelated k (a probe's path gradient)
            assert_fused_matches(param.grad.clone(), probe.record, param, delta, theta, FLOAT64_TOL)
            k = torch.randn(param.shape, generator=generator, dtype=DTYPE)
            assert_fused_matches(k, probe.record, param, delta, theta, FLOAT64_TOL)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_fused_allocations_for_loop_foreach_and_fused_implementations(name, batches):
    make, has_fused = VARIANTS[name]
    for flavour in [dict(foreach=False), dict(foreach=True)] + ([dict(fused=True)] if has_fused else []):
        for _, probe, _ in train(make(**flavour), batches, steps=3, closure=False):
            for param, theta, delta, _ in probe.parts():
                assert_fused_matches(param.grad.clone(), probe.record, param, delta, theta, FLOAT64_TOL)


def float32_steps(model: nn.Module, make_optimizer, batches, steps: int = 3):
    """Train a float32 ``model`` on ``steps`` digits batches; yield the StepProbe after each step."""
    params = list(model.parameters())
    optimizer = make_optimizer(params)
    probe = StepProbe(optimizer, params)
    for x, y in batches[:steps]:
        optimizer.zero_grad()
        F.cross_entropy(model(x.float()), y).backward()
        optimizer.step()
        yield probe


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda ps: SGD(ps, lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.05),
        lambda ps: SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.05, maximize=True),
        lambda ps: Adam(ps, lr=0.01, weight_decay=0.05),
        lambda ps: Adam(ps, lr=0.01, weight_decay=0.05, amsgrad=True, maximize=True),
        lambda ps: AdamW(ps, lr=0.01, weight_decay=0.1, amsgrad=True),
        lambda ps: RMSprop(ps, lr=0.01, momentum=0.9, centered=True, weight_decay=0.05),
        lambda ps: Adagrad(ps, lr=0.1, lr_decay=0.1, weight_decay=0.05),
    ],
    ids=["sgd", "nesterov-maximize", "adam-wd", "adam-amsgrad-maximize", "adamw-amsgrad", "rmsprop", "adagrad"],
)
def test_fused_allocations_of_a_float32_model(make_optimizer, batches):
    # float32 dots and denominators against the float64 split of the same float32 state:
    # float32 rounding (2⁻²⁴ ≈ 6e-8) of D, of the state and of the dots' partial sums. 1e-6
    # of the scale leaves ≈ 10× margin over what the materialised float32 split itself
    # shows (≈ 1e-7 on the 784-512-512-10 MLP) and is far below any modelling error.
    for probe in float32_steps(make_mlp().float(), make_optimizer, batches):
        for param, theta, delta, _ in probe.parts():
            assert delta.dtype == torch.float32
            assert_fused_matches(param.grad.clone(), probe.record, param, delta, theta, 1e-6)
            # a float64 k promotes the whole allocation to float64
            k64 = param.grad.double()
            assert allocate_parts(k64, probe.record, param, delta)["gradient"].dtype == torch.float64
            assert_fused_matches(k64, probe.record, param, delta, theta, 1e-6)


def test_many_parameters_read_back_at_once_equal_each_read_back_alone(batches):
    # the callback plans every parameter's dots, then reads them all back in one sync
    momentum = []
    for probe in float32_steps(make_mlp().float(), lambda ps: Adam(ps, lr=0.01, weight_decay=0.05), batches):
        parts = list(probe.parts())
        plans, alone = [], []
        for i, (param, _theta, delta, _) in enumerate(parts):
            k = param.grad.clone() if i % 2 else param.grad.double()  # mixed float32 / float64 dots
            total = None if i % 3 else float((k.double() * delta.double()).sum())
            plans.append(plan_part_values(k, probe.record, param, delta, total=total))
            alone.append(allocate_part_values(k, probe.record, param, delta, total=total))
        together = part_values(plans)
        assert len(together) == len(parts) > 2 and together == alone
        momentum += [v["momentum"] for v in together]
    assert any(m != 0.0 for m in momentum)  # Adam's steps after the first have momentum parts


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda ps: SGD(ps, lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.05),
        lambda ps: Adam(ps, lr=0.01, weight_decay=0.05),
        lambda ps: AdamW(ps, lr=0.01, weight_decay=0.1),
        lambda ps: RMSprop(ps, lr=0.01, momentum=0.9, centered=True, weight_decay=0.05),
    ],
    ids=["sgd", "adam-wd", "adamw", "rmsprop-centered"],
)
def test_one_plan_per_group_and_step_serves_every_parameter(make_optimizer, batches):
    # Each group's symbolic plan (dots and rows) is formed on its first parameter and replayed
    # for the others: in any order, with or without θ_t and the total, each parameter's
    # values still equal its own materialised float64 parts.
    for probe in float32_steps(make_mlp().float(), make_optimizer, batches):
        parts = list(probe.parts())[::-1]
        plans, expected = [], []
        for i, (param, theta, delta, _) in enumerate(parts):
            values, total, scale = materialised_allocations(param.grad, probe.record, param, delta, theta)
            before = theta if i % 2 else None
            plans.append(
                plan_part_values(param.grad, probe.record, param, delta, before, total=None if i % 3 else total)
            )
            expected.append((values, scale))
        for got, (values, scale) in zip(part_values(plans), expected):
            for name in PARTS:
                assert abs(got[name] - values[name]) <= 1e-6 * scale, (name, got[name], values[name])
        updates = list(probe.record._updates.values())
        assert len(updates) == 1 and set(updates[0].plans) == {(True,), (False,)}  # θ_t given or not


def test_fused_allocations_of_skipped_unmodelled_and_sparse_parameters(batches):
    # skipped: a parameter without gradient has all parts 0 and residual k·Δ = 0
    model = make_mlp()
    params = list(model.parameters())
    params[1].requires_grad_(False)
    optimizer = AdamW(params, lr=0.01, weight_decay=0.1)
    probe = StepProbe(optimizer, params)
    for x, y in batches[:2]:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        k = torch.ones_like(params[1])
        _, _, delta, _ = probe.parts()[1]
        assert allocate_part_values(k, probe.record, params[1], delta) == dict.fromkeys(PARTS, 0.0)
        assert allocate_part_values(k, probe.record, params[1], delta, total=0.0) == dict.fromkeys(PARTS, 0.0)
        assert all(float(v) == 0.0 for v in allocate_parts(k, probe.record, params[1], delta).values())
    # unmodelled: everything is residual, = k·Δ or the given total
    for _, probe, _ in train(lambda ps: SignSGD(ps, lr=0.01), batches, steps=2):
        for param, theta, delta, _ in probe.parts():
            k = param.grad.clone()
            total = float((k * delta).sum())
            values = allocate_part_values(k, probe.record, param, delta, theta)
            assert values["residual"] == pytest.approx(total, rel=1e-12) and total != 0
            assert [values[n] for n in MODELLED] == [0.0, 0.0, 0.0]
            assert allocate_part_values(k, probe.record, param, delta, total=total)["residual"] == total
            tensors = allocate_parts(k, probe.record, param, delta, total=total)
            assert float(tensors["residual"]) == total and all(float(tensors[n]) == 0.0 for n in MODELLED)
    # sparse gradient: that parameter is unmodelled, the dense ones fused
    embedding = nn.Embedding(20, 4, sparse=True).to(DTYPE)
    head = nn.Linear(4, 1).to(DTYPE)
    params = [embedding.weight, head.weight, head.bias]
    optimizer = SGD(params, lr=0.1, momentum=0.9)
    probe = StepProbe(optimizer, params)
    for _ in range(2):
        optimizer.zero_grad()
        head(embedding(torch.tensor([1, 3, 3, 7]))).pow(2).mean().backward()
        optimizer.step()
        [(sparse, theta, delta, _), *dense] = probe.parts()
        k = torch.ones_like(sparse)
        values = allocate_part_values(k, probe.record, sparse, delta, theta)
        assert values["residual"] == pytest.approx(float(delta.sum()), rel=1e-12)
        for param, theta, delta, _ in dense:
            assert_fused_matches(param.grad.clone(), probe.record, param, delta, theta, FLOAT64_TOL)


def test_fused_allocations_of_a_step_skipped_for_found_inf(batches):
    model = make_mlp()
    params = list(model.parameters())
    optimizer = Adam(params, lr=0.01, weight_decay=0.05, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    probe = StepProbe(optimizer, params)
    for step, (x, y) in enumerate(batches):
        optimizer.zero_grad()
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        if step == 2:
            params[0].grad[0, 0] = float("inf")
        scaler.step(optimizer)
        scaler.update()
        for param, theta, delta, _ in probe.parts():
            k = torch.ones_like(param)
            if step == 2:
                assert allocate_part_values(k, probe.record, param, delta, theta) == dict.fromkeys(PARTS, 0.0)
            else:
                assert_fused_matches(k, probe.record, param, delta, theta, FLOAT64_TOL)


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda ps: SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.05),
        lambda ps: Adam(ps, lr=0.01, weight_decay=0.05, amsgrad=True),
        lambda ps: AdamW(ps, lr=0.01, weight_decay=0.05),
        lambda ps: RMSprop(ps, lr=0.01, momentum=0.5, centered=True, weight_decay=0.05),
        lambda ps: Adagrad(ps, lr=0.1, weight_decay=0.05),
    ],
    ids=["sgd", "adam", "adamw", "rmsprop", "adagrad"],
)
def test_fused_allocations_of_complex_parameters_use_the_real_inner_product(make_optimizer):
    for probe, z, generator in _complex_least_squares_steps(make_optimizer):
        [(_, theta, delta, _)] = probe.parts()
        k = torch.randn(6, dtype=torch.complex128, generator=generator)
        assert_fused_matches(k, probe.record, z, delta, theta, FLOAT64_TOL)
        values = allocate_part_values(k, probe.record, z, delta)
        # Re(k)·Re(Δ) + Im(k)·Im(Δ)
        assert math.fsum(values.values()) == pytest.approx(float((k.conj() * delta).real.sum()), rel=1e-12)


@differentiable_optimizers
def test_fused_allocations_of_differentiable_optimizers(make_optimizer, batches):
    for probe in _differentiable_steps(make_optimizer, batches):
        for param, theta, delta, _ in probe.parts():
            assert_fused_matches(param.grad.clone(), probe.record, param, delta, theta, FLOAT64_TOL)


def test_fused_allocations_are_refused_after_the_gradient_changed(batches):
    for optimizer, probe, _ in train(lambda ps: SGD(ps, lr=0.1, momentum=0.9), batches, steps=2):  # noqa: B007  (the last step's optimizer and probe are used below)
        pass
    param = probe.params[0]
    allocate_part_values(param.grad.clone(), probe.record, param, torch.zeros_like(param))
    optimizer.zero_grad(set_to_none=False)
    with pytest.raises(RuntimeError, match="zeroed"):
        allocate_part_values(torch.ones_like(param), probe.record, param, torch.zeros_like(param))
    with pytest.raises(RuntimeError, match="zeroed"):
        allocate_parts(torch.ones_like(param), probe.record, param, torch.zeros_like(param), total=0.0)


@pytest.mark.skipif(
    not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")), reason="torch.compile on CPU needs a C++ compiler"
)
@pytest.mark.parametrize(
    "make_optimizer, fused_runs",
    [
        (lambda ps: Adam(ps, lr=0.01), True),
        (lambda ps: Adam(ps, lr=0.01, amsgrad=True, maximize=True), True),
        (lambda ps: AdamW(ps, lr=0.01, weight_decay=0.1), True),
        (lambda ps: Adam(ps, lr=0.01, weight_decay=0.05), False),  # coupled decay needs q·θ: q is formed
    ],
    ids=["adam", "adam-amsgrad-maximize", "adamw", "adam-coupled-wd"],
)
def test_compiled_adam_dots_equal_the_materialised_parts(make_optimizer, fused_runs, batches, monkeypatch):
    """fused=True (the callback's compile_statistics): on a tensor of ≥ 2¹⁶ entries Adam's dots
    (k/D)·g and (k/D)·m come from one compiled pass; the parts equal the float64 split within
    float32 rounding, as the eager float32 dots do, and Δ is never formed when the total is given."""
    import learnscope.functional.decompose as decompose_module

    calls = []
    real = decompose_module._fused_scaled_sums
    monkeypatch.setattr(decompose_module, "_fused_scaled_sums", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 1100), nn.Tanh(), nn.Linear(1100, 10))  # 70 400 weights
    for probe in float32_steps(model, make_optimizer, batches):
        param, theta, delta, _ = probe.parts()[0]
        for k in (param.grad.clone(), torch.randn_like(param)):
            expected, total, scale = materialised_allocations(k, probe.record, param, delta, theta)
            formed = []

            def deferred(formed=formed, delta=delta):
                formed.append(1)
                return delta

            got = allocate_part_values(k, probe.record, param, deferred, total=total, fused=True)
            eager = allocate_part_values(k, probe.record, param, delta, total=total)
            for name in PARTS:
                assert abs(got[name] - expected[name]) <= 1e-6 * scale, (name, got[name], expected[name])
                assert abs(got[name] - eager[name]) <= 1e-6 * scale
            assert abs(math.fsum(got.values()) - total) <= 1e-12 * scale
            if fused_runs:
                assert not formed, "Δ was formed although no part needs it"
    assert bool(calls) is fused_runs


def test_fused_adam_dots_fall_back_to_eager_with_one_warning_when_compiling_fails(batches, monkeypatch):
    import learnscope._compile

    def broken(*args, **kwargs):
        raise RuntimeError("no toolchain here")

    monkeypatch.setattr(learnscope._compile, "_KERNELS", {})
    monkeypatch.setattr(torch, "compile", broken)
    model = nn.Sequential(nn.Linear(64, 1100), nn.Tanh(), nn.Linear(1100, 10))  # 70 400 weights
    probes = float32_steps(model, lambda ps: Adam(ps, lr=0.01), batches, steps=2)
    for step, probe in enumerate(probes):
        param, _, delta, _ = probe.parts()[0]
        k = param.grad.clone()
        if step == 0:
            with pytest.warns(RuntimeWarning, match="torch.compile failed"):
                got = allocate_part_values(k, probe.record, param, delta, fused=True)
        else:  # failed once in this process: eager from then on, silently
            with warnings.catch_warnings():
                warnings.simplefilter("error", RuntimeWarning)
                got = allocate_part_values(k, probe.record, param, delta, fused=True)
        assert got == allocate_part_values(k, probe.record, param, delta)
