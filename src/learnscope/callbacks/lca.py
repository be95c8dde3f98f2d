"""The LossChangeAllocation callback: when and on what to measure. How a step is
measured is in :mod:`learnscope.estimators`, what is logged of it in
:mod:`learnscope.step_summary`, and the math in :mod:`learnscope.functional.lca`."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from functools import partial
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader
from typing_extensions import override

from learnscope import _logging, tags
from learnscope._probe import (
    NonFiniteProbe,
    ProbeError,
    ProbeLosses,
    build_probe_set,
    check_sharded_parameters,
    precision_context,
    rank_reduce,
    rank_sum,
    require_supported_strategy,
    require_validation_data,
    shards_parameters,
)
from learnscope._stats import ProductStats
from learnscope._validate import check_seconds, check_unique_tag_roots
from learnscope.callbacks._base import ProbeCallback
from learnscope.config import DEFAULTS, PRESETS, PROBES, LCAConfig
from learnscope.estimators import StepEstimator, StepEvent, build_estimator, check_sharded_config
from learnscope.functional import decompose
from learnscope.functional.lca import StepAllocation
from learnscope.functional.sharded import local_views
from learnscope.records import LCAStepRecord
from learnscope.step_summary import (
    ParameterCounts,
    RunTotals,
    SeriesWindow,
    StepSummariser,
    charted_parts,
    reported_modules,
)

__all__ = ["AUTO_COMPILE_PARAMETER_STEPS", "PROBES", "LossChangeAllocation"]

#: ``compile_statistics=None`` compiles the statistics when a run on CPU will measure at
#: least this many parameter-steps (measured steps × trainable parameters). At ≈ 3 ns saved
#: per parameter-step that is ≈ 13 s saved, against a one-off compile of ≈ 4–8 s on CPU.
AUTO_COMPILE_PARAMETER_STEPS = 2**32


class _Flag:
    """A read-only view of one :class:`~learnscope.config.LCAConfig` field on the
    callback: ``callback.rule`` is ``callback.config.rule``."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        return self if instance is None else getattr(instance.config, self.name)


class LossChangeAllocation(ProbeCallback):
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
            inputs, plus its bias) of modules with at most 512 units, as one tensor summary
            ``lca/unit/<module>`` per module and point (a 1-D float32 tensor [units], read by
            the report's per-neuron heatmaps and the learnscope TensorBoard plugin; written to
            TensorBoard loggers only).
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
        flush_seconds: the longest measured scalars wait in memory before they are written
            (default 2.0; they are also written every ``trainer.log_every_n_steps``
            steps, at checkpoints and at the end). ``math.inf``: by steps only.
        parameter_counts: per trainable parameter, count the measured steps on which it
            helped (A < 0) and hurt (A > 0): two int32 tensors of each parameter tensor's
            shape on its device, **8 bytes per parameter**, checkpointed. Logged every
            ``trainer.log_every_n_steps`` steps as histograms of each parameter's helped
            fraction helped / (measured steps), ``lca/param_helped_fraction`` and per module
            ``lca/param_helped_fraction/<module>``; the tensors are
            :attr:`per_parameter_counts` (default False).
        tensor_series: per parameter tensor of the reported modules (weight and bias apart,
            BatchNorm's γ and β apart), ``lca/tensor/<module>/<tensor>`` (the step's Σ A over
            the tensor) and ``lca/tensor_cumulative/<module>/<tensor>``, beside the per-module
            tags; the run's totals are :attr:`cumulative_tensors` (default False).
        per_step_series: write the per-layer step series (``lca/layer/<module>``, helped /
            hurt fraction and skewness per module, ``lca/part/<part>/<module>``, the tensor
            and unit series, and their cumulative values) at every measured step. Default
            False: once per logging window of ``trainer.log_every_n_steps`` steps, at the
            window's last measured step, as the window's sum (fractions and skewness pooled
            over its steps), with ``lca/window_steps`` = the measured steps it holds; a window
            also ends at each checkpoint (so that a resumed run counts every step once) and at
            the end of the fit. Every measured step still enters the cumulative values, and
            the run-level scalars (``lca/total``, the errors, counts, shape,
            ``lca/part/<part>``) are written every measured step. Set it for per-iteration
            analyses such as the report's synchronisation test.

    Accuracy depends on the model as well as the rule. On the digits MLP of the README
    (ReLU, no normalisation, SGD-momentum) ``"simpson"``'s cumulative relative error
    |Σ_t ΣA − Σ_t ΔL| / |Σ_t ΔL| is 3e-5. On a BatchNorm ResNet-18 (digits, SGD lr 0.1,
    momentum 0.9, weight decay 5e-4, 64-sample probe, first 12 steps) the large early
    steps cross many ReLU/max-pool kinks and the loss along a step is rough: at width 16
    it was 0.18 with ``"simpson"`` and 0.042 with ``"adaptive"`` (5 of 12 steps capped at
    32 intervals). That is quadrature error (a 257-point reference agrees with the
    library), reduced by a larger probe set, a smaller learning rate or a larger
    ``max_intervals``; see docs/accuracy.md. ``lca/abs_error`` shows it per step.

    The allocations' shape is logged two ways. Per step, over the parameters i of that
    step: ``lca/skewness`` = m₃/m₂^{3/2} and ``lca/excess_kurtosis`` = m₄/m₂² − 3 with
    m_p = (1/n) Σᵢ (A_i − Ā)^p (per module ``lca/skewness/<module>``); the report averages
    them over steps. Pooled, over every (t, i) of the measured steps so far:
    ``lca/skewness_pooled`` and ``lca/excess_kurtosis_pooled``, the same formulas on the
    run's cumulative power sums Σ_t Σ_i A_{t,i}^p (p = 0..4, float64, checkpointed).

    The cheap mode ``probe="batch", rule="first_order"`` uses the gradient the
    optimizer applied (no extra pass): with plain SGD every allocation is then
    −lr·g² ≤ 0. It does not evaluate the loss after the step, so ``lca/delta_loss``,
    ``lca/abs_error`` and ``lca/cumulative_relative_error`` are not written.

    Example::

        trainer = Trainer(callbacks=[LossChangeAllocation(probe_size=512, rule="simpson")])
        trainer.fit(model, datamodule)
        # tensorboard --logdir lightning_logs  → scalars lca/layer/<module>, ...
    """

    #: The flags' values when neither you nor a preset sets them, and the named flag sets.
    DEFAULTS = DEFAULTS
    PRESETS = PRESETS

    every_n_steps = _Flag()
    probe = _Flag()
    probe_size = _Flag()
    probe_batch_size = _Flag()
    rule = _Flag()
    tolerance = _Flag()
    max_intervals = _Flag()
    relative_tolerance = _Flag()
    loss_fn = _Flag()
    batch_size_fn = _Flag()
    histograms = _Flag()
    modules = _Flag()
    decompose = _Flag()
    ablation = _Flag()
    unit_allocations = _Flag()
    preset = _Flag()
    compile_statistics = _Flag()
    name = _Flag()
    parameter_counts = _Flag()
    tensor_series = _Flag()
    per_step_series = _Flag()

    def __init__(
        self,
        every_n_steps: int = 1,
        probe: Literal["train", "val", "batch"] | DataLoader | None = None,
        probe_size: int | None = 1024,
        probe_batch_size: int = 256,
        rule: Literal["first_order", "trapezoid", "simpson", "adaptive"] | None = None,
        tolerance: float | None = None,
        loss_fn: Callable[[pl.LightningModule, Any], Any] | None = None,
        histograms: bool | None = None,
        modules: list[str] | None = None,
        decompose: bool | None = None,
        ablation: bool = False,
        unit_allocations: bool = False,
        preset: Literal["cheap", "default", "paper"] | None = None,
        compile_statistics: bool | None = None,
        batch_size_fn: Callable[[Any], int] | None = None,
        max_intervals: int = 32,
        relative_tolerance: float | None = None,
        name: str = "lca",
        flush_seconds: float = 2.0,
        parameter_counts: bool = False,
        tensor_series: bool = False,
        per_step_series: bool = False,
    ) -> None:
        super().__init__()
        self.config = LCAConfig.resolve(
            name=name,
            preset=preset,
            every_n_steps=every_n_steps,
            probe=probe,
            probe_size=probe_size,
            probe_batch_size=probe_batch_size,
            rule=rule,
            tolerance=tolerance,
            max_intervals=max_intervals,
            relative_tolerance=relative_tolerance,
            loss_fn=loss_fn,
            batch_size_fn=batch_size_fn,
            histograms=histograms,
            modules=modules,
            decompose=decompose,
            ablation=ablation,
            unit_allocations=unit_allocations,
            compile_statistics=compile_statistics,
            parameter_counts=parameter_counts,
            tensor_series=tensor_series,
            per_step_series=per_step_series,
        )
        self._log = _logging.DeferredLog(max_delay=check_seconds("flush_seconds", flush_seconds))
        # float32 rows in the cheap mode, where the statistics are most of the cost; the probe-loss
        # rules keep ~3 parameter-sized tensors already: the float64 slices' small temporaries there
        self._stats = ProductStats(compiled=bool(compile_statistics), rows=self.config.cheap)
        self._totals = RunTotals()
        self._parameter_counts = ParameterCounts()
        self._window = SeriesWindow()  # the per-layer series of the open logging window
        self.probe_samples = 0  # samples in the fixed probe set (0 for probe="batch")
        self._losses: ProbeLosses | None = None  # kept past the fit: its self-check verdict
        self._warned: set[str] = set()  # one-off messages (optimizer classes; "capped": once per fit)
        self._stochastic_logged = False
        self._reset_run_state()

    def _reset_run_state(self) -> None:
        """What one fit builds in ``on_train_start`` and drops at its end."""
        self._trainer: pl.Trainer | None = None
        self._pl_module: pl.LightningModule | None = None
        self._tracked: dict[str, Tensor] = {}
        self._estimator: StepEstimator | None = None
        self._summariser: StepSummariser | None = None
        self._events: list[StepEvent] = []
        self._pending_batches: list[tuple[Any, int]] = []
        self._records: dict[int, LCAStepRecord] = {}
        self._hook_handles: list[Any] = []
        self._hooked_steps = 0
        self._last_global_step = 0
        self._capped_seen: set[int] = set()  # steps measured by adaptive, to log lca/capped_steps on
        self._charted_parts: tuple[str, ...] = ()

    # ------------------------------------------------------------------ identity and state

    @property
    @override
    def state_key(self) -> str:
        # Lightning reads it around every hook call (profiler labels): formed once, the flags are fixed
        key = self.__dict__.get("_state_key")
        if key is None:
            key = self.__dict__["_state_key"] = self._generate_state_key(
                **self._probe_identity(),
                rule=self.rule,
                probe_size=self.probe_size,
                decompose=self.decompose,
                ablation=self.ablation,
                name=self.name,
            )
        return key

    def _tag(self, field: str) -> str:
        return f"{self.name}/{field}"

    @override
    def state_dict(self) -> dict[str, Any]:
        state = self._totals.state_dict()
        if self.parameter_counts:
            state["parameter_counts"] = self._parameter_counts.state_dict()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._totals = RunTotals.from_state_dict(state_dict)
        self._parameter_counts = ParameterCounts()
        if "parameter_counts" in state_dict:
            self._parameter_counts.load_state_dict(state_dict["parameter_counts"])

    # ------------------------------------------------------------------ set-up and tear-down

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_unique_tag_roots(trainer, self)
        if stage != "fit":
            return
        if require_supported_strategy(trainer, owner="LossChangeAllocation", model_parallel=True):
            check_sharded_config(self.config)  # FSDP2: refuse what ShardedSteps does not do, before training
        if not pl_module.automatic_optimization and self.loss_fn is None and not self.config.cheap:
            raise ProbeError(
                "LossChangeAllocation: the module uses manual optimization, so its training_step cannot be "
                "evaluated as a loss (it steps optimizers itself). Set loss_fn=callable(module, batch) -> scalar "
                "tensor, or use probe='batch' with rule='first_order'."
            )
        if self.probe == "val":
            require_validation_data(trainer, owner="LossChangeAllocation")

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()
        self._reset_run_state()
        self._warned.discard("capped")  # one capped-step warning per fit
        self._trainer, self._pl_module = trainer, pl_module
        model_parallel = shards_parameters(trainer)
        sharded = check_sharded_parameters(pl_module, owner="LossChangeAllocation", model_parallel=model_parallel)
        self._tracked = {n: p for n, p in pl_module.named_parameters() if p.requires_grad}
        local = local_views(self._tracked) if sharded else None  # FSDP2: this rank's shards (docs/fsdp.md)
        if self.compile_statistics is None:
            self._stats.compiled = _long_run_on_cpu(trainer, self._tracked, self.every_n_steps)
        self._losses = self._probe_losses(trainer, pl_module)
        owner = {n: n.rpartition(".")[0] or "root" for n in self._tracked}
        self._summariser = summariser = StepSummariser(
            local if local is not None else self._tracked,
            owner,
            reported_modules(owner, self.modules),
            self._stats,
            unit_allocations=self.unit_allocations,
            tensor_series=self.tensor_series,
        )
        self._estimator = build_estimator(
            self.config,
            self._losses,
            lambda event, allocation: summariser.corner(event.names, event.record, allocation),
            sharded=self._tracked if sharded else None,
            local=local,
            all_reduce=rank_reduce(trainer),
        )
        self._last_global_step = trainer.global_step
        self._register_hooks(trainer)
        self._write_layout(trainer)

    def _write_layout(self, trainer: pl.Trainer) -> None:
        """Charts for what this run writes: the optimizer parts once they are non-zero."""
        _logging.write_layout(
            trainer,
            lca=True,
            nfa=False,
            lca_ablation=self.ablation,
            lca_root=self.name,
            lca_tensors=self.tensor_series,
            lca_parts=self._charted_parts if self.decompose else None,
            lca_delta_loss=not self.config.cheap,
            lca_adaptive=self.rule == "adaptive",
            lca_sparse=False,
        )

    def _probe_losses(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> ProbeLosses:
        fixed = None
        if (
            self.config.needs_fixed_set
        ):  # the ablation's probe corners need one even when the main probe is the minibatch
            fixed = build_probe_set(
                trainer,
                pl_module,
                self.probe if self.probe != "batch" else "train",
                self.probe_size,
                self.probe_batch_size,
                owner="LossChangeAllocation",
                batch_size_fn=self.batch_size_fn,
            )
            self.probe_samples = fixed.samples
        losses = ProbeLosses(
            pl_module,
            fixed=fixed,
            loss_fn=self.loss_fn,
            step_context=lambda: precision_context(trainer),
            reduce=rank_sum(trainer),
            world_size=trainer.world_size,
            owner="LossChangeAllocation",
            stochastic_tag=self._tag("probe_stochastic"),
        )
        if self._losses is not None:  # a later fit keeps the first fit's self-check verdict and probe mode
            losses.mode, losses.stochastic = self._losses.mode, self._losses.stochastic
        return losses

    def _register_hooks(self, trainer: pl.Trainer) -> None:
        self._remove_hooks()
        for optimizer in trainer.optimizers:
            self._hook_handles.append(optimizer.register_step_pre_hook(self._before_step))
            self._hook_handles.append(optimizer.register_step_post_hook(self._after_step))

    def _remove_hooks(self) -> None:
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles = []

    def _release(self, trainer: pl.Trainer) -> None:
        self._close_window(trainer)  # the fit's last, partial window
        self._log.flush(trainer)
        self._remove_hooks()
        self._events.clear()
        self._pending_batches.clear()
        if self._estimator is not None:
            self._estimator.reset()

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._release(trainer)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._release(trainer)
        if self._losses is not None:
            self._losses.fixed = None  # the probe set's memory; the verdict stays

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        try:
            self._close_window(trainer)
            self._log.flush(trainer)  # what was measured before the failure still reaches the logs
        except Exception as err:  # never mask the run's own exception with ours
            rank_zero_warn(
                f"LossChangeAllocation: could not write the last steps' scalars ({type(err).__name__}: {err})"
            )

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # The logs hold every step the checkpoint's cumulative state counts, the open window
        # included: a run resumed from here (or from a crash after it) starts a new window, so
        # no point of the per-layer series counts a step twice or loses one across a restart.
        self._close_window(trainer)
        self._log.flush(trainer)

    # ------------------------------------------------------------------ optimizer step hooks

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        trainer, estimator = self._trainer, self._estimator
        if trainer is None or estimator is None:
            return
        self._flush()  # a previous step in this batch ends here (manual optimization)
        estimator.before_update(self._tracked)
        step = trainer.global_step
        if step % self.every_n_steps != 0:
            return
        owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
        event = StepEvent(step=step, optimizer=optimizer, names=[n for n, p in self._tracked.items() if id(p) in owned])
        estimator.begin(event, self._tracked)
        if self.decompose:
            event.record = record = decompose.capture_step(optimizer)
            if not record.modelled and record.optimizer_class not in self._warned:
                self._warned.add(record.optimizer_class)
                rank_zero_info(f"LossChangeAllocation: {record.unmodelled_reason}.")
        self._events.append(event)

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._hooked_steps += 1
        for event in self._events:
            if event.optimizer is optimizer and not event.done:
                event.done = True
                if event.record is not None:
                    decompose.finish_step(event.record)
                if self._estimator is not None:
                    self._estimator.after_update(event, self._tracked)
        if self._pl_module is not None and not self._pl_module.automatic_optimization:
            # Under manual optimization the module's next backward (for another optimizer, or the
            # next step) rewrites every gradient before the batch ends: measure now.
            self._flush()

    # ------------------------------------------------------------------ batches

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._estimator is not None and self._estimator.needs_minibatches:
            self._pending_batches.append((batch, batch_idx))

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._flush()
        advanced = trainer.global_step - self._last_global_step
        self._last_global_step = trainer.global_step
        stepped, self._hooked_steps = self._hooked_steps, 0
        if advanced > stepped:  # e.g. a GradScaler skipped the update: no hooks fired, θ did not move
            self._totals.skipped_steps += advanced - stepped
            skipped = tags.lca_skipped(
                self._totals.skipped_steps, root=self.name, unmoved=True, delta_loss=not self.config.cheap
            )
            self._log.add(trainer, trainer.global_step - 1, skipped)
        if advanced > 0 or stepped > 0:
            self._pending_batches.clear()
        self._log_records(trainer)
        # one write per batch of steps (the events' steps and values are unchanged)
        self._log.flush_if_due(trainer, every=_log_every_n_steps(trainer))

    # ------------------------------------------------------------------ measurement

    def _flush(self) -> None:
        """Measure every completed step: its end point is the current parameters."""
        done = [e for e in self._events if e.done]
        if not done:
            return
        self._events = [e for e in self._events if not e.done]
        for event in done:
            event.minibatches = self._pending_batches
            record = self._measure(event)
            if self._estimator is not None:
                self._estimator.release(event)
            if record is None:
                continue
            if record.step in self._records:
                self._records[record.step].merge(record)
            else:
                self._records[record.step] = record

    def _measure(self, event: StepEvent) -> LCAStepRecord | None:
        estimator, summariser = self._estimator, self._summariser
        assert estimator is not None and summariser is not None
        live = {n: p.detach() for n, p in self._tracked.items()}
        try:
            measurement = estimator.finish(event, live)
        except NonFiniteProbe as err:
            self._skip(event.step, f"non-finite probe value ({err})")
            return None
        allocation = measurement.allocation
        record = self._summarise(event, allocation)
        estimator.reduce_record(record)  # sharded parameters: sum the shards' statistics over ranks
        if not math.isfinite(record.total):
            self._skip(event.step, "non-finite allocation")
            return None
        if self.parameter_counts:
            self._count_parameters(event, allocation, record)
        estimator.accept(measurement, self._tracked)
        if self.rule == "adaptive" and not self.config.cheap:
            self._count_capped(event.step, allocation, record)
        record.ablation = measurement.corners
        stochastic = self._losses.stochastic if self._losses is not None else None
        if not self._stochastic_logged and stochastic is not None:
            self._stochastic_logged = True  # written once, with the first measured step
            record.probe_stochastic = stochastic
        allocation = dataclasses.replace(allocation, total=record.total)
        self.observe(event.step, event.names, allocation, partial(summariser.part_tensors, event.record, allocation))
        return record

    def _summarise(self, event: StepEvent, allocation: StepAllocation) -> LCAStepRecord:
        assert self._summariser is not None and self._trainer is not None
        due = self._totals.histogram_due(event.step, _log_every_n_steps(self._trainer))
        want_histograms = self.histograms and due
        record = self._summariser.summarise(
            event.step,
            event.names,
            event.record,
            allocation,
            histograms=want_histograms,
            with_delta_loss=not self.config.cheap,
        )
        if due and (self.histograms or self.parameter_counts):
            self._totals.last_histogram_step = event.step
        return record

    def _count_parameters(self, event: StepEvent, allocation: StepAllocation, record: LCAStepRecord) -> None:
        """``parameter_counts``: count the step per parameter; on histogram steps (``_summarise``
        marked this one) attach the helped-fraction histograms to the record."""
        assert self._summariser is not None
        self._parameter_counts.update(allocation, event.names)
        if self._totals.last_histogram_step == event.step:
            summariser = self._summariser
            record.param_helped, record.layer_param_helped = self._parameter_counts.helped_fractions(
                summariser.owner, summariser.reported
            )

    @property
    def probe_is_stochastic(self) -> bool | None:
        """Whether the self-check found the probe loss random (None: not checked yet, or the cheap
        mode, which evaluates no probe loss)."""
        return None if self._losses is None else self._losses.stochastic

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

    def _count_capped(self, step: int, allocation: StepAllocation, record: LCAStepRecord) -> None:
        """Count a step ``adaptive`` accepted at ``max_intervals`` above its error target
        (its allocation is recorded all the same); warn at the first one of the fit."""
        self._capped_seen.add(step)
        if not allocation.capped:
            return
        self._totals.capped_steps += 1
        if "capped" not in self._warned:
            self._warned.add("capped")
            rank_zero_warn(_capped_warning(self.config, step, allocation, record.total))

    def _skip(self, step: int, why: str) -> None:
        self._totals.skipped_steps += 1
        if self._estimator is not None:
            self._estimator.discard()
        rank_zero_warn(f"LossChangeAllocation: step {step} skipped: {why}. Training goes on.")
        if self._trainer is not None:
            self._log.add(self._trainer, step, tags.lca_skipped(self._totals.skipped_steps, root=self.name))

    def _log_records(self, trainer: pl.Trainer) -> None:
        """Log the measured steps: run-level scalars per step, per-layer series per window."""
        length = _log_every_n_steps(trainer)
        for step in sorted(self._records):
            record = self._records[step]
            if not self._window.holds(step, length):  # a window without its last step (a skip)
                self._close_window(trainer)
            self._totals.add(record)
            self._window.add(record, length)
            scalars, tensors = self._step_scalars(record), None
            if self.per_step_series or (step + self.every_n_steps) // length != step // length:
                series = self._window_series()  # the window ends with this step: one event
                if series is not None:
                    scalars.update(series[0])
                    tensors = series[1]
            histograms = tags.lca_histograms(record.histograms, root=self.name) if record.histograms else {}
            histograms.update(tags.lca_param_helped(record, root=self.name))
            self._log.add(trainer, step, scalars, histograms or None, tensors)
        self._records.clear()
        self._capped_seen.clear()

    def _step_scalars(self, record: LCAStepRecord) -> dict[str, float]:
        """The run-level scalars of one measured step."""
        scalars = tags.lca_step_scalars(record, self.cumulative_relative_error, root=self.name)
        if record.step in self._capped_seen:
            scalars.update(tags.lca_capped(self._totals.capped_steps, root=self.name))
        scalars.update(tags.lca_pooled(self._totals.moments, root=self.name))
        if record.parts:
            scalars.update(tags.lca_part_cumulative(self._totals.cumulative_parts, root=self.name, modules=False))
        return scalars

    def _window_series(self) -> tuple[dict[str, float], dict[str, Tensor]] | None:
        """Close the open window: its per-layer scalars and unit tensors (None when empty)."""
        taken = self._window.take()
        if taken is None:
            return None
        window, steps = taken
        totals = self._totals
        scalars = tags.lca_layer_scalars(
            window,
            totals.cumulative,
            root=self.name,
            cumulative_parts=totals.cumulative_parts,
            cumulative_tensors=totals.cumulative_tensors,
        )
        if not self.per_step_series:
            scalars.update(tags.lca_window_steps(steps, root=self.name))
        if self._trainer is not None and self.decompose:
            parts = charted_parts(totals.cumulative_parts)
            if set(parts) - set(self._charted_parts):  # a part became non-zero: chart it
                self._charted_parts = tuple(p for p in decompose.PARTS if p in set(parts) | set(self._charted_parts))
                self._write_layout(self._trainer)
        return scalars, tags.lca_unit_tensors(window.units, root=self.name)

    def _close_window(self, trainer: pl.Trainer) -> None:
        """Write the open window's per-layer series at its last measured step."""
        step = self._window.record.step if self._window.record is not None else None
        series = self._window_series()
        if series is not None and step is not None:
            self._log.add(trainer, step, series[0], None, series[1] or None)

    # ------------------------------------------------------------------ results

    @property
    def run_totals(self) -> RunTotals:
        """The run's cumulative state so far (a copy): sums, per-module cumulative
        allocations, measured / skipped / capped step counts."""
        return RunTotals.from_state_dict(self._totals.state_dict())

    @property
    def per_parameter_counts(self) -> dict[str, tuple[Tensor, Tensor]]:
        """``parameter_counts=True``: per trainable parameter tensor, ``(helped, hurt)``, int32
        tensors of its shape counting the measured steps with A < 0 and A > 0 (copies; empty
        when the flag is off or before the first measured step). Resumed runs continue them."""
        return self._parameter_counts.copies()

    @property
    def per_parameter_steps(self) -> dict[str, int]:
        """The measured steps counted in :attr:`per_parameter_counts`, per tensor (a parameter's
        helped fraction over training is ``helped / steps``)."""
        return dict(self._parameter_counts.steps)

    @property
    def cumulative_relative_error(self) -> float:
        """``|Σ_t Σ_i A − Σ_t ΔL| / |Σ_t ΔL|`` over the measured steps (nan in the cheap mode)."""
        return math.nan if self.config.cheap else self._totals.cumulative_relative_error

    @property
    def cumulative(self) -> dict[str, float]:
        """Cumulative allocation per module over the measured steps so far."""
        return dict(self._totals.cumulative)

    @property
    def cumulative_tensors(self) -> dict[str, float]:
        """``tensor_series=True``: cumulative allocation per parameter tensor of the reported
        modules over the measured steps so far, by qualified name (``net.0.weight``; a copy,
        checkpointed with the run's totals; empty when the flag is off)."""
        return dict(self._totals.cumulative_tensors)

    @property
    def measured_steps(self) -> int:
        """Optimizer steps measured so far (over every fit, resumed runs included)."""
        return self._totals.measured_steps

    @property
    def skipped_steps(self) -> int:
        return self._totals.skipped_steps

    @property
    def capped_steps(self) -> int:
        """Steps ``rule="adaptive"`` accepted at ``max_intervals`` sub-intervals with their error
        above ``max(tolerance, relative_tolerance·|ΔL|)`` (their allocations are recorded)."""
        return self._totals.capped_steps

    @property
    def statistics_compiled(self) -> bool:
        """Whether the per-step statistics run as compiled kernels (``compile_statistics``
        resolved; False again if compiling failed)."""
        return self._stats.compiled


def _capped_warning(config: LCAConfig, step: int, allocation: StepAllocation, total: float) -> str:
    error = abs(allocation.delta_loss - total)
    relative = "" if config.relative_tolerance is None else f", relative_tolerance={config.relative_tolerance:g}"
    return (
        f"LossChangeAllocation: step {step} reached max_intervals={config.max_intervals} sub-intervals with "
        f"|ΔL − ΣA| = {error:.3g} (ΔL = {allocation.delta_loss:+.3g}), above the accepted error "
        f"{allocation.accepted_error:.3g} (tolerance={config.tolerance:g}{relative}). The step's allocation is "
        f"still recorded; such steps are counted in {config.name}/capped_steps and this warning is not repeated. "
        "The loss along the step is too rough for the quadrature (large steps across ReLU/max-pool kinks; see "
        "docs/accuracy.md). To try: a larger max_intervals, a larger probe set (probe_size), a smaller learning "
        f"rate, a relative_tolerance, or accept the error ({config.name}/abs_error shows it per step)."
    )


def _log_every_n_steps(trainer: pl.Trainer) -> int:
    """``Trainer(log_every_n_steps=...)``, at least 1 (set on the trainer by its logger
    connector, so not in its type)."""
    return max(1, int(getattr(trainer, "log_every_n_steps", 50)))


def _long_run_on_cpu(trainer: pl.Trainer, params: dict[str, Tensor], every_n_steps: int) -> bool:
    """``compile_statistics=None``: whether this fit will measure enough parameter-steps
    on CPU to repay the compile (CUDA: eager, the compiled kernels are untested there)."""
    if not params or any(p.device.type != "cpu" for p in params.values()):
        return False
    try:
        steps = float(trainer.estimated_stepping_batches)
    except Exception:  # no length known: no basis for the trade
        return False
    numel = sum(p.numel() for p in params.values())
    work = math.ceil(steps / every_n_steps) * numel if math.isfinite(steps) else math.inf
    if work < AUTO_COMPILE_PARAMETER_STEPS:
        return False
    rank_zero_info(
        f"LossChangeAllocation: compiling the per-step statistics (≈ {steps:.0f} steps × {numel:,} parameters; "
        "a one-off compile of a few seconds). compile_statistics=False keeps them eager."
    )
    return True
