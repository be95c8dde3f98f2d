"""The LossChangeAllocation callback: when and on what to integrate; the math is in
:mod:`learnscope.functional.lca`."""

from __future__ import annotations

import contextlib
import fnmatch
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader

from learnscope import _logging, tags
from learnscope._stats import ProductStats, StreamingHistogram
from learnscope._probe import (
    NonFiniteProbe,
    ProbeChunk,
    ProbeError,
    ProbeObjective,
    build_probe_set,
    chunk_weights,
    rank_sum,
    require_validation_data,
)
from learnscope._validate import (
    check_bool,
    check_callable,
    check_choice,
    check_int,
    check_patterns,
    check_positive_float,
    check_tag_root,
    check_unique_tag_roots,
)
from learnscope.functional import decompose
from learnscope.functional.lca import (
    RULES,
    Evaluation,
    LazyDelta,
    StepAllocation,
    allocate_step,
    check_max_intervals,
    check_relative_tolerance,
    step_delta,
)
from learnscope.records import CornerStats, Counts, LCAStepRecord, Moments

PROBES = ("train", "val", "batch")

#: ``compile_statistics=None`` compiles the statistics when a run on CPU will measure at
#: least this many parameter-steps (measured steps × trainable parameters). At ≈ 3 ns saved
#: per parameter-step that is ≈ 13 s saved, against a one-off compile of ≈ 4–8 s on CPU.
AUTO_COMPILE_PARAMETER_STEPS = 2**32


@dataclass
class _StepEvent:
    """One real optimizer update, seen by the torch step hooks."""

    step: int
    optimizer: torch.optim.Optimizer
    names: list[str]
    start: dict[str, Tensor]
    applied_gradient: dict[str, Tensor] | None
    start_evaluation: Evaluation | None
    done: bool = False
    extras: dict[str, Any] = field(default_factory=dict)


def _delta(live: dict[str, Tensor], event: _StepEvent, *, in_place: bool = False) -> dict[str, Tensor]:
    """Δ of the step's parameters; ``in_place``: in the θ_t copies, which then hold Δ."""
    return step_delta(event.start, live, in_place=in_place)


def _first_order(gradient: dict[str, Tensor], delta: dict[str, Tensor]) -> StepAllocation:
    """The first-order allocation ``A = g ⊙ Δ`` with a known gradient (no evaluation).

    ``total`` stays NaN: the callback sums the allocations in its statistics."""
    return StepAllocation(
        path_gradient={n: gradient[n] for n in delta}, delta=delta, loss_start=None, loss_end=None, splits=1, end=None
    )


class LossChangeAllocation(Callback):
    r"""Loss Change Allocation (Lan et al., 2019), online, for every measured step.

    For an optimizer step θ_t → θ_{t+1} with Δ = θ_{t+1} − θ_t, each parameter's
    allocation is A_i = Δ_i k_i with k = ∫_0^1 ∇L(θ_t + sΔ) ds the path-averaged
    gradient of a fixed probe loss L. The allocations sum to L(θ_{t+1}) − L(θ_t) up
    to the quadrature error; **negative means the parameter helped**.

    The probe loss is the module's own ``training_step`` loss (or ``loss_fn``)
    evaluated at other parameter values on a fixed probe set, as a deterministic
    function of θ: every module in eval mode (dropout of any kind, attention
    dropout, DropPath / stochastic depth and whatever else a module does only when
    training are off), except normalisation layers that use batch statistics
    (BatchNorm), which normalise with each fixed probe chunk's own statistics, their
    running buffers never read or written. Each chunk is evaluated with the same
    random numbers at every θ. On the first measured step a self-check evaluates the
    loss twice under different random streams: if they differ, one warning names
    the module that draws them and ``<name>/probe_stochastic`` is 1. Training is never perturbed: weights, buffers,
    gradients, RNG streams, module modes and optimizer state stay bitwise as they
    would be without the callback.

    Args:
        every_n_steps: measure optimizer steps with ``global_step % every_n_steps == 0``
            (the first step is always measured).
        probe: ``"train"`` (a fixed random subset of the training data, chosen with
            its own seed; the default), ``"val"`` (the validation data), ``"batch"``
            (the current training minibatch; all micro-batches under gradient
            accumulation), or a ``DataLoader`` (exactly that data).
        probe_size: samples in the ``"train"``/``"val"`` probe set (None: all).
        probe_batch_size: chunk size of probe evaluations.
        rule: ``"first_order"``, ``"trapezoid"``, ``"simpson"`` (the default) or ``"adaptive"``.
        tolerance: absolute per-step error target |ΔL − Σ A| of ``"adaptive"``
            (default 1e-3).
        max_intervals: the most sub-intervals ``"adaptive"`` uses on one step, a power
            of two ≥ 2 (default 32, the paper's cap; each doubling costs as many probe
            gradients again). A step that reaches it with its error still above the
            target is recorded as it is and counted in ``lca/capped_steps`` (and
            :attr:`capped_steps`), with one warning per run.
        relative_tolerance: ``"adaptive"`` accepts a step when |ΔL − Σ A| ≤
            max(``tolerance``, ``relative_tolerance``·|ΔL|). None (default): the absolute
            ``tolerance`` alone. An absolute target is tight on large early steps and
            loose on late ones whose |ΔL| ≪ 1e-3; e.g. ``tolerance=1e-6,
            relative_tolerance=1e-2`` asks for 1 % of each step's loss change (so the
            cumulative error is at most 1 % of Σ_t |ΔL_t|) with an absolute floor for
            steps that barely change the loss.
        loss_fn: ``loss_fn(module, batch) -> scalar tensor``; default: the module's
            ``training_step`` loss (a tensor or a dict's ``"loss"``). Required under
            manual optimization.
        histograms: per-layer histograms of allocations, at most every
            ``trainer.log_every_n_steps`` steps (default True).
        modules: glob patterns over module names selecting which modules get
            per-layer tags and histograms. The integral always covers every
            trainable parameter, so ``lca/total`` and the error stay exact.
        decompose: split each step into ``gradient``, ``momentum``, ``weight_decay``
            and ``residual`` parts (exact models of torch's SGD, Adam, AdamW,
            RMSprop and Adagrad; any other optimizer: ``residual`` only). Their
            allocations sum to the total: tags ``lca/part/<part>[/<module>]``
            (default True).
        ablation: also evaluate the other corners of {minibatch, probe} loss ×
            {first order, ``rule``}, each with its helped fraction and parts: tags
            ``lca/ablation/<data>_<rule>/...``. Costs up to three more gradients per
            measured step (the minibatch integral).
        preset: ``"cheap"`` (minibatch loss, first order, no histograms, no
            decomposition: no extra gradient pass; cost ≈ a few elementwise passes over
            the parameters per step), ``"default"`` (the defaults above: 2 probe
            gradients per step), or ``"paper"`` (the whole training set and the
            adaptive rule: 2 to 32 full-training-set gradients per step). A preset
            sets ``probe``, ``rule``, ``tolerance``, ``histograms`` and ``decompose``
            where you leave them None (unset); a value you pass wins, also one equal
            to the default. ``probe_size`` (whose None means the whole set) counts
            as unset at its default, 1024.
        unit_allocations: per-output-unit allocations (a unit's weights summed over
            inputs, plus its bias) of modules with at most 512 units, as scalars
            ``lca/unit/<module>/<unit>``, for the report's per-neuron heatmaps.
        compile_statistics: compute each step's statistics (counts and moments of
            A = k ⊙ Δ, and Adam's decomposition dots) with fused ``torch.compile``
            kernels instead of a few eager passes per tensor. Costs a one-off compile
            (≈ 4–8 s per process on CPU; needs a C++ compiler on CPU, Triton on CUDA)
            and then saves ≈ 3 ns per parameter per measured step. ``None`` (default):
            compile when the run is long enough to repay it: parameters on CPU and
            ``trainer.estimated_stepping_batches / every_n_steps`` × trainable
            parameters ≥ ``AUTO_COMPILE_PARAMETER_STEPS`` (2³², e.g. 6 400 measured
            steps of a 670 k-parameter model). If compiling fails, one warning and the
            eager statistics.
        batch_size_fn: ``batch -> number of samples``, for batches whose first tensor's
            leading dimension is not the sample count (e.g. a graph batch whose first
            tensor holds nodes: ``lambda b: b.num_graphs``), or that are not tensors,
            tuples, lists, dicts or dataclasses. It weights the probe set's chunks and
            sizes the ``"train"``/``"val"`` probe set when whole batches are taken.
        name: the root of every tag (default ``"lca"``: ``lca/total``, ...). Two
            instances in one Trainer need distinct names, e.g. ``probe="train"`` and
            ``LossChangeAllocation(probe="val", name="lca_val")`` for the paper's
            train / held-out overlay; the report shows each as its own section.

    Accuracy depends on the model as well as the rule. On the digits MLP of the README
    (ReLU, no normalisation, SGD-momentum) ``"simpson"``'s cumulative relative error
    |Σ_t ΣA − Σ_t ΔL| / |Σ_t ΔL| is 3e-5. On a BatchNorm ResNet-18 (digits, SGD lr 0.1,
    momentum 0.9, weight decay 5e-4, 64-sample probe, first 12 steps) the large early
    steps cross many ReLU/max-pool kinks and the loss along a step is rough: at width 16
    it was 0.18 with ``"simpson"`` and 0.042 with ``"adaptive"`` (5 of 12 steps capped at
    32 intervals). That is quadrature error (a 257-point reference agrees with the
    library), reduced by a larger probe set, a smaller learning rate or a larger
    ``max_intervals``; see docs/accuracy.md. ``lca/abs_error`` shows it per step.

    The cheap mode ``probe="batch", rule="first_order"`` uses the gradient the
    optimizer applied (no extra pass): with plain SGD every allocation is then
    −lr·g² ≤ 0. It does not evaluate the loss after the step, so ``lca/delta_loss``,
    ``lca/abs_error`` and ``lca/cumulative_relative_error`` are not written.

    Example::

        trainer = Trainer(callbacks=[LossChangeAllocation(probe_size=512, rule="simpson")])
        trainer.fit(model, datamodule)
        # tensorboard --logdir lightning_logs  → scalars lca/layer/<module>, ...
    """

    #: Named flag sets. ``cheap``: no extra gradient pass (the optimizer's own
    #: gradient, minibatch loss, first order). ``paper``: Lan et al.'s protocol
    #: (the whole training set, adaptive Simpson to 1e-3 per step).
    #: The flags' values when neither you nor a preset sets them.
    DEFAULTS: dict[str, Any] = dict(
        probe="train", probe_size=1024, rule="simpson", tolerance=1e-3, histograms=True, decompose=True
    )
    PRESETS: dict[str, dict[str, Any]] = {
        "cheap": dict(probe="batch", rule="first_order", histograms=False, decompose=False),
        "default": dict(),
        "paper": dict(probe="train", probe_size=None, rule="adaptive", tolerance=1e-3),
    }

    def __init__(
        self,
        every_n_steps: int = 1,
        probe: Union[Literal["train", "val", "batch"], DataLoader, None] = None,
        probe_size: Optional[int] = 1024,
        probe_batch_size: int = 256,
        rule: Optional[Literal["first_order", "trapezoid", "simpson", "adaptive"]] = None,
        tolerance: Optional[float] = None,
        loss_fn: Optional[Callable[[pl.LightningModule, Any], Any]] = None,
        histograms: Optional[bool] = None,
        modules: Optional[list[str]] = None,
        decompose: Optional[bool] = None,
        ablation: bool = False,
        unit_allocations: bool = False,
        preset: Optional[Literal["cheap", "default", "paper"]] = None,
        compile_statistics: Optional[bool] = None,
        batch_size_fn: Optional[Callable[[Any], int]] = None,
        max_intervals: int = 32,
        relative_tolerance: Optional[float] = None,
        name: str = "lca",
    ) -> None:
        super().__init__()
        self.name = check_tag_root("name", name)
        if preset is not None:
            check_choice("preset", preset, tuple(self.PRESETS))
        chosen = self.PRESETS[preset] if preset is not None else {}
        # A flag left unset (None) takes the preset's value, else its default; a flag you set
        # wins, also when it equals the default. probe_size's None already means "the whole
        # set", so there the default value itself counts as unset.
        given = dict(probe=probe, rule=rule, tolerance=tolerance, histograms=histograms, decompose=decompose)
        resolved = {flag: chosen.get(flag, self.DEFAULTS[flag]) if value is None else value for flag, value in given.items()}
        probe, rule, tolerance = resolved["probe"], resolved["rule"], resolved["tolerance"]
        histograms, decompose = resolved["histograms"], resolved["decompose"]
        if "probe_size" in chosen and probe_size == self.DEFAULTS["probe_size"]:
            probe_size = chosen["probe_size"]
        self.preset = preset
        self.every_n_steps = check_int("every_n_steps", every_n_steps, minimum=1)
        if not isinstance(probe, DataLoader):
            check_choice("probe", probe, PROBES, extra="or a torch.utils.data.DataLoader")
        self.probe = probe
        self.probe_size = None if probe_size is None else check_int("probe_size", probe_size, minimum=1)
        self.probe_batch_size = check_int("probe_batch_size", probe_batch_size, minimum=1)
        self.rule = check_choice("rule", rule, RULES)
        self.tolerance = check_positive_float("tolerance", tolerance)
        self.max_intervals = check_max_intervals(max_intervals)
        self.relative_tolerance = check_relative_tolerance(relative_tolerance)
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(f"loss_fn must be a callable (module, batch) -> scalar tensor or None, got {loss_fn!r}")
        self.loss_fn = loss_fn
        self.batch_size_fn = check_callable("batch_size_fn", batch_size_fn, "callable(batch) -> number of samples")
        self.histograms = check_bool("histograms", histograms)
        self.modules = check_patterns("modules", modules)
        self.decompose = check_bool("decompose", decompose)
        self.ablation = check_bool("ablation", ablation)
        self.unit_allocations = check_bool("unit_allocations", unit_allocations)
        if compile_statistics is not None:
            check_bool("compile_statistics", compile_statistics, extra="or None (automatic)")
        self.compile_statistics = compile_statistics
        self._stats = ProductStats(compiled=bool(compile_statistics))

        self._cheap = self.probe == "batch" and self.rule == "first_order"
        # run state, rebuilt in on_train_start
        self._tracked: dict[str, Tensor] = {}
        self._owner: dict[str, str] = {}
        self._reported: set[str] = set()
        self._chunks: list[ProbeChunk] = []
        self._pending_batches: list[tuple[Any, int]] = []
        self._events: list[_StepEvent] = []
        self._records: dict[int, LCAStepRecord] = {}
        self._log = _logging.DeferredLog()  # per-step scalars, written a batch of steps at a time
        self._hook_handles: list[Any] = []
        self._free_starts: dict[tuple[str, ...], dict[str, Tensor]] = {}  # θ_t buffers to reuse, per optimizer
        self._cache: Evaluation | None = None
        self._cache_versions: tuple[int, ...] | None = None
        self._hooked_steps = 0
        self._last_global_step = 0
        self._last_histogram_step: int | None = None
        self._trainer: pl.Trainer | None = None
        self._pl_module: pl.LightningModule | None = None
        # cumulative state (saved in checkpoints)
        self._cumulative: dict[str, float] = {}
        self._sum_total = 0.0
        self._sum_delta_loss = 0.0
        self._sum_total_with_loss = 0.0
        self._skipped_steps = 0
        self._capped_steps = 0  # adaptive steps that stopped at max_intervals above their error target
        self._capped_warned = False
        self._capped_seen: set[int] = set()  # steps measured by adaptive, to log lca/capped_steps on
        self._measured_steps = 0
        self._cumulative_parts: dict[str, float] = {}
        self._unmodelled_reported: set[str] = set()
        self._stale_warned = False
        self._ablation_chunks: list[ProbeChunk] = []
        self.probe_samples = 0  # samples in the fixed probe set (0 for probe="batch")
        self._probe_stochastic: bool | None = None  # the self-check's verdict (None: not checked yet)
        self._probe_mode = "deterministic"  # module modes of the probe passes (_probe.module_modes)
        self._noise_logged = False

    # ------------------------------------------------------------------ identity

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            every_n_steps=self.every_n_steps,
            probe=self.probe if isinstance(self.probe, str) else "dataloader",
            rule=self.rule,
            probe_size=self.probe_size,
            decompose=self.decompose,
            ablation=self.ablation,
            name=self.name,
        )

    @property
    def tag_root(self) -> str:
        """The first field of every tag this callback writes (``name``)."""
        return self.name

    def _tag(self, field: str) -> str:
        return f"{self.name}/{field}"

    def state_dict(self) -> dict[str, Any]:
        return {
            "cumulative": dict(self._cumulative),
            "sum_total": self._sum_total,
            "sum_delta_loss": self._sum_delta_loss,
            "sum_total_with_loss": self._sum_total_with_loss,
            "skipped_steps": self._skipped_steps,
            "capped_steps": self._capped_steps,
            "measured_steps": self._measured_steps,
            "cumulative_parts": dict(self._cumulative_parts),
            "last_histogram_step": self._last_histogram_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._cumulative = dict(state_dict.get("cumulative", {}))
        self._sum_total = float(state_dict.get("sum_total", 0.0))
        self._sum_delta_loss = float(state_dict.get("sum_delta_loss", 0.0))
        self._sum_total_with_loss = float(state_dict.get("sum_total_with_loss", 0.0))
        self._skipped_steps = int(state_dict.get("skipped_steps", 0))
        self._capped_steps = int(state_dict.get("capped_steps", 0))
        self._measured_steps = int(state_dict.get("measured_steps", 0))
        self._cumulative_parts = dict(state_dict.get("cumulative_parts", {}))
        self._last_histogram_step = state_dict.get("last_histogram_step")  # the histogram cadence resumes too

    # ------------------------------------------------------------------ set-up

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_unique_tag_roots(trainer, self)
        if stage != "fit":
            return
        if not pl_module.automatic_optimization and self.loss_fn is None and not self._cheap:
            raise ProbeError(
                "LossChangeAllocation: the module uses manual optimization, so its training_step cannot be "
                "evaluated as a loss (it steps optimizers itself). Set loss_fn=callable(module, batch) -> scalar "
                "tensor, or use probe='batch' with rule='first_order'."
            )
        if self.probe == "val":
            require_validation_data(trainer, owner="LossChangeAllocation")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trainer, self._pl_module = trainer, pl_module
        self._capped_warned = False  # one warning per fit
        self._tracked = {n: p for n, p in pl_module.named_parameters() if p.requires_grad}
        self._owner = {n: n.rpartition(".")[0] or "root" for n in self._tracked}
        modules = sorted(set(self._owner.values()))
        if self.modules is not None:
            modules = [m for m in modules if any(fnmatch.fnmatchcase(m, pat) for pat in self.modules)]
            if not modules:
                rank_zero_warn(f"LossChangeAllocation: no trainable module matches modules={self.modules}")
        self._reported = set(modules)
        if self.compile_statistics is None:
            self._stats.compiled = self._long_run_on_cpu(trainer)
        if self.probe != "batch":
            self._chunks = build_probe_set(
                trainer, pl_module, self.probe, self.probe_size, self.probe_batch_size, owner="LossChangeAllocation",
                batch_size_fn=self.batch_size_fn,
            )
            self.probe_samples = sum(chunk.size for chunk in self._chunks)
        elif self.ablation:  # the probe corners need a fixed set even when the main probe is the minibatch
            self._ablation_chunks = build_probe_set(
                trainer, pl_module, "train", self.probe_size, self.probe_batch_size, owner="LossChangeAllocation",
                batch_size_fn=self.batch_size_fn,
            )
            self.probe_samples = sum(chunk.size for chunk in self._ablation_chunks)
        self._last_global_step = trainer.global_step
        self._register_hooks(trainer)
        _logging.write_layout(trainer, lca=True, nfa=False, lca_ablation=self.ablation, lca_root=self.name)

    def _long_run_on_cpu(self, trainer: pl.Trainer) -> bool:
        """``compile_statistics=None``: whether this fit will measure enough parameter-steps
        on CPU to repay the compile (CUDA: eager, the compiled kernels are untested there)."""
        params = list(self._tracked.values())
        if not params or any(p.device.type != "cpu" for p in params):
            return False
        try:
            steps = float(trainer.estimated_stepping_batches)
        except Exception:  # no length known: no basis for the trade
            return False
        numel = sum(p.numel() for p in params)
        work = math.ceil(steps / self.every_n_steps) * numel if math.isfinite(steps) else math.inf
        if work < AUTO_COMPILE_PARAMETER_STEPS:
            return False
        rank_zero_info(
            f"LossChangeAllocation: compiling the per-step statistics (≈ {steps:.0f} steps × {numel:,} parameters; "
            "a one-off compile of a few seconds). compile_statistics=False keeps them eager."
        )
        return True

    def _register_hooks(self, trainer: pl.Trainer) -> None:
        self._remove_hooks()
        for optimizer in trainer.optimizers:
            self._hook_handles.append(optimizer.register_step_pre_hook(self._before_step))
            self._hook_handles.append(optimizer.register_step_post_hook(self._after_step))

    def _remove_hooks(self) -> None:
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles = []

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log.flush(trainer)
        self._remove_hooks()
        self._events.clear()
        self._pending_batches.clear()
        self._cache = None
        self._free_starts = {}

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        try:
            self._log.flush(trainer)  # what was measured before the failure still reaches the logs
        except Exception as err:  # never mask the run's own exception with ours
            rank_zero_warn(f"LossChangeAllocation: could not write the last steps' scalars ({type(err).__name__}: {err})")

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._log.flush(trainer)  # the logs hold every step the checkpoint's cumulative state counts

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._log.flush(trainer)
        self._remove_hooks()
        self._chunks = []
        self._cache = None
        self._free_starts = {}

    # ------------------------------------------------------------------ step hooks

    def _versions(self) -> tuple[int, ...]:
        return tuple(p._version for p in self._tracked.values())

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        trainer = self._trainer
        if trainer is None:
            return
        self._flush()  # a previous step in this batch ends here (manual optimization)
        step = trainer.global_step
        reusable = (
            self._cache is not None and self.probe != "batch" and self._cache_versions == self._versions()
        )
        cache, self._cache = self._cache, None  # any step moves θ: the cache is used now or never
        if step % self.every_n_steps != 0:
            return
        owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
        names = [n for n, p in self._tracked.items() if id(p) in owned]
        event = _StepEvent(
            step=step,
            optimizer=optimizer,
            names=names,
            start=self._copy_start(names),
            applied_gradient=None,
            start_evaluation=cache if reusable else None,
        )
        if self.decompose:
            record = decompose.capture_step(optimizer)
            event.extras["record"] = record
            if not record.modelled and record.optimizer_class not in self._unmodelled_reported:
                self._unmodelled_reported.add(record.optimizer_class)
                rank_zero_info(f"LossChangeAllocation: {record.unmodelled_reason}.")
        self._events.append(event)

    def _copy_start(self, names: list[str]) -> dict[str, Tensor]:
        """θ_t of ``names``: copies into the buffers of an earlier step when one is free
        (the cheap mode measures every step: no allocation, no page faults), else clones."""
        live = [self._tracked[n].detach() for n in names]
        buffers = self._free_starts.pop(tuple(names), None)
        if buffers is not None and all(
            b.shape == p.shape and b.dtype == p.dtype and b.device == p.device for b, p in zip(buffers.values(), live)
        ):
            for buffer, param in zip(buffers.values(), live):
                buffer.copy_(param)
            return buffers
        return {n: p.clone() for n, p in zip(names, live)}

    @staticmethod
    def _grad_or_zero(p: Tensor) -> Tensor:
        return torch.zeros_like(p) if p.grad is None else p.grad.detach()

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._hooked_steps += 1
        for event in self._events:
            if event.optimizer is optimizer and not event.done:
                event.done = True
                if "record" in event.extras:
                    decompose.finish_step(event.extras["record"])
                if self._cheap or self.ablation:
                    # Lightning runs the closure (forward, backward) inside optimizer.step, after the
                    # pre-hook: the gradient the optimizer applied exists only from here on.
                    event.applied_gradient = {n: self._grad_or_zero(self._tracked[n]) for n in event.names}
        if self._pl_module is not None and not self._pl_module.automatic_optimization:
            # Under manual optimization the module's next backward (for another optimizer, or the
            # next step) rewrites every gradient before the batch ends: measure now.
            self._flush()

    # ------------------------------------------------------------------ batches

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.probe == "batch" or self.ablation:
            self._pending_batches.append((batch, batch_idx))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._flush()
        advanced = trainer.global_step - self._last_global_step
        self._last_global_step = trainer.global_step
        stepped, self._hooked_steps = self._hooked_steps, 0
        if advanced > stepped:  # e.g. a GradScaler skipped the update: no hooks fired, θ did not move
            self._skipped_steps += advanced - stepped
            skipped = {self._tag("skipped_steps"): float(self._skipped_steps), self._tag("total"): 0.0}
            if not self._cheap:
                skipped[self._tag("delta_loss")] = 0.0
            self._log.add(trainer, trainer.global_step - 1, skipped)
        if advanced > 0 or stepped > 0:
            self._pending_batches.clear()
        self._log_records(trainer)
        # one write per batch of steps (the events' steps and values are unchanged)
        self._log.flush_if_due(trainer, every=max(1, trainer.log_every_n_steps))

    # ------------------------------------------------------------------ measurement

    def _flush(self) -> None:
        """Integrate every completed step: its end point is the current parameters."""
        done = [e for e in self._events if e.done]
        if not done:
            return
        self._events = [e for e in self._events if not e.done]
        for event in done:
            record = self._measure(event)
            if self._cheap and not self.ablation:  # nothing keeps the θ_t copies (now Δ) past the measurement
                self._free_starts[tuple(event.names)] = event.start
            if record is None:
                continue
            if record.step in self._records:
                self._records[record.step].merge(record)
            else:
                self._records[record.step] = record

    def _objective(self, data: str) -> ProbeObjective:
        """The probe loss on ``data``: ``"batch"`` (this step's micro-batches, equally
        weighted as gradient accumulation does) or ``"probe"`` (the fixed set)."""
        pl_module = self._pl_module
        assert pl_module is not None and self._trainer is not None
        world = self._trainer.world_size
        if data == "batch":
            # every rank's micro-batches, each weighted 1 / (micro-batches × ranks): the loss DDP trains on
            chunks = chunk_weights([b for b, _ in self._pending_batches], equal=True)
            for chunk, (_, idx) in zip(chunks, self._pending_batches):
                chunk.batch_idx = idx
                chunk.weight /= world
        else:
            chunks = self._chunks or self._ablation_chunks
        return ProbeObjective(
            pl_module, chunks, loss_fn=self.loss_fn, mode=self._probe_mode, step_context=self._step_context,
            reduce=rank_sum(self._trainer),
        )

    def _step_context(self) -> contextlib.AbstractContextManager:
        from lightning.pytorch.plugins.precision import MixedPrecision

        plugin = self._trainer.precision_plugin if self._trainer is not None else None
        if plugin is None or isinstance(plugin, MixedPrecision):
            return contextlib.nullcontext()  # probe math in float32, never under autocast
        return plugin.forward_context()

    def _measure(self, event: _StepEvent) -> LCAStepRecord | None:
        live = {n: p.detach() for n, p in self._tracked.items()}
        start = {**live, **event.start}
        corners: dict[str, CornerStats] = {}
        try:
            if self._cheap:
                assert event.applied_gradient is not None
                # Δ formed only where something needs it (decomposition, units, observe): the statistics
                # read θ_t and θ_{t+1} directly. In the θ_t copies, unless the ablation still needs θ_t.
                delta = LazyDelta(event.start, live, in_place=not self.ablation)
                allocation = _first_order(event.applied_gradient, delta)
            else:
                data = "batch" if self.probe == "batch" else "probe"
                objective = self._objective(data)
                if self._probe_stochastic is None:
                    self._check_determinism(objective, start)
                start_evaluation = event.start_evaluation
                if self.ablation and self.rule != "first_order":
                    if start_evaluation is None:
                        start_evaluation = objective(start)
                    # before allocate_step reuses the start gradient's buffers as workspace
                    first = _first_order(start_evaluation.gradient, _delta(live, event))
                    corners[f"{data}_first_order"] = self._corner(event, first)
                allocation = allocate_step(
                    objective, start, live, rule=self.rule, tolerance=self.tolerance,
                    max_intervals=self.max_intervals, relative_tolerance=self.relative_tolerance,
                    start_evaluation=start_evaluation, compute_total=False,  # _summarise sums A anyway
                    start_is_workspace=not self.ablation,  # θ_t copies become Δ (the ablation still needs θ_t)
                )
            if self.ablation:
                self._ablation_corners(event, start, live, allocation, corners)
        except NonFiniteProbe as err:
            self._skip(event.step, f"non-finite probe value ({err})")
            return None
        record = self._summarise(event, allocation)
        if not math.isfinite(record.total):
            self._skip(event.step, "non-finite allocation")
            return None
        if self.rule == "adaptive" and not self._cheap:
            self._count_capped(event.step, allocation, record)
        if self.probe != "batch" and allocation.end is not None:
            self._cache, self._cache_versions = allocation.end, self._versions()
        record.ablation = corners
        if not self._noise_logged and self._probe_stochastic is not None:
            self._noise_logged = True  # written once, with the first measured step
            record.probe_stochastic = self._probe_stochastic
        self.observe(event.step, event.names, allocation, lambda name: self._part_tensors(event, name, allocation))
        return record

    def _check_determinism(self, objective: ProbeObjective, start: dict[str, Tensor]) -> None:
        """Once per run, before the first probe integral: is the probe loss a function of θ?

        A model that cannot be evaluated with its modules in eval mode (a forward that
        returns other outputs when not training, say) falls back to its own modes with
        dropout layers off, with one warning; the self-check then tells whether that loss
        is random."""
        try:
            noise = objective.check_determinism(start)
        except Exception as error:
            if isinstance(error, ProbeError) or objective.mode != "deterministic":
                raise
            self._probe_mode = objective.mode = "dropout_off"
            rank_zero_warn(
                "LossChangeAllocation: the probe loss cannot be evaluated with the modules in eval mode "
                f"({type(error).__name__}: {error}); the probe passes keep every module's own mode and turn off "
                "only nn.Dropout layers. Pass loss_fn=callable(module, batch) -> scalar to evaluate it your way."
            )
            noise = objective.check_determinism(start)
        self._probe_stochastic = noise is not None
        if noise is not None:
            rank_zero_warn(
                f"LossChangeAllocation: the probe loss is not deterministic: {noise.describe()}. Every probe "
                "chunk is evaluated with the same random numbers at every θ, so the allocations still sum to the "
                "change of that one noisy loss, but it is not the model's deterministic loss "
                f"({self._tag('probe_stochastic')} = 1). Draw random numbers only when `self.training` is True in "
                "that module, or pass loss_fn=callable(module, batch) -> scalar that evaluates it without noise."
            )

    @property
    def probe_is_stochastic(self) -> bool | None:
        """Whether the self-check found the probe loss random (None: not checked yet, or the cheap
        mode, which evaluates no probe loss)."""
        return self._probe_stochastic

    def observe(
        self,
        step: int,
        names: list[str],
        allocation: StepAllocation,
        parts: Callable[[str], dict[str, Tensor]],
    ) -> None:
        """Extension point: called once per measured step with per-parameter tensors.

        Override in a subclass to keep or analyse what the tags only summarise.
        ``names`` are the parameters this step moved; ``allocation.allocation(name)``
        is ``A = k ⊙ Δ`` of one parameter; ``parts(name)`` returns the per-part
        allocation tensors ``k ⊙ Δ_part`` (empty without ``decompose``). The
        tensors are only valid during the call: copy what you keep.
        """

    def _part_tensors(self, event: _StepEvent, name: str, allocation: StepAllocation) -> dict[str, Tensor]:
        record = event.extras.get("record")
        if record is None:
            return {}
        param, delta = self._tracked[name], allocation.delta[name]
        pieces = decompose.step_parts(record, param, delta, param.detach() - delta)
        k = allocation.path_gradient[name]
        return {part: k * piece for part, piece in pieces.items()}

    def _ablation_corners(
        self, event: _StepEvent, start: dict[str, Tensor], live: dict[str, Tensor], main: StepAllocation,
        corners: dict[str, CornerStats],
    ) -> None:
        """Fill in the corners of {batch, probe} × {first_order, rule} not computed yet."""
        data = "batch" if self.probe == "batch" else "probe"
        corners[f"{data}_{self.rule}"] = self._corner(event, main)
        if event.applied_gradient is not None and "batch_first_order" not in corners:
            corners["batch_first_order"] = self._corner(event, _first_order(event.applied_gradient, _delta(live, event)))
        if self.rule != "first_order":
            other = "probe" if data == "batch" else "batch"
            integral = allocate_step(
                self._objective(other), start, live, rule=self.rule, tolerance=self.tolerance,
                max_intervals=self.max_intervals, relative_tolerance=self.relative_tolerance, compute_total=False,
            )
            corners[f"{other}_{self.rule}"] = self._corner(event, integral)
        if "probe_first_order" not in corners:
            first = allocate_step(
                self._objective("probe"), start, live, rule="first_order", evaluate_end=False, compute_total=False
            )
            corners["probe_first_order"] = self._corner(event, first)

    def _corner(self, event: _StepEvent, allocation: StepAllocation) -> CornerStats:
        stats = CornerStats()
        record = event.extras.get("record")
        splits = self._parts(record, event.names, allocation)
        for (c, _), split in zip(self._statistics(allocation, event.names), splits):
            stats.counts.add(c)
            for part, value in split.items():
                stats.parts[part] = stats.parts.get(part, 0.0) + value
        return stats

    def _statistics(
        self, allocation: StepAllocation, names: list[str], histograms: list[StreamingHistogram | None] | None = None
    ) -> list[tuple[Counts, Moments]]:
        """Counts and moments of A = k ⊙ Δ for each of ``names`` (histograms filled on the way)."""
        delta = allocation.delta
        operands = [delta.operands(n) if isinstance(delta, LazyDelta) else delta[n] for n in names]
        return self._stats.many([allocation.path_gradient[n] for n in names], operands, histograms)

    def _parts(
        self, record: Any | None, names: list[str], allocation: StepAllocation, totals: list[float] | None = None
    ) -> list[dict[str, float]]:
        """The part allocations of each of ``names`` (a few fused dot products per tensor,
        read back in one device sync); ``totals``: their Σ k ⊙ Δ when known, so the parts
        sum to exactly what the statistics logged. No ``record`` (decompose off): no parts."""
        splits: list[dict[str, float]] = [{} for _ in names]
        if record is None:
            return splits
        plans, planned = [], []
        for i, name in enumerate(names):
            try:
                plans.append(decompose.plan_part_values(
                    allocation.path_gradient[name], record, self._tracked[name], lambda name=name: allocation.delta[name],
                    total=None if totals is None else totals[i],
                    fused=self._stats.compiled,  # compile_statistics, unless compiling failed
                ))
                planned.append(i)
            except RuntimeError as err:  # the gradient or optimizer state changed before we could read it
                if not self._stale_warned:
                    self._stale_warned = True
                    rank_zero_warn(f"LossChangeAllocation: no optimizer parts for this step ({err}); the total is unaffected.")
        for i, values in zip(planned, decompose.part_values(plans)):
            splits[i] = values
        return splits

    def _count_capped(self, step: int, allocation: StepAllocation, record: LCAStepRecord) -> None:
        """Count a step ``adaptive`` accepted at ``max_intervals`` above its error target
        (its allocation is recorded all the same); warn at the first one of the run."""
        self._capped_seen.add(step)
        if not allocation.capped:
            return
        self._capped_steps += 1
        if self._capped_warned:
            return
        self._capped_warned = True
        error = abs(allocation.delta_loss - record.total)
        relative = "" if self.relative_tolerance is None else f", relative_tolerance={self.relative_tolerance:g}"
        rank_zero_warn(
            f"LossChangeAllocation: step {step} reached max_intervals={self.max_intervals} sub-intervals with "
            f"|ΔL − ΣA| = {error:.3g} (ΔL = {allocation.delta_loss:+.3g}), above the accepted error "
            f"{allocation.accepted_error:.3g} (tolerance={self.tolerance:g}{relative}). The step's allocation is "
            f"still recorded; such steps are counted in {self._tag('capped_steps')} and this warning is not repeated. "
            "The loss along the step is too rough for the quadrature (large steps across ReLU/max-pool kinks; see "
            "docs/accuracy.md). To try: a larger max_intervals, a larger probe set (probe_size), a smaller learning "
            f"rate, a relative_tolerance, or accept the error ({self._tag('abs_error')} shows it per step)."
        )

    def _skip(self, step: int, why: str) -> None:
        self._skipped_steps += 1
        self._cache = None
        rank_zero_warn(f"LossChangeAllocation: step {step} skipped: {why}. Training goes on.")
        if self._trainer is not None:
            self._log.add(self._trainer, step, {self._tag("skipped_steps"): float(self._skipped_steps)})

    def _summarise(self, event: _StepEvent, allocation: StepAllocation) -> LCAStepRecord:
        counts, moments = Counts(), Moments()
        layers: dict[str, float] = {}
        layer_counts: dict[str, Counts] = {}
        parts: dict[str, float] = {}
        layer_parts: dict[str, dict[str, float]] = {}
        units: dict[str, Tensor] = {}
        histograms: dict[str, StreamingHistogram] = {}
        want_hist = self.histograms and self._histogram_due(event.step)
        record = event.extras.get("record")
        param_sums: dict[str, float] = {}
        hists = [
            histograms.setdefault(self._owner[name], StreamingHistogram())
            if want_hist and self._owner[name] in self._reported else None
            for name in event.names
        ]
        statistics = self._statistics(allocation, event.names, hists)
        splits = self._parts(record, event.names, allocation, totals=[m.s1 for _, m in statistics])
        for name, (c, m), split in zip(event.names, statistics, splits):
            module = self._owner[name]
            counts.add(c)
            moments.add(m)
            param_sums[name] = m.s1
            for part, value in split.items():
                parts[part] = parts.get(part, 0.0) + value
            if module not in self._reported:
                continue
            layers[module] = layers.get(module, 0.0) + param_sums[name]
            layer_counts.setdefault(module, Counts()).add(c)
            mine = layer_parts.setdefault(module, {}) if split else {}
            for part, value in split.items():
                mine[part] = mine.get(part, 0.0) + value
            if self.unit_allocations and allocation.delta[name].ndim >= 1 and allocation.delta[name].shape[0] <= 512:
                a = allocation.allocation(name)
                per_unit = a.detach().double().reshape(a.shape[0], -1).sum(1).cpu()
                if module in units and units[module].shape == per_unit.shape:
                    units[module] = units[module] + per_unit
                elif module not in units:
                    units[module] = per_unit
        allocation.total = sum(param_sums.values())  # Σ A from the statistics (allocate_step(compute_total=False))
        if want_hist:
            self._last_histogram_step = event.step
        return LCAStepRecord(
            step=event.step,
            total=allocation.total,
            delta_loss=None if self._cheap else allocation.delta_loss,
            splits=allocation.splits,
            counts=counts,
            moments=moments,
            layers=layers,
            layer_counts=layer_counts,
            parts=parts,
            layer_parts=layer_parts,
            units=units,
            histograms=histograms or None,
        )

    def _histogram_due(self, step: int) -> bool:
        assert self._trainer is not None
        every = max(1, self._trainer.log_every_n_steps)
        return self._last_histogram_step is None or step - self._last_histogram_step >= every

    def _log_records(self, trainer: pl.Trainer) -> None:
        for step in sorted(self._records):
            record = self._records[step]
            self._measured_steps += 1
            self._sum_total += record.total
            if record.delta_loss is not None:
                self._sum_delta_loss += record.delta_loss
                self._sum_total_with_loss += record.total
            for module, value in record.layers.items():
                self._cumulative[module] = self._cumulative.get(module, 0.0) + value
            for part, value in record.parts.items():
                self._cumulative_parts[part] = self._cumulative_parts.get(part, 0.0) + value
            for module, parts in record.layer_parts.items():
                for part, value in parts.items():
                    key = f"{part}/{module}"
                    self._cumulative_parts[key] = self._cumulative_parts.get(key, 0.0) + value
            scalars = tags.lca_scalars(record, self._cumulative, self.cumulative_relative_error, root=self.name)
            if step in self._capped_seen:
                scalars.update(tags.lca_capped(self._capped_steps, root=self.name))
            if record.parts:
                scalars.update(tags.lca_part_cumulative(self._cumulative_parts, root=self.name))
            histograms = tags.lca_histograms(record.histograms, root=self.name) if record.histograms else None
            self._log.add(trainer, step, scalars, histograms)
        self._records.clear()
        self._capped_seen.clear()

    # ------------------------------------------------------------------ results

    @property
    def cumulative_relative_error(self) -> float:
        """``|Σ_t Σ_i A − Σ_t ΔL| / |Σ_t ΔL|`` over the measured steps (nan in the cheap mode)."""
        if self._cheap or self._sum_delta_loss == 0.0:
            return math.nan
        return abs(self._sum_total_with_loss - self._sum_delta_loss) / abs(self._sum_delta_loss)

    @property
    def cumulative(self) -> dict[str, float]:
        """Cumulative allocation per module over the measured steps so far."""
        return dict(self._cumulative)

    @property
    def skipped_steps(self) -> int:
        return self._skipped_steps

    @property
    def capped_steps(self) -> int:
        """Steps ``rule="adaptive"`` accepted at ``max_intervals`` sub-intervals with their error
        above ``max(tolerance, relative_tolerance·|ΔL|)`` (their allocations are recorded)."""
        return self._capped_steps
