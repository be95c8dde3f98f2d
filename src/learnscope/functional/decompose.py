"""Optimizer-aware decomposition of one optimizer step (BRIEF 2.5).

For one optimizer step θ_t → θ_{t+1} with Δ = θ_{t+1} − θ_t, the step is split
into additive parts

    Δ = Δ_gradient + Δ_momentum + Δ_weight_decay + Δ_residual

so that the allocations A_part = k · Δ_part (k the path-averaged gradient, BRIEF
2.1) sum exactly to the total allocation k · Δ:

- ``gradient``: the share of the gradient g the optimizer used at this step
  (``p.grad`` as the optimizer saw it: after clipping and unscaling);
- ``momentum``: the share carried over from the optimizer state (SGD's momentum
  buffer, Adam's first moment, RMSprop's momentum buffer);
- ``weight_decay``: the share of the decay term λθ_t (coupled: inside g' = g + λθ_t,
  decoupled: AdamW's −lr·λ·θ_t);
- ``residual`` = Δ − (gradient + momentum + weight_decay): ≈ 0 (rounding) when the
  model explains the step; all of Δ for an optimizer with no model.

Throughout, s = −1 when the group has ``maximize=True`` and +1 otherwise, and
g' = s·g + λθ_t for coupled weight decay (λ = 0 when there is none).

Exact models (torch.optim, every implementation: for-loop, ``foreach``, ``fused``,
``capturable``, ``differentiable``; tensor ``lr`` and betas; complex parameters,
handled on their real view as torch does):

SGD (lr, momentum μ, dampening τ, λ, nesterov)
    buf_t = μ·buf_{t−1} + (1−τ)·g'   (first step: buf_1 = g', no dampening)
    Δ = −lr·buf_t                     (nesterov: Δ = −lr·(g' + μ·buf_t))
    Let a = 1−τ (first step: 1). Without nesterov:
    gradient −lr·a·s·g, weight_decay −lr·a·λ·θ_t, momentum −lr·μ·buf_{t−1}.
    Nesterov: the g' coefficient is 1 + μ·a and momentum −lr·μ²·buf_{t−1}.
    Without momentum (μ = 0): Δ = −lr·g', momentum part 0.

Adam / AdamW (lr, β1, β2, ε, λ, amsgrad), t the step count after the step
    m_t = β1·m_{t−1} + (1−β1)·g',  v_t = β2·v_{t−1} + (1−β2)·g'²
    v̂_t = v_t (amsgrad: max(v̂_{t−1}, v_t), the stored maximum)
    D = (1−β1^t)·(√v̂_t / √(1−β2^t) + ε)
    Δ = −lr·m_t / D   [AdamW / decoupled: − lr·λ·θ_t, and g' has no λθ term]
    gradient −lr·(1−β1)·s·g / D, momentum −lr·β1·m_{t−1} / D,
    weight_decay −lr·(1−β1)·λ·θ_t / D (Adam) or −lr·λ·θ_t (AdamW).

RMSprop (lr, α, ε, λ, momentum μ, centered)
    v_t = α·v_{t−1} + (1−α)·g'²;  centered: ḡ_t = α·ḡ_{t−1} + (1−α)·g', ṽ_t = v_t − ḡ_t²
    D = √ṽ_t + ε
    μ = 0: Δ = −lr·g'/D.  μ > 0: b_t = μ·b_{t−1} + g'/D, Δ = −lr·b_t.
    gradient −lr·s·g/D, weight_decay −lr·λ·θ_t/D, momentum −lr·μ·b_{t−1}.

Adagrad (lr, lr_decay, λ, ε, initial_accumulator_value)
    S_0 = initial_accumulator_value, S_t = S_{t−1} + g'²;  clr = lr / (1 + (t−1)·lr_decay);  D = √S_t + ε
    Δ = −clr·g'/D → gradient −clr·s·g/D, weight_decay −clr·λ·θ_t/D, momentum 0.

The nonlinear denominators D are read from the optimizer state *after* the step,
so each split is exact up to rounding. The state before the step is never
cloned: the carried-over share is recovered from the state after it, e.g.
β1·m_{t−1} = m_t − (1−β1)·g' and μ·buf_{t−1} = buf_t − (1−τ)·g' (on the first
step it is exactly 0). What the model cannot explain lands in the residual, so
a wrong learning rate or an untracked change to θ shows up there.

Not modelled (the whole Δ goes to ``residual``): any other optimizer class,
subclasses of the classes above (they may override ``step``), and parameters
with a sparse gradient. A parameter the optimizer skipped (``grad is None``)
has all parts 0 (its Δ is 0). A step that a ``GradScaler`` skipped inside a
fused optimizer (``found_inf``) has all modelled parts 0.

How to use it from the torch step hooks (the LCA callback does exactly this)::

    def pre_hook(optimizer, args, kwargs):        # before the update
        record = capture_step(optimizer)           # hyper-parameters, LR in force
        theta_before = [p.detach().clone() for p in params]

    def post_hook(optimizer, args, kwargs):       # right after the update
        finish_step(record)                        # references to p.grad and state

    # later, before this optimizer's next step and before grads are zeroed:
    for p, theta_t, k in zip(params, theta_before, path_gradients):
        delta = p.detach() - theta_t
        values = allocate_part_values(k, record, p, delta, total=sum_k_delta)  # floats
        # or allocate_parts(...) for 0-dim tensors (no device sync), or
        # step_parts(record, p, delta, theta_t) for the part tensors themselves

Allocations are fused: no part tensor is formed. Each model writes k·Δ_part as
a linear combination of a few dot products, combined in float64: SGD k·g,
k·buf_t (and k·θ_t with weight decay); Adam with q = k/D formed once, q·g,
q·m_t (and q·θ_t, or k·θ_t for AdamW); RMSprop q·g, k·b_t; Adagrad q·g. The
dots run in the working dtype (float32 dots for a float32 model). Without θ_t,
x·θ_t is x·θ_{t+1} − x·Δ, and k·Δ is the total the caller may pass in. Adam's
capturable / differentiable path (float32 tensor bias corrections) falls back
to the materialised split.

Memory: ``capture_step`` clones only scalars (tensor-valued hyper-parameters)
and one bool per parameter for SGD; ``finish_step`` keeps *references* to
``p.grad`` and to the optimizer's state tensors (plus clones of the scalar step
counters). Nothing of parameter size is copied. An allocation holds at most one
parameter-sized temporary (k/D); ``step_parts`` builds the parts one parameter
at a time. Because the references are live, the parts must be requested before
the optimizer's next step and before the gradients are zeroed in place; a
changed tensor is detected (via its version counter) and raises. Drop the
record when done so that gradients freed by ``zero_grad(set_to_none=True)``
are not kept alive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from learnscope._compile import call_compiled
from learnscope._readback import to_python

__all__ = [
    "PARTS",
    "StepRecord",
    "PartValuesPlan",
    "allocate_part_values",
    "allocate_parts",
    "capture_step",
    "finish_step",
    "has_step_model",
    "part_values",
    "plan_part_values",
    "step_parts",
]

PARTS: tuple[str, ...] = ("gradient", "momentum", "weight_decay", "residual")
"""Names of the parts of Δ, in a fixed order; they sum to Δ."""


# --------------------------------------------------------------------------- #
# Records
# --------------------------------------------------------------------------- #


@dataclass
class _ParamStep:
    """What ``finish_step`` keeps for one parameter that the optimizer updated."""

    group: int
    grad: Tensor | None  # None when unmodelled
    state: dict[str, Tensor]
    step: Any  # step count after the step (float or 0-dim tensor clone), if any
    first_step: bool
    versions: tuple[int, ...]
    unmodelled_reason: str | None = None


@dataclass(eq=False)
class StepRecord:
    """One optimizer step, as captured by the step hooks.

    Attributes:
        optimizer_class: name of the optimizer's class, for messages.
        modelled: False when (part of) the step has no model and goes to the
            ``residual`` part: the caller should emit one info-level message
            with ``unmodelled_reason`` per optimizer class.
        unmodelled_reason: why, or None.
        finished: whether ``finish_step`` has run.
    """

    optimizer: torch.optim.Optimizer = field(repr=False)
    optimizer_class: str
    modelled: bool
    unmodelled_reason: str | None
    groups: list[dict[str, Any]] = field(repr=False)
    _group_of: dict[Tensor, int] = field(default_factory=dict, repr=False)
    _first_step: dict[Tensor, bool] = field(default_factory=dict, repr=False)
    _params: dict[Tensor, _ParamStep] = field(default_factory=dict, repr=False)
    _found_inf: Tensor | None = field(default=None, repr=False)
    _skipped: bool | None = field(default=None, repr=False)
    _scalars: dict[int, dict[str, Any]] = field(default_factory=dict, repr=False)
    finished: bool = False

    def hyperparameters(self, group: int) -> dict[str, Any]:
        """The group's hyper-parameters in force for this step, tensors as floats."""
        if group not in self._scalars:
            self._scalars[group] = {k: _to_python(v) for k, v in self.groups[group].items()}
        return self._scalars[group]

    def step_was_skipped(self) -> bool:
        """True when a GradScaler's ``found_inf`` made a fused optimizer skip the step."""
        if self._skipped is None:
            self._skipped = self._found_inf is not None and bool(self._found_inf.item() != 0)
        return self._skipped


def _snapshot(value: Any) -> Any:
    """A hyper-parameter as it is now: tensors (which schedulers may ``fill_``) cloned."""
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_snapshot(v) for v in value)
    return value


def _to_python(value: Any) -> Any:
    if isinstance(value, Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, (tuple, list)):
        return type(value)(_to_python(v) for v in value)
    return value


# --------------------------------------------------------------------------- #
# Fused allocations: linear forms over a few dot products
# --------------------------------------------------------------------------- #

_Row = dict
"""A linear form: dot index → coefficient; the key ``_TOTAL`` stands for k·Δ."""
_TOTAL = -1


def _rows(*terms: tuple[float, _Row]) -> _Row:
    """Σ c·row over (c, row) pairs."""
    out: dict[int, float] = {}
    for coef, row in terms:
        for index, value in row.items():
            out[index] = out.get(index, 0.0) + coef * value
    return out


class _Form:
    """The dot products an allocation needs, each computed once (no sync).

    A part's allocation k·Δ_part is linear in a few dots such as k·g or
    (k/D)·m_t, so the models return rows of coefficients over ``dots`` instead
    of part tensors. Every tensor here is a real view in the working dtype.
    """

    def __init__(
        self, k: Tensor, delta: Tensor, before: Tensor | None, after: Tensor, working: Any, fused: bool = False
    ) -> None:
        self.k = k
        self.fused = fused  # large tensors' scaled dots in one compiled pass (see scaled_dots)
        self._delta = delta
        self._before = before  # θ_t, when the caller has it
        self._after = after  # θ_{t+1}
        self.working = working  # a tensor as a real view in the working dtype
        self.dots: list[Tensor] = []
        self._index: dict[str, int] = {}

    @property
    def delta(self) -> Tensor:
        if callable(self._delta):  # Δ formed on first use (the callers that have θ_t and θ_{t+1})
            self._delta = self._delta()
        return self.working(self._delta)

    def dot(self, key: str, a: Tensor, b: Tensor) -> _Row:
        """The form 1·(a·b); ``key`` names the product so it is computed once."""
        index = self._index.get(key)
        if index is None:
            index = self._index[key] = len(self.dots)
            self.dots.append(torch.dot(a.reshape(-1), b.reshape(-1)))
        return {index: 1.0}

    def theta(self, key: str, x: Tensor, x_is_k: bool = False) -> _Row:
        """The form x·θ_t: one dot with θ_t if given, else x·θ_{t+1} − x·Δ (k·Δ is the total)."""
        if self._before is not None:
            return self.dot(f"{key}·θ_t", x, self.working(self._before))
        after = self.dot(f"{key}·θ_t+1", x, self.working(self._after))
        delta = {_TOTAL: 1.0} if x_is_k else self.dot(f"{key}·Δ", x, self.delta)
        return _rows((1.0, after), (-1.0, delta))

    def scaled_k(self, denominator: Tensor) -> Tensor:
        """k / D, written over ``denominator`` (a fresh tensor the caller owns)."""
        return torch.div(self.k, denominator, out=denominator)

    def scaled_dots(self, second: Tensor, eps: float, named: dict[str, Tensor]) -> dict[str, _Row] | None:
        """The forms q·x for each named x, q = k / (√second + eps), in one fused pass that
        never writes q (``torch.compile``), or None where that does not apply: not asked
        for (``fused=False``), a small tensor (one compiled call costs ~0.1 ms), or a
        compile failure (one warning; the caller then forms q eagerly)."""
        if not self.fused or self.k.numel() < _FUSED_MIN_NUMEL or any(key in self._index for key in named):
            return None
        sums = _fused_scaled_sums(self.k, second, eps, list(named.values()))
        if sums is None:
            return None
        rows = {}
        for (key, _), value in zip(named.items(), sums.unbind()):
            self._index[key] = len(self.dots)
            self.dots.append(value)
            rows[key] = {self._index[key]: 1.0}
        return rows


# --------------------------------------------------------------------------- #
# Per-optimizer models (one class per optimizer type, one interface)
# --------------------------------------------------------------------------- #


#: Tensors below this size take the eager dots even with ``fused=True``.
_FUSED_MIN_NUMEL = 1 << 16


def _scaled_sums(k: Tensor, second: Tensor, eps: Tensor, xs: list[Tensor]) -> Tensor:
    q = k / (second.sqrt() + eps)
    return torch.stack([(q * x).double().sum() for x in xs])


def _fused_scaled_sums(k: Tensor, second: Tensor, eps: float, xs: list[Tensor]) -> Tensor | None:
    """[Σ q·x for x in xs] in float64 with q = k / (√second + eps), one compiled pass; None
    when compiling fails (one warning per process)."""
    flat = [t.detach().reshape(-1) for t in (k, second, *xs)]
    eps_tensor = torch.tensor(eps, dtype=k.dtype, device=k.device)
    return call_compiled(_scaled_sums, flat[0], flat[1], eps_tensor, flat[2:],
                         purpose="compile_statistics is on (the decomposition's fused dots)")


class _StepModel:
    """Interface: which state to reference, and the modelled parts of Δ.

    ``split`` returns (gradient, momentum, weight_decay) on real views in the
    computation dtype; None stands for an exact zero part. ``hyper`` holds the
    hyper-parameters as Python numbers, ``raw`` as captured (1-element tensors
    kept): where torch forms a scalar from a tensor ``lr`` (float32, say) the
    model forms it the same way, so the rounding matches.
    """

    state_keys: tuple[str, ...] = ()
    has_step_counter: bool = True

    def first_step_from_state_before(self, hyper: dict[str, Any], state: dict[str, Any]) -> bool | None:
        """Whether this step is the first, judged from the state before it (None: not needed)."""
        return None

    def state_keys_for(self, hyper: dict[str, Any]) -> tuple[str, ...]:
        return self.state_keys

    def split(
        self,
        hyper: dict[str, Any],
        raw: dict[str, Any],
        rec: _ParamStep,
        grad: Tensor,
        theta: Tensor,
        state: dict[str, Tensor],
        step: float | Tensor | None,
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        raise NotImplementedError

    def allocate(
        self,
        hyper: dict[str, Any],
        raw: dict[str, Any],
        rec: _ParamStep,
        form: _Form,
        grad: Tensor,
        state: dict[str, Tensor],
        step: float | Tensor | None,
    ) -> tuple[_Row | None, _Row | None, _Row | None] | None:
        """The allocations k·Δ_part as linear forms over a few dot products (see ``_Form``).

        The same model as ``split``, without the part tensors: (gradient, momentum,
        weight_decay) rows, None for an exact zero part; None overall to fall back
        to ``split`` (materialised parts).
        """
        return None


class _SGDModel(_StepModel):
    has_step_counter = False

    def first_step_from_state_before(self, hyper, state):
        # The step that creates the momentum buffer sets buf_1 = g' (no dampening).
        return state.get("momentum_buffer") is None if hyper["momentum"] != 0 else None

    def state_keys_for(self, hyper):
        return ("momentum_buffer",) if hyper["momentum"] != 0 else ()

    def split(self, hyper, raw, rec, grad, theta, state, step):
        lr, mu, tau, wd = hyper["lr"], hyper["momentum"], hyper["dampening"], hyper["weight_decay"]
        sign = -1.0 if hyper["maximize"] else 1.0
        if mu == 0:
            coef, carried = 1.0, None
        else:
            # a: weight of g' in buf_t; first step: buf_1 = g' (no dampening).
            a = 1.0 if rec.first_step else 1.0 - tau
            carried = None
            if not rec.first_step:
                g_eff = grad * sign
                if wd != 0:
                    g_eff = g_eff + wd * theta
                carried = state["momentum_buffer"] - a * g_eff  # μ·buf_{t−1}
            if hyper["nesterov"]:
                coef = 1.0 + mu * a
                carried = None if carried is None else mu * carried
            else:
                coef = a
        gradient = grad * (-lr * coef * sign)
        weight_decay = theta * (-lr * coef * wd) if wd != 0 else None
        momentum = None if carried is None else carried * (-lr)
        return gradient, momentum, weight_decay

    def allocate(self, hyper, raw, rec, form, grad, state, step):
        lr, mu, tau, wd = hyper["lr"], hyper["momentum"], hyper["dampening"], hyper["weight_decay"]
        sign = -1.0 if hyper["maximize"] else 1.0
        kg = form.dot("k·g", form.k, grad)
        theta = form.theta("k", form.k, x_is_k=True) if wd != 0 else {}
        momentum = None
        if mu == 0:
            coef = 1.0
        else:
            a = 1.0 if rec.first_step else 1.0 - tau
            coef = 1.0 + mu * a if hyper["nesterov"] else a
            if not rec.first_step:
                # k·(μ·buf_{t−1}) = k·buf_t − a·(s·k·g + λ·k·θ_t)
                carried = _rows((1.0, form.dot("k·buf", form.k, state["momentum_buffer"])), (-a * sign, kg), (-a * wd, theta))
                momentum = _rows((-lr * (mu if hyper["nesterov"] else 1.0), carried))
        gradient = _rows((-lr * coef * sign, kg))
        weight_decay = _rows((-lr * coef * wd, theta)) if wd != 0 else None
        return gradient, momentum, weight_decay


class _AdamModel(_StepModel):
    def __init__(self, decoupled: bool | None) -> None:
        # None: follow the group's ``decoupled_weight_decay`` flag (Adam).
        self.decoupled = decoupled

    def state_keys_for(self, hyper):
        if hyper.get("amsgrad", False):
            return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
        return ("exp_avg", "exp_avg_sq")

    def split(self, hyper, raw, rec, grad, theta, state, step):
        lr, eps, wd = hyper["lr"], hyper["eps"], hyper["weight_decay"]
        beta1, beta2 = hyper["betas"]
        decoupled = (
            self.decoupled
            if self.decoupled is not None
            else hyper.get("decoupled_weight_decay", False)
        )
        sign = -1.0 if hyper["maximize"] else 1.0
        second = state["max_exp_avg_sq"] if hyper.get("amsgrad", False) else state["exp_avg_sq"]
        if hyper.get("capturable", False) or hyper.get("differentiable", False):
            # torch's tensor path: t is a float32 tensor, so the bias corrections are
            # float32 numbers; follow it operation by operation (else ~1e-5 residual).
            step_t = step if isinstance(step, Tensor) else torch.tensor(float(step))
            raw_beta1, raw_beta2 = raw["betas"]
            step_size_neg = (raw["lr"] / (1 - raw_beta1**step_t)).neg()
            bias_correction2_sqrt = (1 - raw_beta2**step_t).sqrt()
            # Δ_adam = m_t / denom, denom = −(1−β1^t)(√v̂_t/√(1−β2^t) + ε)/lr
            denom = (second.sqrt() / (bias_correction2_sqrt * step_size_neg)).add_(eps / step_size_neg)
            scale = 1.0
        else:
            t = float(step)
            bias_correction2_sqrt = (1 - beta2**t) ** 0.5
            # Δ_adam = −(lr/(1−β1^t))·m_t / denom, denom = √v̂_t/√(1−β2^t) + ε
            denom = (second.sqrt() / bias_correction2_sqrt).add_(eps)
            scale = -float(raw["lr"] / (1 - beta1**t))
        gradient = grad * ((1 - beta1) * sign * scale) / denom
        weight_decay = None
        if wd != 0:
            if decoupled:
                weight_decay = theta * (-lr * wd)
            else:
                weight_decay = theta * ((1 - beta1) * wd * scale) / denom
        momentum = None
        if float(step) != 1:  # m_0 = 0 on the first step
            g_eff = grad * sign
            if wd != 0 and not decoupled:
                g_eff = g_eff + wd * theta
            carried = state["exp_avg"] - (1 - beta1) * g_eff  # β1·m_{t−1}
            momentum = carried.mul_(scale).div_(denom)
        return gradient, momentum, weight_decay

    def allocate(self, hyper, raw, rec, form, grad, state, step):
        if hyper.get("capturable", False) or hyper.get("differentiable", False):
            return None  # float32 tensor bias corrections: the materialised split follows them
        lr, eps, wd = hyper["lr"], hyper["eps"], hyper["weight_decay"]
        beta1, beta2 = hyper["betas"]
        decoupled = (
            self.decoupled
            if self.decoupled is not None
            else hyper.get("decoupled_weight_decay", False)
        )
        sign = -1.0 if hyper["maximize"] else 1.0
        second = state["max_exp_avg_sq"] if hyper.get("amsgrad", False) else state["exp_avg_sq"]
        t = float(step)
        bias_correction2_sqrt = (1 - beta2**t) ** 0.5
        scale = -float(raw["lr"] / (1 - beta1**t))
        # Δ_adam = scale·m_t / D with D = √v̂_t/√(1−β2^t) + ε = (√v̂_t + ε·√(1−β2^t)) / √(1−β2^t):
        # with q = k / (√v̂_t + ε·√(1−β2^t)), k·(x / D) = √(1−β2^t)·(q·x).
        c = scale * bias_correction2_sqrt
        eps_term = eps * bias_correction2_sqrt
        fused = None
        if wd == 0 or decoupled:  # no q·θ needed: q need not exist
            named = {"q·g": grad} if t == 1 else {"q·g": grad, "q·m": state["exp_avg"]}
            fused = form.scaled_dots(second, eps_term, named)
        if fused is not None:
            q, qg = None, fused["q·g"]
        else:
            q = form.scaled_k(second.sqrt().add_(eps_term))
            qg = form.dot("q·g", q, grad)
        gradient = _rows((c * (1 - beta1) * sign, qg))
        weight_decay = None
        theta_q: _Row = {}
        if wd != 0:
            if decoupled:
                weight_decay = _rows((-lr * wd, form.theta("k", form.k, x_is_k=True)))
            else:
                theta_q = form.theta("q", q)
                weight_decay = _rows((c * (1 - beta1) * wd, theta_q))
        momentum = None
        if t != 1:  # m_0 = 0 on the first step
            # k·(β1·m_{t−1} / D) with β1·m_{t−1} = m_t − (1−β1)·g'
            qm = fused["q·m"] if fused is not None else form.dot("q·m", q, state["exp_avg"])
            momentum = _rows((c, qm), (-c * (1 - beta1) * sign, qg), (-c * (1 - beta1) * wd, theta_q))
        return gradient, momentum, weight_decay


class _RMSpropModel(_StepModel):
    def state_keys_for(self, hyper):
        keys = ["square_avg"]
        if hyper["momentum"] > 0:
            keys.append("momentum_buffer")
        if hyper["centered"]:
            keys.append("grad_avg")
        return tuple(keys)

    def split(self, hyper, raw, rec, grad, theta, state, step):
        lr, eps, wd, mu = hyper["lr"], hyper["eps"], hyper["weight_decay"], hyper["momentum"]
        sign = -1.0 if hyper["maximize"] else 1.0
        if hyper["centered"]:
            avg = state["square_avg"].addcmul(state["grad_avg"], state["grad_avg"], value=-1).sqrt_()
        else:
            avg = state["square_avg"].sqrt()
        denom = avg.add_(eps)
        g_eff = grad * sign
        if wd != 0:
            g_eff = g_eff + wd * theta
        gradient = grad * (-lr * sign) / denom
        weight_decay = theta * (-lr * wd) / denom if wd != 0 else None
        momentum = None
        if mu > 0 and float(step) != 1:  # b_0 = 0 on the first step
            carried = state["momentum_buffer"] - g_eff / denom  # μ·b_{t−1}
            momentum = carried.mul_(-lr)
        return gradient, momentum, weight_decay

    def allocate(self, hyper, raw, rec, form, grad, state, step):
        lr, eps, wd, mu = hyper["lr"], hyper["eps"], hyper["weight_decay"], hyper["momentum"]
        sign = -1.0 if hyper["maximize"] else 1.0
        if hyper["centered"]:
            avg = state["square_avg"].addcmul(state["grad_avg"], state["grad_avg"], value=-1).sqrt_()
        else:
            avg = state["square_avg"].sqrt()
        q = form.scaled_k(avg.add_(eps))  # k / D
        qg = form.dot("q·g", q, grad)
        theta_q = form.theta("q", q) if wd != 0 else {}
        gradient = _rows((-lr * sign, qg))
        weight_decay = _rows((-lr * wd, theta_q)) if wd != 0 else None
        momentum = None
        if mu > 0 and float(step) != 1:  # b_0 = 0 on the first step
            # −lr·k·(μ·b_{t−1}) with μ·b_{t−1} = b_t − g'/D
            kb = form.dot("k·b", form.k, state["momentum_buffer"])
            momentum = _rows((-lr, kb), (lr * sign, qg), (lr * wd, theta_q))
        return gradient, momentum, weight_decay


class _AdagradModel(_StepModel):
    state_keys = ("sum",)

    def split(self, hyper, raw, rec, grad, theta, state, step):
        lr, eps, wd, lr_decay = hyper["lr"], hyper["eps"], hyper["weight_decay"], hyper["lr_decay"]
        sign = -1.0 if hyper["maximize"] else 1.0
        clr = float(raw["lr"] / (1 + (float(step) - 1) * lr_decay))
        denom = state["sum"].sqrt().add_(eps)
        gradient = grad * (-clr * sign) / denom
        weight_decay = theta * (-clr * wd) / denom if wd != 0 else None
        return gradient, None, weight_decay

    def allocate(self, hyper, raw, rec, form, grad, state, step):
        eps, wd, lr_decay = hyper["eps"], hyper["weight_decay"], hyper["lr_decay"]
        sign = -1.0 if hyper["maximize"] else 1.0
        clr = float(raw["lr"] / (1 + (float(step) - 1) * lr_decay))
        q = form.scaled_k(state["sum"].sqrt().add_(eps))  # k / D
        gradient = _rows((-clr * sign, form.dot("q·g", q, grad)))
        weight_decay = _rows((-clr * wd, form.theta("q", q))) if wd != 0 else None
        return gradient, None, weight_decay


# Exact classes only: a subclass may override ``step``.
_MODELS: dict[type, _StepModel] = {
    torch.optim.SGD: _SGDModel(),
    torch.optim.Adam: _AdamModel(decoupled=None),
    torch.optim.AdamW: _AdamModel(decoupled=True),
    torch.optim.RMSprop: _RMSpropModel(),
    torch.optim.Adagrad: _AdagradModel(),
}


def has_step_model(optimizer: torch.optim.Optimizer) -> bool:
    """Whether this optimizer's steps are decomposed exactly (else all goes to ``residual``)."""
    return type(optimizer) in _MODELS


# --------------------------------------------------------------------------- #
# Hooks: capture (pre-step) and finish (post-step)
# --------------------------------------------------------------------------- #


@torch.no_grad()
def capture_step(optimizer: torch.optim.Optimizer) -> StepRecord:
    """Call in ``optimizer.register_step_pre_hook``: before the update.

    Reads the hyper-parameters in force for this step (the learning rate before any
    scheduler moves it; tensor values are cloned, they are 1-element) and, for SGD
    with momentum, whether each parameter already has a momentum buffer (to tell
    the first step, buf_1 = g', from the others). The gradient need not exist yet:
    with a closure (Lightning's automatic optimization) it is computed inside
    ``step``, after this hook.

    Never writes to the optimizer (its ``state`` is a defaultdict: only ``.get``).
    """
    model = _MODELS.get(type(optimizer))
    name = type(optimizer).__name__
    groups = [
        {key: _snapshot(value) for key, value in group.items() if key != "params"}
        for group in optimizer.param_groups
    ]
    record = StepRecord(
        optimizer=optimizer,
        optimizer_class=name,
        modelled=model is not None,
        unmodelled_reason=(
            None
            if model is not None
            else f"learnscope has no step model for optimizer {name}: its whole step "
            "goes to the 'residual' part of the loss change allocation"
        ),
        groups=groups,
    )
    for index, group in enumerate(optimizer.param_groups):
        for param in group["params"]:
            record._group_of[param] = index
        if model is None:
            continue
        for param in group["params"]:
            first = model.first_step_from_state_before(group, optimizer.state.get(param, {}))
            if first is not None:
                record._first_step[param] = first
    return record


@torch.no_grad()
def finish_step(record: StepRecord) -> None:
    """Call in ``optimizer.register_step_post_hook``: right after the update.

    Keeps references (no copies) to each updated parameter's ``grad`` (the gradient
    the optimizer used: clipped, unscaled; fused optimizers unscale it in place) and
    to the state tensors its model needs (m_t, v_t, buf_t, ... after the step), plus
    the step counter t after the step and a GradScaler's ``found_inf`` flag.
    """
    optimizer = record.optimizer
    model = _MODELS.get(type(optimizer))
    record.finished = True
    if model is None:
        return  # everything goes to the residual: nothing to keep
    found_inf = getattr(optimizer, "found_inf", None)
    record._found_inf = found_inf.detach().clone() if isinstance(found_inf, Tensor) else None
    for index, group in enumerate(optimizer.param_groups):
        hyper = record.groups[index] if index < len(record.groups) else group
        for param in group["params"]:
            record._group_of.setdefault(param, index)
            if param.grad is None:
                continue  # skipped by the optimizer: all parts 0
            entry = _reference_param(model, hyper, index, param, optimizer.state.get(param, {}))
            entry.first_step = record._first_step.get(param, False)
            if entry.unmodelled_reason is not None:
                record.modelled = False
                record.unmodelled_reason = record.unmodelled_reason or (
                    f"{record.optimizer_class}: {entry.unmodelled_reason}; "
                    "that share of the step goes to the 'residual' part"
                )
            record._params[param] = entry


def _reference_param(
    model: _StepModel, hyper: dict[str, Any], group: int, param: Tensor, state: dict[str, Any]
) -> _ParamStep:
    """References to what the model needs for one updated parameter (no copies)."""
    grad = param.grad
    if grad.is_sparse:
        return _ParamStep(group, None, {}, None, False, (), "sparse gradient")
    missing = [key for key in model.state_keys_for(hyper) if key not in state]
    if model.has_step_counter and "step" not in state:
        missing.append("step")
    if missing:
        return _ParamStep(group, None, {}, None, False, (), f"optimizer state lacks {missing}")
    refs = {key: state[key] for key in model.state_keys_for(hyper)}
    counter = state.get("step") if model.has_step_counter else None
    # The counter is a 0-dim tensor bumped in place by the next step: clone it.
    step = counter.detach().clone() if isinstance(counter, Tensor) else counter
    versions = (grad._version, *(t._version for t in refs.values()))
    return _ParamStep(group, grad, refs, step, False, versions)


# --------------------------------------------------------------------------- #
# Parts and allocations
# --------------------------------------------------------------------------- #


def _real(tensor: Tensor) -> Tensor:
    return torch.view_as_real(tensor) if tensor.is_complex() else tensor


@torch.no_grad()
def step_parts(
    record: StepRecord,
    param: Tensor,
    delta: Tensor,
    param_before: Tensor | None = None,
) -> dict[str, Tensor]:
    """The parts of Δ for one parameter: {"gradient", "momentum", "weight_decay", "residual"}.

    Args:
        record: from ``capture_step`` + ``finish_step`` of the step that made Δ.
        param: the parameter (the object the optimizer holds), now at θ_{t+1}.
        delta: the actual Δ = θ_{t+1} − θ_t. The parts are computed in the dtype
            ``promote_types(delta.dtype, param.dtype)``: pass a float64 Δ for a
            float64 split of a float32 model.
        param_before: θ_t, used by the weight-decay part; if None it is taken as
            θ_{t+1} − Δ (exact up to one rounding).

    Returns:
        Four tensors shaped like ``param`` that sum to Δ; ``residual`` is
        Δ − (gradient + momentum + weight_decay). Unmodelled: residual = Δ and the
        other parts 0. Skipped (no grad), or a step skipped for ``found_inf``:
        gradient, momentum and weight_decay are 0, residual = Δ (which is 0).

    Raises:
        RuntimeError: ``finish_step`` was not called, or the gradient or the
            optimizer state changed since the step (parts requested too late).
    """
    if not record.finished:
        raise RuntimeError("step_parts needs finish_step(record) to have run (post-step hook)")
    dtype = torch.promote_types(delta.dtype, param.dtype)
    delta = delta.detach().to(dtype)
    modelled = _modelled_parts(record, param, delta, param_before, dtype)
    if modelled is None:
        zero = torch.zeros_like(delta)
        return {"gradient": zero, "momentum": zero.clone(), "weight_decay": zero.clone(), "residual": delta.clone()}
    gradient, momentum, weight_decay = modelled
    residual = delta - gradient - momentum - weight_decay
    return {"gradient": gradient, "momentum": momentum, "weight_decay": weight_decay, "residual": residual}


_UNMODELLED, _ZERO = "unmodelled", "zero"


def _lookup(record: StepRecord, param: Tensor) -> tuple[_StepModel | None, _ParamStep | str]:
    """The model and this parameter's entry, or ``_UNMODELLED`` / ``_ZERO`` (all modelled parts 0)."""
    model = _MODELS.get(type(record.optimizer))
    if model is None:
        return None, _UNMODELLED
    rec = record._params.get(param)
    if rec is None:
        # not this optimizer's parameter: nothing explains Δ; else skipped (grad was None)
        return model, _UNMODELLED if param not in record._group_of else _ZERO
    if rec.unmodelled_reason is not None:
        return model, _UNMODELLED
    versions = (rec.grad._version, *(t._version for t in rec.state.values()))
    if versions != rec.versions:
        raise RuntimeError(
            "the gradient or optimizer state changed after the step: request the parts "
            "before the optimizer's next step and before gradients are zeroed"
        )
    if record.step_was_skipped():
        return model, _ZERO
    return model, rec


def _modelled_parts(
    record: StepRecord,
    param: Tensor,
    delta: Tensor,
    param_before: Tensor | None,
    dtype: torch.dtype,
    keep_none: bool = False,
) -> tuple[Tensor, Tensor, Tensor] | None:
    """(gradient, momentum, weight_decay) in ``dtype``, or None when unmodelled."""
    model, rec = _lookup(record, param)
    if rec is _UNMODELLED:
        return None
    if rec is _ZERO:
        zero = torch.zeros_like(delta)
        return zero, zero.clone(), zero.clone()
    assert model is not None and isinstance(rec, _ParamStep)
    theta = (param.detach() - delta) if param_before is None else param_before.detach()

    def working(tensor: Tensor) -> Tensor:
        # Same dtype: ``to`` returns the tensor itself, so ``split`` must never write in place.
        return _real(tensor.detach().to(dtype))

    gradient, momentum, weight_decay = model.split(
        record.hyperparameters(rec.group),
        record.groups[rec.group],
        rec,
        working(rec.grad),
        working(theta),
        {key: working(value) for key, value in rec.state.items()},
        rec.step,
    )
    parts = []
    for part in (gradient, momentum, weight_decay):
        if part is None and not keep_none:
            part = torch.zeros_like(_real(delta))
        if part is not None and dtype.is_complex:
            part = torch.view_as_complex(part.contiguous())
        parts.append(part)
    return parts[0], parts[1], parts[2]


def _allocation_forms(
    k: Tensor,
    record: StepRecord,
    param: Tensor,
    delta: Tensor | Callable[[], Tensor],
    param_before: Tensor | None,
    fused: bool = False,
) -> tuple[_Form, tuple[_Row | None, _Row | None, _Row | None]]:
    """The dots and the (gradient, momentum, weight_decay) rows of one parameter's allocation."""
    if not record.finished:
        raise RuntimeError("step_parts needs finish_step(record) to have run (post-step hook)")
    delta_dtype = param.dtype if callable(delta) else delta.dtype  # a deferred Δ has the parameter's dtype
    parts_dtype = torch.promote_types(delta_dtype, param.dtype)  # may be complex
    k_real = _real(k)
    dtype = torch.promote_types(k_real.dtype, parts_dtype.to_real())

    def working(tensor: Tensor) -> Tensor:
        # Same dtype: the tensor itself (under no_grad), so the models never write to it.
        if tensor.dtype == dtype:
            return tensor
        return _real(tensor.to(parts_dtype)).to(dtype)

    form = _Form(k_real if k_real.dtype == dtype else k_real.to(dtype), delta, param_before, param, working, fused)
    model, rec = _lookup(record, param)
    if not isinstance(rec, _ParamStep):  # unmodelled (all in the residual) or zero
        return form, (None, None, None)
    assert model is not None
    hyper, raw = record.hyperparameters(rec.group), record.groups[rec.group]
    state = {key: working(value) for key, value in rec.state.items()}
    rows = model.allocate(hyper, raw, rec, form, working(rec.grad), state, rec.step)
    if rows is None:  # no fused form: materialise the parts, one dot each
        if callable(delta):
            delta = delta()
        parts = _modelled_parts(record, param, delta.detach().to(parts_dtype), param_before, parts_dtype, keep_none=True)
        assert parts is not None
        rows = tuple(
            None if part is None else form.dot(f"k·part{i}", form.k, _real(part).to(dtype))
            for i, part in enumerate(parts)
        )
    return form, rows


@torch.no_grad()
def allocate_parts(
    k: Tensor,
    record: StepRecord,
    param: Tensor,
    delta: Tensor,
    param_before: Tensor | None = None,
    *,
    total: float | Tensor | None = None,
) -> dict[str, Tensor]:
    """Per-part loss change allocation of one parameter: A_part = Σ_i k_i · Δ_part,i.

    ``k`` is the path-averaged gradient for this parameter (BRIEF 2.1). Returns
    0-dim tensors keyed by ``PARTS`` (no device sync); they sum to Σ_i k_i Δ_i up
    to rounding, the residual being Σ_i k_i Δ_i − Σ modelled parts. Computed in
    the promoted dtype of k, Δ and the parameter. Complex parameters use the real
    inner product Re(k)·Re(Δ) + Im(k)·Im(Δ).

    The part tensors are never formed: each model writes its allocations as a few
    dot products (k·g, (k/D)·m_t, ...) combined in float64, so the cost is a few
    passes over the parameter (Adam: √v̂, + ε, k/D and two dots).

    Args:
        param_before: θ_t (only the weight-decay parts use it); if None, x·θ_t is
            taken as x·θ_{t+1} − x·Δ (no parameter-sized temporary).
        total: Σ_i k_i Δ_i if the caller has it (a float64 sum, say); else one dot.
    """
    form, rows = _allocation_forms(k, record, param, delta, param_before)
    basis = list(form.dots)
    if total is None:
        total_index = len(basis)
        basis.append(torch.dot(form.k.reshape(-1), form.delta.reshape(-1)))
    else:
        total_index = len(basis)
        basis.append(torch.as_tensor(total, dtype=torch.float64, device=form.k.device).reshape(()))
    matrix = [[0.0] * len(basis) for _ in PARTS]
    matrix[3][total_index] = 1.0
    for p, row in enumerate(rows):
        for index, coef in (row or {}).items():
            column = total_index if index == _TOTAL else index
            matrix[p][column] += coef
            matrix[3][column] -= coef
    values = torch.stack(basis).double()
    allocations = torch.mv(torch.tensor(matrix, dtype=torch.float64, device=values.device), values)
    return dict(zip(PARTS, allocations.to(form.k.dtype).unbind()))


@dataclass
class PartValuesPlan:
    """One parameter's part allocations, launched but not read back (see ``plan_part_values``)."""

    form: _Form
    rows: tuple[_Row | None, _Row | None, _Row | None]
    total: float | Tensor | None
    dots: Tensor | None  # the form's dots, stacked on the parameter's device


@torch.no_grad()
def plan_part_values(
    k: Tensor,
    record: StepRecord,
    param: Tensor,
    delta: Tensor | Callable[[], Tensor],
    param_before: Tensor | None = None,
    *,
    total: float | Tensor | None = None,
    fused: bool = False,
) -> PartValuesPlan:
    """The dot products of ``allocate_part_values``, queued on the device (no sync):
    ``part_values`` reads many plans back at once. Same arguments."""
    form, rows = _allocation_forms(k, record, param, delta, param_before, fused)
    if total is None:
        form.dot("k·Δ", form.k, form.delta)
    return PartValuesPlan(form, rows, total, torch.stack(form.dots) if form.dots else None)


def part_values(plans: Sequence[PartValuesPlan]) -> list[dict[str, float]]:
    """The part allocations of every plan as Python floats, combined in float64, with one
    device sync per device (not one per parameter)."""
    values = to_python([plan.dots for plan in plans])
    return [_evaluate_parts(plan, row_values) for plan, row_values in zip(plans, values)]


def _evaluate_parts(plan: PartValuesPlan, values: list[float]) -> dict[str, float]:
    form = plan.form
    grand = values[form._index["k·Δ"]] if plan.total is None else float(plan.total)

    def evaluate(row: _Row | None) -> float:
        if row is None:
            return 0.0
        return math.fsum(coef * (grand if index == _TOTAL else values[index]) for index, coef in row.items())

    gradient, momentum, weight_decay = (evaluate(row) for row in plan.rows)
    residual = grand - math.fsum((gradient, momentum, weight_decay))
    return {"gradient": gradient, "momentum": momentum, "weight_decay": weight_decay, "residual": residual}


@torch.no_grad()
def allocate_part_values(
    k: Tensor,
    record: StepRecord,
    param: Tensor,
    delta: Tensor | Callable[[], Tensor],
    param_before: Tensor | None = None,
    *,
    total: float | Tensor | None = None,
    fused: bool = False,
) -> dict[str, float]:
    """``allocate_parts`` as Python floats, combined in float64 (one device sync).

    What the LCA callback needs per parameter: pass ``total`` = Σ_i k_i Δ_i when
    it is already known (the residual is then ``total`` − Σ modelled parts, so the
    parts sum to it exactly) and leave ``param_before`` None unless θ_t is at hand.
    ``delta`` may be a callable returning Δ: it is called only if a part needs Δ
    (Adam without coupled weight decay, with ``total`` given, never does).
    ``fused=True``: on large tensors, Adam's dots (k/D)·g and (k/D)·m in one
    ``torch.compile`` pass that never writes k/D (falls back to eager, once warned).
    Many parameters: ``plan_part_values`` for each, then ``part_values`` (one sync).
    """
    return part_values([plan_part_values(k, record, param, delta, param_before, total=total, fused=fused)])[0]
