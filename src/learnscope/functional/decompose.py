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

Each optimizer's rule is declared once (one class per optimizer): its parts as
linear combinations of a few named tensors (g, θ_t, a state tensor), each term
plain or divided elementwise by D, with coefficients formed once from the
hyper-parameters. ``step_parts`` evaluates that declaration on tensors; the
allocations evaluate the same declaration on dot products.

Allocations are fused: no part tensor is formed. k·Δ_part is a linear
combination of a few dot products, combined in float64: SGD k·g, k·buf_t (and
k·θ_t with weight decay); Adam with q = k/D formed once, q·g, q·m_t (and q·θ_t,
or k·θ_t for AdamW); RMSprop q·g, k·b_t; Adagrad q·g. The dots run in the
working dtype (float32 dots for a float32 model). Without θ_t, x·θ_t is
x·θ_{t+1} − x·Δ, and k·Δ is the total the caller may pass in. Adam's
capturable / differentiable path (float32 tensor bias corrections) reads those
corrections as numbers formed exactly as torch forms them.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from learnscope._compat import tensor_version
from learnscope._compile import call_compiled
from learnscope._readback import to_python
from learnscope._rows import ROW, KeptBuffers, rows_for

__all__ = [
    "PARTS",
    "PartValuesPlan",
    "StepRecord",
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
    _updates: dict[tuple[int, bool, float | None], _Update] = field(default_factory=dict, repr=False)
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
# An update rule, declared once: the parts as linear combinations
# --------------------------------------------------------------------------- #


class _Denominator:
    """The elementwise denominator D = √s + ε of an adaptive rule, written ``x / _D``."""

    def __repr__(self) -> str:
        return "D"


_D = _Denominator()


class _Lin:
    """A linear combination Σ c·x of named tensors x (``"g"``, ``"θ"`` for θ_t, or an
    optimizer state key), each term plain or divided elementwise by D (``x / _D``).

    The coefficients c are Python floats formed from the hyper-parameters; a zero
    term is dropped, so an empty combination stands for an exact zero part (and
    costs nothing: no tensor is read for it).
    """

    __slots__ = ("terms",)

    def __init__(self, terms: dict[tuple[str, bool], float] | None = None) -> None:
        # (name, over_d) → c: the term c·x, or c·x / D when over_d
        self.terms = {key: c for key, c in (terms or {}).items() if c != 0}

    @classmethod
    def of(cls, name: str) -> _Lin:
        return cls({(name, False): 1.0})

    def __add__(self, other: _Lin) -> _Lin:
        terms = dict(self.terms)
        for key, c in other.terms.items():
            terms[key] = terms.get(key, 0.0) + c
        return _Lin(terms)

    def __sub__(self, other: _Lin) -> _Lin:
        return self + -1.0 * other

    def __rmul__(self, c: float) -> _Lin:
        return _Lin({key: c * value for key, value in self.terms.items()})

    def __truediv__(self, denominator: _Denominator) -> _Lin:
        if any(over_d for _, over_d in self.terms):
            raise ValueError("a term divided by D twice")
        return _Lin({(name, True): c for (name, _), c in self.terms.items()})

    def named(self, over_d: bool) -> list[tuple[str, float]]:
        """(name, c) of the plain terms, or of those divided by D."""
        return [(name, c) for (name, over), c in self.terms.items() if over is over_d]


_G, _THETA, _ZERO_PART = _Lin.of("g"), _Lin.of("θ"), _Lin()


class _Update:
    """One step of one parameter group as its rule declares it: the (gradient, momentum,
    weight_decay) parts of Δ as linear combinations, and, for the adaptive methods, the
    denominator of their terms divided by D: D = √s + eps with s the state tensor
    ``second``, or s = second − mean² (centered RMSprop). Symbolic (no tensors), so
    one declaration serves every parameter of the group at this step."""

    def __init__(
        self, parts: tuple[_Lin, _Lin, _Lin], eps: float = 0.0, second: str | None = None, mean: str | None = None
    ) -> None:
        self.parts, self.eps, self.second, self.mean = parts, eps, second, mean
        # the distinct terms (name, over_d), and the tensors divided by D (the dots q·x)
        self.terms = list(dict.fromkeys(key for part in parts for key in part.terms))
        self.scaled = [name for name, over_d in self.terms if over_d]
        if self.scaled and second is None:
            raise ValueError("a term divided by D in a rule without a denominator")
        # the allocations' symbolic plans, by what their dots depend on (``_Form.plan_key``)
        self.plans: dict[tuple[bool], _Plan] = {}

    def second_moment(self, tensors: dict[str, Tensor]) -> tuple[Tensor, bool]:
        """s, and whether it is a fresh temporary (the caller may overwrite it)."""
        assert self.second is not None
        if self.mean is None:
            return tensors[self.second], False
        mean = tensors[self.mean]
        return tensors[self.second].addcmul(mean, mean, value=-1), True

    def denominator(self, tensors: dict[str, Tensor]) -> Tensor:
        """D = √s + eps as a fresh tensor the caller owns."""
        second, owned = self.second_moment(tensors)
        return (second.sqrt_() if owned else second.sqrt()).add_(self.eps)

    def split(self, tensors: dict[str, Tensor]) -> list[Tensor | None]:
        """The part tensors Σ c·x + (Σ c·x) / D over ``tensors`` (real views in one dtype),
        None for an exact zero part. Never writes to ``tensors``."""
        parts: list[Tensor | None] = []
        denominator = None
        for part in self.parts:
            plain = _weighted_sum(part.named(False), tensors)
            scaled = _weighted_sum(part.named(True), tensors)
            if scaled is not None:
                denominator = self.denominator(tensors) if denominator is None else denominator
                scaled = scaled.div_(denominator)
                plain = scaled if plain is None else plain.add_(scaled)
            parts.append(plain)
        return parts


def _weighted_sum(terms: list[tuple[str, float]], tensors: dict[str, Tensor]) -> Tensor | None:
    """Σ c·x as a fresh tensor; None when there are no terms."""
    total = None
    for name, c in terms:
        total = tensors[name] * c if total is None else total.add_(tensors[name], alpha=c)
    return total


class _StepRule:
    """One optimizer class's update rule: which state it reads, and ``update``, the parts
    of Δ declared once. Both ``step_parts`` (``_Update.split``, the part tensors) and the
    allocations (``_Form.rows``, the dots k·Δ_part) are derived from that declaration.

    ``update`` gets ``hyper``, the hyper-parameters as Python numbers, and ``raw``, as
    captured (1-element tensors kept): where torch forms a scalar from a tensor ``lr``
    (float32, say) the rule forms it the same way, so the rounding matches. Its
    declaration is symbolic: one per group and step (``StepRecord`` keeps it).
    """

    state_keys: tuple[str, ...] = ()
    has_step_counter: bool = True

    def first_step_from_state_before(self, hyper: dict[str, Any], state: dict[str, Any]) -> bool | None:
        """Whether this step is the first, judged from the state before it (None: not needed)."""
        return None

    def state_keys_for(self, hyper: dict[str, Any]) -> tuple[str, ...]:
        return self.state_keys

    def update(self, hyper: dict[str, Any], raw: dict[str, Any], first_step: bool, step: Any) -> _Update:
        """The parts of Δ at this step (``step``: the counter after it, a float or a
        0-dim tensor; ``first_step``: SGD's buffer was created by it)."""
        raise NotImplementedError


def _sign(hyper: dict[str, Any]) -> float:
    return -1.0 if hyper["maximize"] else 1.0


class _SGDRule(_StepRule):
    """SGD: Δ = −lr·buf_t (nesterov: −lr·(g' + μ·buf_t)), buf_t = μ·buf_{t−1} + a·g'."""

    has_step_counter = False

    def first_step_from_state_before(self, hyper, state):
        # The step that creates the momentum buffer sets buf_1 = g' (no dampening).
        return state.get("momentum_buffer") is None if hyper["momentum"] != 0 else None

    def state_keys_for(self, hyper):
        return ("momentum_buffer",) if hyper["momentum"] != 0 else ()

    def update(self, hyper, raw, first_step, step):
        lr, mu, tau, wd, nesterov = (hyper[key] for key in ("lr", "momentum", "dampening", "weight_decay", "nesterov"))
        s = _sign(hyper)
        # a: weight of g' in buf_t (first step: buf_1 = g', no dampening; μ = 0: Δ = −lr·g')
        a = 1.0 if first_step or mu == 0 else 1.0 - tau
        coef = 1.0 + mu * a if nesterov else a  # the weight of g' in Δ / (−lr)
        gradient = (-lr * coef * s) * _G
        weight_decay = (-lr * coef * wd) * _THETA
        momentum = _ZERO_PART
        if mu != 0 and not first_step:
            carried = _Lin.of("momentum_buffer") - a * (s * _G + wd * _THETA)  # μ·buf_{t−1} = buf_t − a·g'
            momentum = (-lr * (mu if nesterov else 1.0)) * carried
        return _Update((gradient, momentum, weight_decay))


class _AdamRule(_StepRule):
    """Adam / AdamW: Δ = −lr·m_t / D (AdamW: − lr·λ·θ_t), m_t = β1·m_{t−1} + (1−β1)·g'."""

    def __init__(self, decoupled: bool | None) -> None:
        # None: follow the group's ``decoupled_weight_decay`` flag (Adam).
        self.decoupled = decoupled

    def state_keys_for(self, hyper):
        if hyper.get("amsgrad", False):
            return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
        return ("exp_avg", "exp_avg_sq")

    def update(self, hyper, raw, first_step, step):
        lr, wd, (beta1, beta2), eps, s = hyper["lr"], hyper["weight_decay"], hyper["betas"], hyper["eps"], _sign(hyper)
        decoupled = self.decoupled if self.decoupled is not None else hyper.get("decoupled_weight_decay", False)
        if hyper.get("capturable", False) or hyper.get("differentiable", False):
            # torch's tensor path: t is a float32 tensor, so the bias corrections are float32
            # numbers; form them as it does (else ~1e-5 residual). With c = √(1−β2^t)·ssn and
            # b = ε/ssn (ssn = −lr/(1−β1^t)): Δ_adam = m_t / (√v̂_t/c + b) = c·m_t / (√v̂_t + c·b)
            step_t = step if isinstance(step, Tensor) else torch.tensor(float(step))
            raw_beta1, raw_beta2 = raw["betas"]
            step_size_neg = (raw["lr"] / (1 - raw_beta1**step_t)).neg()
            c = float((1 - raw_beta2**step_t).sqrt() * step_size_neg)
            eps_term = c * float(eps / step_size_neg)
        else:
            # Δ_adam = −(lr/(1−β1^t))·m_t / (√v̂_t/√(1−β2^t) + ε) = c·m_t / (√v̂_t + ε·√(1−β2^t))
            bias_correction2_sqrt = (1 - beta2 ** float(step)) ** 0.5
            c = -float(raw["lr"] / (1 - beta1 ** float(step))) * bias_correction2_sqrt
            eps_term = eps * bias_correction2_sqrt
        coupled = 0.0 if decoupled else wd
        gradient = c * (1 - beta1) * s * _G / _D
        weight_decay = (-lr * wd) * _THETA if decoupled else c * (1 - beta1) * wd * _THETA / _D
        momentum = _ZERO_PART  # m_0 = 0 on the first step; else β1·m_{t−1} = m_t − (1−β1)·g'
        if float(step) != 1:
            momentum = c * (_Lin.of("exp_avg") - (1 - beta1) * (s * _G + coupled * _THETA)) / _D
        second = "max_exp_avg_sq" if hyper.get("amsgrad", False) else "exp_avg_sq"
        return _Update((gradient, momentum, weight_decay), eps_term, second)


class _RMSpropRule(_StepRule):
    """RMSprop: Δ = −lr·g'/D (momentum: −lr·b_t, b_t = μ·b_{t−1} + g'/D)."""

    def state_keys_for(self, hyper):
        keys = ["square_avg"]
        if hyper["momentum"] > 0:
            keys.append("momentum_buffer")
        if hyper["centered"]:
            keys.append("grad_avg")
        return tuple(keys)

    def update(self, hyper, raw, first_step, step):
        lr, eps, wd, mu, s = hyper["lr"], hyper["eps"], hyper["weight_decay"], hyper["momentum"], _sign(hyper)
        momentum = _ZERO_PART  # b_0 = 0 on the first step; else μ·b_{t−1} = b_t − g'/D
        if mu > 0 and float(step) != 1:
            momentum = -lr * (_Lin.of("momentum_buffer") - (s * _G + wd * _THETA) / _D)
        parts = ((-lr * s) * _G / _D, momentum, (-lr * wd) * _THETA / _D)
        return _Update(parts, eps, "square_avg", "grad_avg" if hyper["centered"] else None)  # ṽ_t = v_t − ḡ_t²


class _AdagradRule(_StepRule):
    """Adagrad: Δ = −clr·g'/D, clr = lr / (1 + (t−1)·lr_decay)."""

    state_keys = ("sum",)

    def update(self, hyper, raw, first_step, step):
        eps, wd, lr_decay, s = hyper["eps"], hyper["weight_decay"], hyper["lr_decay"], _sign(hyper)
        clr = float(raw["lr"] / (1 + (float(step) - 1) * lr_decay))
        return _Update(((-clr * s) * _G / _D, _ZERO_PART, (-clr * wd) * _THETA / _D), eps, "sum")


# Exact classes only: a subclass may override ``step``.
_RULES: dict[type, _StepRule] = {
    torch.optim.SGD: _SGDRule(),
    torch.optim.Adam: _AdamRule(decoupled=None),
    torch.optim.AdamW: _AdamRule(decoupled=True),
    torch.optim.RMSprop: _RMSpropRule(),
    torch.optim.Adagrad: _AdagradRule(),
}


def has_step_model(optimizer: torch.optim.Optimizer) -> bool:
    """Whether this optimizer's steps are decomposed exactly (else all goes to ``residual``)."""
    return type(optimizer) in _RULES


# --------------------------------------------------------------------------- #
# Allocations: the same declaration as linear forms over a few dot products
# --------------------------------------------------------------------------- #

_Row = dict
"""A linear form: dot index → coefficient; the key ``_TOTAL`` stands for k·Δ."""
_TOTAL = -1

#: Tensors below this size take the eager dots even with ``fused=True``.
_FUSED_MIN_NUMEL = 1 << 16


def _rows(*terms: tuple[float, _Row]) -> _Row:
    """Σ c·row over (c, row) pairs."""
    out: dict[int, float] = {}
    for coef, row in terms:
        for index, value in row.items():
            out[index] = out.get(index, 0.0) + coef * value
    return out


def _scaled_sums(k: Tensor, second: Tensor, eps: Tensor, xs: list[Tensor]) -> Tensor:
    q = k / (second.sqrt() + eps)
    return torch.stack([(q * x).double().sum() for x in xs])


def _fused_scaled_sums(k: Tensor, second: Tensor, eps: float, xs: list[Tensor]) -> Tensor | None:
    """[Σ q·x for x in xs] in float64 with q = k / (√second + eps), one compiled pass; None
    when compiling fails (one warning per process)."""
    flat = [t.detach().reshape(-1) for t in (k, second, *xs)]
    eps_tensor = torch.tensor(eps, dtype=k.dtype, device=k.device)
    return call_compiled(
        _scaled_sums,
        flat[0],
        flat[1],
        eps_tensor,
        flat[2:],
        purpose="compile_statistics is on (the decomposition's fused dots)",
    )


class _LazyQ:
    """q = k / (√s + eps) of a small tensor, formed together with the others' (``_deferred_dots``)."""

    def __init__(self, k: Tensor, second: Tensor, eps: float) -> None:
        self.k, self.second, self.eps = k, second, eps
        self.value: Tensor | None = None


@dataclass
class _Deferred:
    """The dot x·y of a small tensor, summed with the others' in one pass (``_deferred_dots``)."""

    x: Tensor | _LazyQ
    y: Tensor | _LazyQ


@torch.no_grad()
def _deferred_dots(pairs: Sequence[_Deferred]) -> Tensor:
    """Σ x·y of every pair, float64 sums of the products (one per pair): the q's formed by
    ``_foreach_`` calls as ``_Form._scaled_k`` forms each (bitwise), the products written by
    two more into rows of a reused buffer (in each pair's own dtype), then one row sum and
    one ``index_add_`` per dtype."""
    _form_lazy([v for pair in pairs for v in (pair.x, pair.y) if isinstance(v, _LazyQ)])
    xs, ys = [_resolved(pair.x) for pair in pairs], [_resolved(pair.y) for pair in pairs]
    groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, x in enumerate(xs):
        groups.setdefault((x.dtype, x.device), []).append(i)
    sums = [_summed_products([xs[i] for i in members], [ys[i] for i in members]) for members in groups.values()]
    if len(sums) == 1:
        return sums[0]
    order = [i for members in groups.values() for i in members]
    return torch.cat([s.cpu() for s in sums])[torch.tensor(order).argsort()]


def _form_lazy(lazy: list[_LazyQ]) -> None:
    """Each q = k / (√s + eps), once per ``_LazyQ``."""
    unique = list({id(q): q for q in lazy}.values())
    if not unique:
        return
    denominators = torch._foreach_sqrt([q.second for q in unique])
    torch._foreach_add_(denominators, [q.eps for q in unique])
    for q, value in zip(unique, torch._foreach_div([q.k for q in unique], denominators)):
        q.value = value


def _summed_products(xs: list[Tensor], ys: list[Tensor]) -> Tensor:
    """[Σ x·y] per pair (one dtype and device), float64 sums of the products' rows."""
    key = (xs[0].device, xs[0].dtype, *(tuple(x.shape) for x in xs))
    rows = _PRODUCT_ROWS.get(key, lambda: _ProductRows(xs))
    torch._foreach_copy_(rows.views, xs)
    torch._foreach_mul_(rows.views, ys)
    per_row = rows.buffer.view(-1, ROW).sum(1, dtype=torch.float64)
    return torch.zeros(len(xs), dtype=torch.float64, device=per_row.device).index_add_(0, rows.owner, per_row)


class _ProductRows:
    """A zeroed buffer holding many tensors' products, each from the start of a row of
    ``ROW`` entries (the rest of its last row stays zero), with each row's pair."""

    def __init__(self, like: Sequence[Tensor]) -> None:
        rows = [rows_for(t.numel()) for t in like]
        self.buffer = torch.zeros(sum(rows) * ROW, dtype=like[0].dtype, device=like[0].device)
        starts = [sum(rows[:i]) * ROW for i in range(len(rows))]
        self.views = [self.buffer[s : s + t.numel()].view(t.shape) for s, t in zip(starts, like)]
        self.owner = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor(rows)).to(like[0].device)


# the _ProductRows of the last few lists of small tensors (a step's small tensors recur)
_PRODUCT_ROWS: KeptBuffers[_ProductRows] = KeptBuffers()


def _resolved(vector: Tensor | _LazyQ) -> Tensor:
    if isinstance(vector, Tensor):
        return vector
    assert vector.value is not None
    return vector.value


#: Tensors below this size have their dots deferred and summed together (``_deferred_dots``).
_DEFER_MAX_NUMEL = 1 << 16


@dataclass(frozen=True)
class _Plan:
    """One parameter's allocation at one step, symbolically (``_Form.planned_rows``): the dots
    (x, y) in index order, their indices by "x·y", and the (gradient, momentum,
    weight_decay) rows over them. One serves every parameter of the group with the same
    ``_Form.plan_key`` at that step: only the tensors differ."""

    pairs: tuple[tuple[str, str], ...]
    index: dict[str, int]
    rows: tuple[_Row | None, _Row | None, _Row | None]


class _Form:
    """The dot products an allocation needs, each computed once (no sync).

    A part c·x + c'·x'/D allocates k·Δ_part = c·(k·x) + c'·(q·x') with q = k/D, so
    ``rows`` turns an ``_Update`` into rows of coefficients over ``dots`` instead of
    part tensors. Dots are named "x·y" over the vectors k, q, Δ, θ_t, θ_t+1, g and
    the state keys; every tensor here is a real view in the working dtype.
    """

    def __init__(
        self,
        k: Tensor,
        delta: Tensor | Callable[[], Tensor],
        before: Tensor | None,
        after: Tensor,
        working: Any,
        fused: bool = False,
    ) -> None:
        self.k = k
        self.fused = fused  # large tensors' q·x in one compiled pass (see _fuse)
        self._delta = delta
        self._before = before  # θ_t, when the caller has it
        self._after = after  # θ_{t+1}
        self.working = working  # a tensor as a real view in the working dtype
        # small tensors: dots deferred, summed with the other small tensors' (per-call costs dominate)
        self.defer = k.numel() < _DEFER_MAX_NUMEL
        self.dots: list[Tensor | _Deferred] = []
        self._index: dict[str, int] = {}
        self._tensors: dict[str, Tensor] = {"k": k}  # and g and the state, during ``rows``
        self._update: _Update | None = None
        self._q: Tensor | _LazyQ | None = None
        self.pairs: list[tuple[str, str]] = []  # (x, y) of each dot, in index order

    @property
    def delta(self) -> Tensor:
        if callable(self._delta):  # Δ formed on first use (the callers that have θ_t and θ_{t+1})
            self._delta = self._delta()
        return self.working(self._delta)

    def index(self, key: str) -> int:
        return self._index[key]

    def _vector(self, name: str) -> Tensor | _LazyQ:
        tensor = self._tensors.get(name)  # k, g, the state
        if tensor is not None:
            return tensor
        if name == "q":
            return self._scaled_k()
        if name == "Δ":
            return self.delta
        if name in ("θ_t", "θ_t+1"):
            return self.working(self._before if name == "θ_t" else self._after)
        return self._tensors[name]

    def _scaled_k(self) -> Tensor | _LazyQ:
        """q = k / D, formed once, written over D (the only parameter-sized temporary); for a
        deferred form without a mean (D = √s + eps), formed later with the other small tensors'."""
        if self._q is None:
            assert self._update is not None
            if self.defer and self._update.mean is None and self._update.second is not None:
                self._q = _LazyQ(self.k, self._tensors[self._update.second], self._update.eps)
            else:
                denominator = self._update.denominator(self._tensors)
                self._q = torch.div(self.k, denominator, out=denominator)
        return self._q

    def dot(self, x: str, y: str) -> _Row:
        """The form 1·(x·y) over two named vectors, the product computed once."""
        key = f"{x}·{y}"
        index = self._index.get(key)
        if index is None:
            index = self._index[key] = len(self.dots)
            self._append_dot(x, y)
        return {index: 1.0}

    def _append_dot(self, x: str, y: str) -> None:
        """Queue the dot x·y as the next of ``dots`` (deferred, or launched now)."""
        self.pairs.append((x, y))
        vx, vy = self._vector(x), self._vector(y)
        if self.defer or not (isinstance(vx, Tensor) and isinstance(vy, Tensor)):
            self.dots.append(_Deferred(vx, vy))
        else:
            self.dots.append(torch.dot(vx.reshape(-1), vy.reshape(-1)))

    def dot_tensors(self) -> list[Tensor]:
        """The dots as 0-dim float64 tensors (the deferred ones summed now)."""
        deferred = [dot for dot in self.dots if isinstance(dot, _Deferred)]
        sums = iter(_deferred_dots(deferred).unbind() if deferred else ())
        return [next(sums) if isinstance(dot, _Deferred) else dot.double() for dot in self.dots]

    def term(self, x: str, name: str) -> _Row:
        """The form x·name (x = k or q). For θ_t: one dot with θ_t if given, else
        x·θ_{t+1} − x·Δ (k·Δ being the total, which the caller may pass in)."""
        if name != "θ":
            return self.dot(x, name)
        if self._before is not None:
            return self.dot(x, "θ_t")
        delta = {_TOTAL: 1.0} if x == "k" else self.dot(x, "Δ")
        return _rows((1.0, self.dot(x, "θ_t+1")), (-1.0, delta))

    def planned_rows(self, update: _Update, tensors: dict[str, Tensor]) -> tuple[_Row | None, _Row | None, _Row | None]:
        """``rows``, formed once per ``update`` and ``plan_key`` (on the first such parameter)
        and replayed for the others: the same dots in the same order, the same rows."""
        key = self.plan_key(update)
        plan = None if key is None else update.plans.get(key)
        if plan is not None:
            return self.replay(plan, update, tensors)
        rows = self.rows(update, tensors)
        if key is not None:
            update.plans[key] = _Plan(tuple(self.pairs), dict(self._index), rows)
        return rows

    def plan_key(self, update: _Update) -> tuple[bool] | None:
        """What the dots and rows depend on besides ``update`` (the tensors aside): whether
        θ_t is given; None when a fused pass may apply (it depends on compiling)."""
        if self._fusable(update):
            return None
        return (self._before is None,)

    def replay(
        self, plan: _Plan, update: _Update, tensors: dict[str, Tensor]
    ) -> tuple[_Row | None, _Row | None, _Row | None]:
        """Queue ``plan``'s dots over this form's tensors (what ``rows`` would queue for the
        same ``plan_key``) and return its rows, shared: never written."""
        self._update = update
        self._tensors.update(tensors)
        for x, y in plan.pairs:
            self._append_dot(x, y)
        self._index = dict(plan.index)  # a copy: the caller may add the dot k·Δ
        self._update, self._tensors, self._q = None, {"k": self.k}, None
        return plan.rows

    def _fusable(self, update: _Update) -> bool:
        # q·θ needs q (or q·Δ): no fused pass
        return self.fused and self.k.numel() >= _FUSED_MIN_NUMEL and bool(update.scaled) and "θ" not in update.scaled

    def rows(self, update: _Update, tensors: dict[str, Tensor]) -> tuple[_Row | None, _Row | None, _Row | None]:
        """The (gradient, momentum, weight_decay) allocations of ``update`` as rows (None:
        an exact zero part); ``tensors`` holds g and the state (not θ)."""
        self._update = update
        self._tensors.update(tensors)
        if self._fusable(update):
            self._fuse(update.scaled)
        terms = {(name, over_d): self.term("q" if over_d else "k", name) for name, over_d in update.terms}
        rows = [
            _rows(*((c, terms[key]) for key, c in part.terms.items())) if part.terms else None for part in update.parts
        ]
        # every dot that needs q or the state is queued: drop them (q is parameter-sized)
        self._update, self._tensors, self._q = None, {"k": self.k}, None
        return rows[0], rows[1], rows[2]

    def _fuse(self, names: list[str]) -> None:
        """The dots q·x for each named x in one fused pass that never writes q
        (``torch.compile``), where that applies: asked for (``fused=True``), a large
        tensor (one compiled call costs ~0.1 ms), and compiling works (else one
        warning, and the dots are formed eagerly with q)."""
        assert self._update is not None
        second, _ = self._update.second_moment(self._tensors)
        sums = _fused_scaled_sums(self.k, second, self._update.eps, [self._tensors[n] for n in names])
        if sums is None:
            return
        for name, value in zip(names, sums.unbind()):
            self._index[f"q·{name}"] = len(self.dots)
            self.dots.append(value)


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
    rule = _RULES.get(type(optimizer))
    name = type(optimizer).__name__
    groups = [
        {key: _snapshot(value) for key, value in group.items() if key != "params"} for group in optimizer.param_groups
    ]
    record = StepRecord(
        optimizer=optimizer,
        optimizer_class=name,
        modelled=rule is not None,
        unmodelled_reason=(
            None
            if rule is not None
            else f"learnscope has no step model for optimizer {name}: its whole step "
            "goes to the 'residual' part of the loss change allocation"
        ),
        groups=groups,
    )
    for index, group in enumerate(optimizer.param_groups):
        for param in group["params"]:
            record._group_of[param] = index
        if rule is None:
            continue
        for param in group["params"]:
            first = rule.first_step_from_state_before(group, optimizer.state.get(param, {}))
            if first is not None:
                record._first_step[param] = first
    return record


@torch.no_grad()
def finish_step(record: StepRecord) -> None:
    """Call in ``optimizer.register_step_post_hook``: right after the update.

    Keeps references (no copies) to each updated parameter's ``grad`` (the gradient
    the optimizer used: clipped, unscaled; fused optimizers unscale it in place) and
    to the state tensors its rule needs (m_t, v_t, buf_t, ... after the step), plus
    the step counter t after the step and a GradScaler's ``found_inf`` flag.
    """
    optimizer = record.optimizer
    rule = _RULES.get(type(optimizer))
    record.finished = True
    if rule is None:
        return  # everything goes to the residual: nothing to keep
    found_inf = getattr(optimizer, "found_inf", None)
    record._found_inf = found_inf.detach().clone() if isinstance(found_inf, Tensor) else None
    for index, group in enumerate(optimizer.param_groups):
        hyper = record.groups[index] if index < len(record.groups) else group
        for param in group["params"]:
            record._group_of.setdefault(param, index)
            if param.grad is None:
                continue  # skipped by the optimizer: all parts 0
            entry = _reference_param(rule, hyper, index, param, optimizer.state.get(param, {}))
            entry.first_step = record._first_step.get(param, False)
            if entry.unmodelled_reason is not None:
                record.modelled = False
                record.unmodelled_reason = record.unmodelled_reason or (
                    f"{record.optimizer_class}: {entry.unmodelled_reason}; "
                    "that share of the step goes to the 'residual' part"
                )
            record._params[param] = entry


def _reference_param(
    rule: _StepRule, hyper: dict[str, Any], group: int, param: Tensor, state: dict[str, Any]
) -> _ParamStep:
    """References to what the rule needs for one updated parameter (no copies)."""
    grad = param.grad
    assert grad is not None  # finish_step skips the parameters the optimizer skipped
    if grad.is_sparse:
        return _ParamStep(group, None, {}, None, False, (), "sparse gradient")
    missing = [key for key in rule.state_keys_for(hyper) if key not in state]
    if rule.has_step_counter and "step" not in state:
        missing.append("step")
    if missing:
        return _ParamStep(group, None, {}, None, False, (), f"optimizer state lacks {missing}")
    refs = {key: state[key] for key in rule.state_keys_for(hyper)}
    counter = state.get("step") if rule.has_step_counter else None
    # The counter is a 0-dim tensor bumped in place by the next step: clone it.
    step = counter.detach().clone() if isinstance(counter, Tensor) else counter
    return _ParamStep(group, grad, refs, step, False, _versions(grad, refs))


def _versions(grad: Tensor, state: dict[str, Tensor]) -> tuple[int, ...]:
    """The version counters of the referenced tensors: any in-place change bumps one."""
    return (tensor_version(grad), *(tensor_version(t) for t in state.values()))


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


def _lookup(record: StepRecord, param: Tensor) -> tuple[_StepRule | None, _ParamStep | str]:
    """The rule and this parameter's entry, or ``_UNMODELLED`` / ``_ZERO`` (all modelled parts 0)."""
    if not record.finished:
        raise RuntimeError("step_parts needs finish_step(record) to have run (post-step hook)")
    rule = _RULES.get(type(record.optimizer))
    if rule is None:
        return None, _UNMODELLED
    rec = record._params.get(param)
    if rec is None:
        # not this optimizer's parameter: nothing explains Δ; else skipped (grad was None)
        return rule, _UNMODELLED if param not in record._group_of else _ZERO
    if rec.unmodelled_reason is not None or rec.grad is None:
        return rule, _UNMODELLED
    if _versions(rec.grad, rec.state) != rec.versions:
        raise RuntimeError(
            "the gradient or optimizer state changed after the step: request the parts "
            "before the optimizer's next step and before gradients are zeroed"
        )
    if record.step_was_skipped():
        return rule, _ZERO
    return rule, rec


def _declared(
    record: StepRecord, rule: _StepRule, rec: _ParamStep, working: Callable[[Tensor], Tensor]
) -> tuple[_Update, dict[str, Tensor]]:
    """The rule's declaration of this parameter's step (one per group and step count), and
    the tensors it names: g and the state as ``working`` views (θ is the caller's)."""
    assert rec.grad is not None
    step = None if rec.step is None else float(rec.step)
    key = (rec.group, rec.first_step, step)
    update = record._updates.get(key)
    if update is None:
        hyper, raw = record.hyperparameters(rec.group), record.groups[rec.group]
        update = record._updates[key] = rule.update(hyper, raw, rec.first_step, rec.step)
    tensors = {name: working(value) for name, value in rec.state.items()}
    tensors["g"] = working(rec.grad)
    return update, tensors


def _modelled_parts(
    record: StepRecord,
    param: Tensor,
    delta: Tensor,
    param_before: Tensor | None,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor] | None:
    """(gradient, momentum, weight_decay) in ``dtype``, or None when unmodelled."""
    rule, rec = _lookup(record, param)
    if rec is _UNMODELLED:
        return None
    if not isinstance(rec, _ParamStep):  # zero
        zero = torch.zeros_like(delta)
        return zero, zero.clone(), zero.clone()
    assert rule is not None

    def working(tensor: Tensor) -> Tensor:
        # Same dtype: ``to`` returns the tensor itself; the split never writes to it.
        return _real(tensor.detach().to(dtype))

    update, tensors = _declared(record, rule, rec, working)
    tensors["θ"] = working((param.detach() - delta) if param_before is None else param_before)
    parts = [torch.zeros_like(tensors["θ"]) if part is None else part for part in update.split(tensors)]
    if dtype.is_complex:
        parts = [torch.view_as_complex(part.contiguous()) for part in parts]
    return parts[0], parts[1], parts[2]


def _allocation_forms(
    k: Tensor,
    record: StepRecord,
    param: Tensor,
    delta: Tensor | Callable[[], Tensor],
    param_before: Tensor | None,
    fused: bool = False,
    planned: bool = False,
) -> tuple[_Form, tuple[_Row | None, _Row | None, _Row | None]]:
    """The dots and the (gradient, momentum, weight_decay) rows of one parameter's allocation
    (``planned``: the rows formed once per group and step, ``_Form.planned_rows``)."""
    rule, rec = _lookup(record, param)
    delta_dtype = param.dtype if callable(delta) else delta.dtype  # a deferred Δ has the parameter's dtype
    parts_dtype = torch.promote_types(delta_dtype, param.dtype)  # may be complex
    k_real = _real(k)
    dtype = torch.promote_types(k_real.dtype, parts_dtype.to_real())

    def working(tensor: Tensor) -> Tensor:
        # Same dtype: the tensor itself (under no_grad); the forms never write to it.
        if tensor.dtype == dtype:
            return tensor
        return _real(tensor.to(parts_dtype)).to(dtype)

    form = _Form(k_real if k_real.dtype == dtype else k_real.to(dtype), delta, param_before, param, working, fused)
    if not isinstance(rec, _ParamStep):  # unmodelled (all in the residual) or zero
        return form, (None, None, None)
    assert rule is not None
    update, tensors = _declared(record, rule, rec, working)
    return form, form.planned_rows(update, tensors) if planned else form.rows(update, tensors)


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

    The part tensors are never formed: each rule's parts become a few
    dot products (k·g, (k/D)·m_t, ...) combined in float64, so the cost is a few
    passes over the parameter (Adam: √v̂, + ε, k/D and two dots).

    Args:
        param_before: θ_t (only the weight-decay parts use it); if None, x·θ_t is
            taken as x·θ_{t+1} − x·Δ (no parameter-sized temporary).
        total: Σ_i k_i Δ_i if the caller has it (a float64 sum, say); else one dot.
    """
    form, rows = _allocation_forms(k, record, param, delta, param_before)
    basis = form.dot_tensors()
    if total is None:
        total_index = len(basis)
        basis.append(torch.dot(form.k.reshape(-1), form.delta.reshape(-1)).double())
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
    dots: Tensor | None  # the form's dots, stacked on the parameter's device (None: deferred, or none)


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
    form, rows = _allocation_forms(k, record, param, delta, param_before, fused, planned=True)
    if total is None:
        form.dot("k", "Δ")
    # all deferred (a small tensor): summed with the others' in ``part_values``
    deferred = all(isinstance(dot, _Deferred) for dot in form.dots)
    return PartValuesPlan(form, rows, total, None if deferred else torch.stack(form.dot_tensors()))


def part_values(plans: Sequence[PartValuesPlan]) -> list[dict[str, float]]:
    """The part allocations of every plan as Python floats, combined in float64, with one
    device sync per device (not one per parameter); the small tensors' deferred dots are
    summed together first (``_deferred_dots``)."""
    deferred = [dot for plan in plans if plan.dots is None for dot in plan.form.dots if isinstance(dot, _Deferred)]
    read = to_python([plan.dots for plan in plans] + [_deferred_dots(deferred) if deferred else None])
    sums = iter(read[-1])
    values = [row if plan.dots is not None else [next(sums) for _ in plan.form.dots] for plan, row in zip(plans, read)]
    return [_evaluate_parts(plan, row_values) for plan, row_values in zip(plans, values)]


def _evaluate_parts(plan: PartValuesPlan, values: list[float]) -> dict[str, float]:
    form = plan.form
    grand = values[form.index("k·Δ")] if plan.total is None else float(plan.total)
    operands = [*values, grand]  # operands[_TOTAL] (the last) is k·Δ
    gradient, momentum, weight_decay = (
        0.0 if row is None else math.fsum([coef * operands[index] for index, coef in row.items()]) for row in plan.rows
    )
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
    ``fused=True``: on large tensors, an adaptive rule's dots (k/D)·x (Adam: x = g, m_t)
    in one ``torch.compile`` pass that never writes k/D, unless a part needs (k/D)·θ_t
    (coupled weight decay); falls back to eager, once warned.
    Many parameters: ``plan_part_values`` for each, then ``part_values`` (one sync).
    """
    return part_values([plan_part_values(k, record, param, delta, param_before, total=total, fused=fused)])[0]
