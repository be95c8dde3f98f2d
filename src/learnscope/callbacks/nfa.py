"""The NeuralFeatureAnsatz callback: when and on what to measure; the math is in
:mod:`learnscope.functional.nfa`, the drawing in the sink (:mod:`learnscope._logging`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader
from typing_extensions import override

from learnscope import _logging, _validate, contract, tags
from learnscope._model_inputs import LABEL_KEYS, default_input_fn, required_positional
from learnscope._probe import (
    PROBE_SEED,
    ProbeChunk,
    ProbeData,
    ProbeError,
    ProbeNoise,
    build_probe_set,
    check_sharded_parameters,
    probe_context,
    rank_reduce,
    rank_sum,
    require_supported_strategy,
    require_validation_data,
    seed_random_streams,
    shards_parameters,
    stochastic_forward,
    to_module_device,
)
from learnscope.callbacks._base import ProbeCallback
from learnscope.functional import sharded
from learnscope.functional.nfa import (
    ESTIMATORS,
    NULL_DRAWS,
    NullDraws,
    PreactivationGramAccumulator,
    call_model,
    check_null_draws,
    default_output_fn,
    feature_matrices,
    nfa_metrics_and_spectrum,
    readout_from_grams,
    readout_from_outputs,
)
from learnscope.layers import LayerMap, select_layers, tapped
from learnscope.records import NFARecord

__all__ = ["LABEL_KEYS", "NeuralFeatureAnsatz", "default_input_fn"]

PROBES = ("train", "val")
#: Heatmaps of WᵀW and AGOP^α are drawn for layers with at most this input dimension d.
IMAGE_MAX_INPUT_DIM = 256


class NeuralFeatureAnsatz(ProbeCallback):
    r"""The Neural Feature Ansatz (Radhakrishnan et al., 2022/2024), measured during training.

    For every measured layer with weight W (k×d, convolutions flattened to
    C_out × C_in·∏kernel) it compares the neural feature matrix WᵀW with the
    average gradient outer product AGOP = Wᵀ G W, where
    G = (1/n) Σ_x Σ_j Σ_positions ∇_z f_j ∇_z f_jᵀ is the Gram matrix of the output's
    gradients with respect to the layer's pre-activation z (BRIEF §3). The NFA
    says WᵀW ∝ AGOP^α (α = 1 and α = ½ are both in use).

    Measurements (``trainer.global_step`` = updates the measured weights have had):
    at fit start (the initialisation baseline; its weights are W₀), after every
    optimizer step that brings ``global_step`` to a multiple of ``every_n_steps``
    (in ``on_train_batch_end``), and at fit end, never twice for one step. Under a
    standalone ``trainer.validate``/``trainer.test`` it measures once at the end,
    on the probe set of the last fit (or on ``probe`` when it is a DataLoader, or
    the validation data for ``probe="val"`` under validate).

    How: all modules in eval mode (each module's own flag restored after), one
    forward of ``pl_module(input_fn(batch))`` per probe chunk, and batched
    vector-Jacobian products giving G for every layer at once, accumulated in
    float64 (:class:`~learnscope.functional.nfa.PreactivationGramAccumulator`);
    metrics in the r-dimensional range of W. Training is never perturbed:
    parameters, buffers, ``.grad``, every RNG stream, module modes and optimizer
    state stay bitwise as without the callback. Only rank zero logs. Under Lightning's
    ``ModelParallelStrategy`` (FSDP2 ``fully_shard``) every rank measures the whole probe
    set through the sharded module and each layer's W and W₀ are gathered one layer at a
    time for rank zero's metrics (docs/fsdp.md).

    Tags (``nfa/<layer>/<metric>``, at step ``global_step``): ``pearson_a1``,
    ``cosine_a1``, ``pearson_a0.5``, ``cosine_a0.5`` (NFM vs AGOP^α; Pearson is the
    headline), ``null_a*`` (the same Pearson with G rotated by random orthogonal
    matrices), ``null_se_a*`` (its standard error over the draws) and
    ``excess_a*`` = pearson − null, ``sphericity`` and
    ``sphericity_range`` (isotropy of G, overall and on range(W)), ``align_a0.5``
    (G vs WWᵀ on range(W)), ``stable_rank``, ``weight_change`` = ‖W−W₀‖/‖W‖ and
    ``cnfa_pearson_a1`` (W − W₀ in place of W). Other α get the same families with
    their own suffix. Histogram ``nfa/<layer>/spectrum``: eigenvalues of G on
    range(W). Image ``nfa/<layer>/matrices``: WᵀW beside AGOP^α for each α
    (layers with d ≤ 256). ``nfa/skipped``: measurements skipped for non-finite
    values.

    The readout layer: G = I exactly for the layer whose output is the raw model
    output (∇_z f_j = e_j), so there its α = 1 correlations are identically 1, every
    rotation null equals its value (Q I Qᵀ = I: excess always 0) and both
    sphericities are 1, whatever the weights. For that layer only the α ≠ 1
    correlations (``pearson``, ``cosine``, ``align``) and the context metrics
    (``stable_rank``, ``weight_change``) are logged. The rule: the readout is the measured layer
    whose output tensor *is* the prediction tensor returned by ``output_fn`` (the
    same tensor, or a view of all of its elements), checked by one extra forward
    at the first measurement; failing that, with the exact G, the last layer whose
    first G is a multiple of I to 1e-6 (a readout followed by a scaling or a shift,
    ``logits / T``: G = s²·I). A layer followed by a non-linear operation (a
    softmax) is not the readout: its G is not ∝ I.

    Args:
        every_n_steps: measure whenever ``global_step`` reaches a multiple of it.
        probe: ``"train"`` (a fixed random subset of the training data, chosen with
            its own seed), ``"val"`` (the validation data) or a ``DataLoader``
            (exactly that data). Use training samples to follow the papers.
        probe_size: samples in the ``"train"``/``"val"`` probe set (None: all).
        probe_batch_size: samples per forward pass (G is accumulated over chunks).
        layers: glob patterns over layer names (``["net.*"]``); default every
            ``nn.Linear``, ``nn.Conv1d/2d/3d``, Hugging Face ``Conv1D`` and the four
            maps of every ``nn.MultiheadAttention``, named ``<attention>.q``, ``.k``,
            ``.v`` and ``.out_proj`` (a pattern matching the attention module's own
            name selects all four). Linear maps on sequences are measured per token;
            convolutions per patch, G summed over positions.
        alphas: the exponents α of AGOP^α (positive).
        null_draws: random rotations for the null baseline: ``"auto"`` (draws until the
            null's standard error ``null_se_a*`` is ≤ 0.01 for every α, 4 to 64 draws;
            ``null_draws`` logs how many), an int for exactly that many (the standard
            error needs ≥ 2), 0 for no null and no excess.
        input_fn: ``batch -> model input``; default :func:`default_input_fn` (a
            forward with several required positional parameters, ``forward(inputs,
            target)``, gets that many leading elements of a tuple batch).
        output_fn: ``model output -> tensor (n, c) or (n, T, c)``; default: a
            tensor, the first element of a tuple, or ``logits`` of a dict/object.
        estimator: ``"exact"`` (c vector-Jacobian products per chunk), ``"hutchinson"``
            (``num_probes`` Rademacher probes drawn independently per sample: an
            unbiased estimate of G) or ``"auto"`` (exact for c ≤ 64 outputs per position).
        num_probes: Hutchinson probes per sample.
        images: log heatmaps of WᵀW and AGOP^α (TensorBoard loggers only).
        image_every_n_steps: also draw them at the first measurement at or after
            every multiple of this (default 10 × ``every_n_steps``); always at fit
            start and end.
        batch_size_fn: ``batch -> number of samples``, for batches whose first tensor's
            leading dimension is not the sample count, or that are not tensors, tuples,
            lists, dicts or dataclasses (it weights the probe set's chunks).
        name: the root of every tag (default ``"nfa"``: ``nfa/<layer>/<metric>``); two
            instances in one Trainer need distinct names (e.g. a train and a
            held-out probe set).

    Example::

        trainer = Trainer(callbacks=[NeuralFeatureAnsatz(every_n_steps=50, probe_size=1024)])
        trainer.fit(model, datamodule)
        # tensorboard --logdir lightning_logs  → scalars nfa/<layer>/pearson_a1, ...
    """

    def __init__(
        self,
        every_n_steps: int = 100,
        probe: Literal["train", "val"] | DataLoader = "train",
        probe_size: int | None = 1024,
        probe_batch_size: int = 256,
        layers: list[str] | None = None,
        alphas: list[float] = [1.0, 0.5],  # noqa: B006  (never mutated: copied to a tuple)
        null_draws: NullDraws = NULL_DRAWS,
        input_fn: Callable[[Any], Any] | None = None,
        output_fn: Callable[[Any], Any] | None = None,
        estimator: Literal["exact", "hutchinson", "auto"] = "auto",
        num_probes: int = 16,
        images: bool = True,
        image_every_n_steps: int | None = None,
        batch_size_fn: Callable[[Any], int] | None = None,
        name: str = "nfa",
    ) -> None:
        super().__init__()
        self.name = _validate.check_tag_root("name", name)
        self.every_n_steps = _validate.check_int("every_n_steps", every_n_steps, minimum=1)
        self.probe, self.probe_size, self.probe_batch_size = _validate.check_probe_options(
            probe, probe_size, probe_batch_size, PROBES
        )
        self.layers = _validate.check_patterns("layers", layers)
        self.alphas = _validate.check_alphas("alphas", alphas)
        self.null_draws = check_null_draws("null_draws", null_draws)
        self.input_fn = _validate.check_callable("input_fn", input_fn, "callable")
        self.output_fn = _validate.check_callable("output_fn", output_fn, "callable")
        self.batch_size_fn = _validate.check_callable(
            "batch_size_fn", batch_size_fn, "callable(batch) -> number of samples"
        )
        self.estimator = _validate.check_choice("estimator", estimator, ESTIMATORS)
        self.num_probes = _validate.check_int("num_probes", num_probes, minimum=1)
        self.images = _validate.check_bool("images", images)
        every_images = 10 * self.every_n_steps if image_every_n_steps is None else image_every_n_steps
        self.image_every_n_steps = _validate.check_int("image_every_n_steps", every_images, minimum=1)

        # run state, rebuilt when a stage starts
        self._layers: dict[str, LayerMap] = {}
        self._forward_arguments: list[str] = []
        self._probe_set = ProbeData([])
        self._readout: str | None = None
        self._inspected = False
        self._measuring_trainer: pl.Trainer | None = None
        #: ModelParallelStrategy (FSDP2): every rank measures the whole probe set (docs/fsdp.md)
        self._sharded = False
        self._warned_no_probe = False
        #: the determinism self-check's verdict (None until the first measurement)
        self.probe_is_stochastic: bool | None = None
        self._noise_logged = False
        #: the latest measurement (None before the first; under ModelParallelStrategy held by rank 0 only)
        self.last_record: NFARecord | None = None
        #: "exact" or "hutchinson" once the first measurement resolved ``estimator``
        self.resolved_estimator: str | None = None
        # state saved in checkpoints
        self._initial_weights: dict[str, Tensor] = {}
        self._last_measured_step: int | None = None
        self._last_image_step: int | None = None
        self._skipped = 0

    # ------------------------------------------------------------------ identity

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            **self._probe_identity(),
            probe_size=self.probe_size,
            layers=self.layers,
            alphas=list(self.alphas),
            name=self.name,
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        # Under FSDP2 W₀ is kept sharded, but rank 0 alone writes the callback's state: each
        # layer's W₀ is gathered (one at a time, every rank) and saved whole, on the CPU.
        initial = {n: sharded.full(w).cpu() if self._sharded else w for n, w in self._initial_weights.items()}
        return {
            "initial_weights": initial,
            "last_measured_step": self._last_measured_step,
            "last_image_step": self._last_image_step,
            "skipped": self._skipped,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._initial_weights = dict(state_dict.get("initial_weights", {}))
        self._last_measured_step = state_dict.get("last_measured_step")
        self._last_image_step = state_dict.get("last_image_step")
        self._skipped = int(state_dict.get("skipped", 0))

    @property
    def skipped(self) -> int:
        """Measurements skipped so far because a weight or G was not finite."""
        return self._skipped

    @property
    def initial_weights(self) -> dict[str, Tensor]:
        """W₀ (flattened, k×d) of every measured layer, captured at the first fit start (under
        ModelParallelStrategy a ``DTensor``: this rank holds its shard)."""
        return dict(self._initial_weights)

    @property
    def readout(self) -> str | None:
        """The measured layer whose output is the model output (see the class docstring)."""
        return self._readout

    # ------------------------------------------------------------------ hooks: when to measure

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        _validate.check_unique_tag_roots(trainer, self)
        if type(pl_module).forward is pl.LightningModule.forward:
            raise ProbeError(
                f"NeuralFeatureAnsatz runs the model as pl_module(inputs), but {type(pl_module).__name__} "
                "does not define forward(); add a forward method that returns the model output"
            )
        if stage == "fit":
            require_supported_strategy(trainer, owner="NeuralFeatureAnsatz", model_parallel=True)
        self._sharded = shards_parameters(trainer)
        if stage == "fit" and self.probe == "val":
            require_validation_data(trainer, owner="NeuralFeatureAnsatz")
        self._forward_arguments = required_positional(pl_module)
        self._select_layers(pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._layers:
            return
        check_sharded_parameters(pl_module, owner="NeuralFeatureAnsatz", model_parallel=self._sharded)
        self._capture_initial_weights()
        self._probe_set = self._build_probe_set(trainer, pl_module)
        _logging.write_layout(
            trainer,
            lca=False,
            nfa=True,
            nfa_metrics=contract.nfa_metric_names(self.alphas, null=self.null_draws != 0),
            nfa_layers=list(self._layers),
            nfa_root=self.name,
        )
        if trainer.global_step != self._last_measured_step:
            self._measure(trainer, pl_module, boundary=True)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # global_step has already counted this batch's optimizer step (if any): the weights
        # measured here have had exactly global_step updates. Under gradient accumulation the
        # non-stepping micro-batches see the step number of the last measurement and are skipped.
        step = trainer.global_step
        if self._layers and step % self.every_n_steps == 0 and step != self._last_measured_step:
            self._measure(trainer, pl_module, boundary=False)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._layers and trainer.global_step != self._last_measured_step:
            self._measure(trainer, pl_module, boundary=True)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "validate" and not trainer.sanity_checking:
            self._measure_standalone(trainer, pl_module)

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "test":
            self._measure_standalone(trainer, pl_module)

    # ------------------------------------------------------------------ on what: layers and data

    def _select_layers(self, pl_module: pl.LightningModule) -> None:
        self._layers = select_layers(pl_module, self.layers)
        self._readout, self._inspected = None, False
        # (an empty selection by patterns has been explained by select_layers already)
        if not self._layers and self.layers is None:
            rank_zero_warn(
                "NeuralFeatureAnsatz: the model has no measurable layer (nn.Linear, nn.Conv1d/2d/3d, "
                "Hugging Face Conv1D, nn.MultiheadAttention); the callback does nothing"
            )

    def _capture_initial_weights(self) -> None:
        """W₀ of each layer, unless a checkpoint restored it (then the run continues exactly).
        Under FSDP2 a sharded copy (this rank's shard, like the weight itself); a W₀ restored
        whole from a checkpoint is cut into the same shards."""
        for name, layer in self._layers.items():
            weight = layer.weight_flat()
            saved = self._initial_weights.get(name)
            if saved is not None and saved.shape == weight.shape and not hasattr(saved, "device_mesh"):
                saved = self._initial_weights[name] = sharded.shard_like(saved, weight)
            if saved is None or saved.shape != weight.shape:
                if saved is not None:
                    rank_zero_warn(
                        f"NeuralFeatureAnsatz: the saved initial weight of {name!r} has shape {tuple(saved.shape)}, "
                        f"not {tuple(weight.shape)}; weight_change and cnfa_pearson_a1 restart from the current weights"
                    )
                self._initial_weights[name] = weight.clone()
            if not bool(torch.isfinite(sharded.full(self._initial_weights[name])).all()):
                rank_zero_warn(
                    f"NeuralFeatureAnsatz: the initial weight of {name!r} is not finite; its weight_change and "
                    "cnfa_pearson_a1 are left out. Training goes on."
                )

    def _build_probe_set(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> ProbeData:
        return build_probe_set(
            trainer,
            pl_module,
            self.probe,
            self.probe_size,
            self.probe_batch_size,
            owner="NeuralFeatureAnsatz",
            batch_size_fn=self.batch_size_fn,
        )

    def _measure_standalone(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """One measurement under ``trainer.validate``/``test`` (inference mode, no fit loop)."""
        if not self._layers:
            return
        if trainer is self._measuring_trainer and trainer.global_step == self._last_measured_step:
            return  # this trainer measured these weights already (e.g. at fit end)
        if self._probe_set:
            self._probe_set = self._probe_set.to(partial(to_module_device, trainer))
        elif isinstance(self.probe, DataLoader) or (self.probe == "val" and trainer.state.fn == "validate"):
            self._probe_set = self._build_probe_set(trainer, pl_module)
        else:
            if not self._warned_no_probe:
                self._warned_no_probe = True
                rank_zero_warn(
                    f"NeuralFeatureAnsatz: trainer.{trainer.state.fn} has no {self.probe!r} probe data and no fit "
                    "ran before with this callback; nothing measured. Pass probe=DataLoader(...) to measure here."
                )
            return
        self._measure(trainer, pl_module, boundary=True)

    # ------------------------------------------------------------------ measurement

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *, boundary: bool) -> None:
        step = trainer.global_step
        self._last_measured_step = step
        self._measuring_trainer = trainer
        # Under DDP every rank measures its share of the probe set and G is summed over
        # ranks, so all ranks hold the same values; only rank zero writes them. Under FSDP2
        # every rank measures the whole probe set (the same forwards: FSDP's all-gathers
        # match), so G is already whole on every rank and is not summed (docs/fsdp.md).
        if not self._inspected:
            self._inspect(pl_module)
        grams, estimator = self._preactivation_grams(trainer, pl_module, step)
        if self.resolved_estimator is None:
            self.resolved_estimator = estimator
            if self._readout is None and estimator == "exact":
                self._readout = readout_from_grams(grams)
            self._describe(estimator, grams)
        # FSDP2: DTensors, this rank's shard of each weight (nothing gathered yet)
        weights = {name: self._layers[name].weight_flat() for name in grams}
        non_finite = self._non_finite(trainer, weights, grams)
        if non_finite:
            self._skipped += 1
            rank_zero_warn(
                f"NeuralFeatureAnsatz: measurement at step {step} skipped: non-finite weights or G in "
                f"{non_finite}. Training goes on."
            )
            _logging.log_scalars(trainer, tags.nfa_skipped(self._skipped, root=self.name), step=step)
            return
        draw = self.images and bool(_logging.tensorboard_writers(trainer)) and (boundary or self._images_due(step))
        record = self._summarise(step, weights, grams, estimator, draw)
        self._noise_logged = True
        if record is not None:  # None: a rank other than 0 under FSDP2, which only took part in the gathers
            self.last_record = record
            self._write(trainer, record, draw)

    def _non_finite(self, trainer: pl.Trainer, weights: Mapping[str, Tensor], grams: Mapping[str, Tensor]) -> list[str]:
        """The layers whose weight or G holds a NaN or an infinity (their metrics are undefined);
        under FSDP2 from each rank's shards, agreed by all ranks (they skip together)."""
        reduce = rank_reduce(trainer) if self._sharded else None
        return sharded.any_non_finite({name: (weights[name], gram) for name, gram in grams.items()}, reduce)

    def _write(self, trainer: pl.Trainer, record: NFARecord, draw: bool) -> None:
        """Hand the record to the sink: scalars, spectra and, when due, the matrices to draw."""
        _logging.log_scalars(trainer, tags.nfa_scalars(record, root=self.name), step=record.step)
        _logging.log_histograms(trainer, tags.nfa_histograms(record, root=self.name), step=record.step)
        if draw:
            self._last_image_step = record.step
            _logging.log_images(trainer, tags.nfa_images(record, root=self.name), step=record.step)

    def _images_due(self, step: int) -> bool:
        last = self._last_image_step
        return last is None or step // self.image_every_n_steps > last // self.image_every_n_steps

    def _model_inputs(self, batch: Any) -> Any:
        if self.input_fn is None:
            return default_input_fn(batch, self._forward_arguments)
        try:
            return self.input_fn(batch)
        except Exception as error:
            raise ProbeError(f"NeuralFeatureAnsatz: input_fn raised {type(error).__name__}: {error}") from error

    def _prediction(self, output: Any) -> Tensor:
        try:
            prediction = (self.output_fn or default_output_fn)(output)
        except Exception as error:
            # default_output_fn's own message already says to pass output_fn
            what = str(error) if self.output_fn is None else f"output_fn raised {type(error).__name__}: {error}"
            raise ProbeError(f"NeuralFeatureAnsatz: {what}") from error
        if not isinstance(prediction, Tensor):
            raise ProbeError(
                f"NeuralFeatureAnsatz: output_fn must return a tensor of shape (n, c) or (n, T, c), "
                f"got {type(prediction).__name__}"
            )
        return prediction

    def _inspect(self, pl_module: pl.LightningModule) -> None:
        """First measurement: check that input_fn and output_fn read the data, that the forward
        is deterministic, and find the readout.

        One forward on the first probe chunk records every measured layer's output
        tensor; the readout is the layer whose output is the prediction itself
        (:func:`~learnscope.functional.nfa.readout_from_outputs`).
        """
        layer_outputs: dict[str, Tensor | None] = dict.fromkeys(self._layers)  # in layer order

        def recorder(name: str) -> Callable[[Tensor], Tensor]:
            def tap(output: Tensor) -> Tensor:
                layer_outputs[name] = output
                return output

            return tap

        chunk = self._probe_set[0]
        inputs = self._model_inputs(chunk.batch)
        with probe_context(pl_module, mode="eval", device=pl_module.device), torch.no_grad():
            with tapped(self._layers, recorder):
                prediction = self._prediction(self._first_forward(pl_module, inputs))
            self._check_rows(prediction, chunk)
            noise = stochastic_forward(
                pl_module, lambda: self._prediction(call_model(pl_module, inputs)), pl_module.device
            )
        self._note_noise(noise)
        self._readout = readout_from_outputs(layer_outputs, prediction)
        self._inspected = True

    def _first_forward(self, pl_module: pl.LightningModule, inputs: Any) -> Any:
        try:
            return call_model(pl_module, inputs)
        except Exception as error:
            hint = "the default input_fn" if self.input_fn is None else "input_fn"
            raise ProbeError(
                f"NeuralFeatureAnsatz: pl_module(inputs) failed on a probe batch read by {hint} "
                f"({type(error).__name__}: {error}); pass input_fn=callable(batch) -> model input"
            ) from error

    def _note_noise(self, noise: ProbeNoise | None) -> None:
        self.probe_is_stochastic = noise is not None
        if noise is not None:
            rank_zero_warn(
                f"NeuralFeatureAnsatz: the probe forward is not deterministic: {noise.describe()}. G is then an "
                f"average over that noise, not the model's AGOP ({self.name}/probe_stochastic = 1). Draw random "
                "numbers only when `self.training` is True in that module."
            )

    @staticmethod
    def _check_rows(prediction: Tensor, chunk: ProbeChunk) -> None:
        """G is a sum over samples of per-sample Jacobians: the prediction's rows must be the
        chunk's samples. A model that flattens its tokens into rows ((n·T, c), as
        ``output.view(-1, vocab)`` does) would have the exact estimator add up the gradients
        of a sequence's tokens before squaring them: refuse it with the recipe."""
        rows = prediction.shape[0] if prediction.dim() > 0 else 1
        if chunk.size and rows != chunk.size:
            raise ProbeError(
                f"NeuralFeatureAnsatz: the prediction has {rows} rows for a probe chunk of {chunk.size} samples "
                f"(shape {tuple(prediction.shape)}); G needs one row per sample: (n, c) or (n, T, c). If the model "
                "flattens its tokens into rows, pass output_fn=lambda out: out.view(-1, T, out.shape[-1]) "
                "with T its sequence length (or batch_size_fn, if the chunk's sample count is not the first "
                "tensor's first dimension)"
            )

    def _preactivation_grams(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int
    ) -> tuple[dict[str, Tensor], str]:
        model: nn.Module = pl_module
        if getattr(trainer, "world_size", 1) > 1 and any(True for _ in pl_module.buffers()):
            # BatchNorm running statistics differ between ranks: measure all ranks with rank 0's.
            buffers = {n: b.detach().clone() for n, b in pl_module.named_buffers()}
            model = _WithBuffers(pl_module, trainer.strategy.broadcast(buffers, src=0))
        accumulator = PreactivationGramAccumulator(
            model,
            self._layers,
            output_fn=self._prediction,
            estimator=self.estimator,
            num_probes=self.num_probes,
            # Hutchinson probes: reproducible, independent between steps and ranks (under FSDP2 the same on
            # every rank: each measures the whole probe set), never the global RNG.
            generator=torch.Generator().manual_seed(step * 1009 + (0 if self._sharded else self._rank)),
        )
        with probe_context(pl_module, mode="eval", device=pl_module.device):
            for index, chunk in enumerate(self._probe_set):
                seed_random_streams(PROBE_SEED + index, pl_module.device)  # whatever randomness is left: fixed
                accumulator.update(self._model_inputs(chunk.batch))
        reduce = None if self._sharded else rank_sum(trainer)  # FSDP2: every rank's G is already the whole set's
        return accumulator.compute(reduce=reduce), str(accumulator.estimator)

    @property
    def _rank(self) -> int:
        trainer = getattr(self, "_measuring_trainer", None)
        return getattr(trainer, "global_rank", 0) if trainer is not None else 0

    def _describe(self, estimator: str, grams: Mapping[str, Tensor]) -> None:
        samples = sum(chunk.size for chunk in self._probe_set)
        how = "exact" if estimator == "exact" else f"a Hutchinson estimate ({self.num_probes} probes per sample)"
        readout = (
            f"; readout layer {self._readout!r} (G ∝ I: its α = 1 metrics, nulls and sphericities are not logged)"
            if self._readout
            else ""
        )
        rank_zero_info(f"NeuralFeatureAnsatz: measuring {list(grams)} on {samples} probe samples, G {how}{readout}")

    def _summarise(
        self, step: int, weights: Mapping[str, Tensor], grams: Mapping[str, Tensor], estimator: str, draw: bool
    ) -> NFARecord | None:
        """The record of one measurement. Under FSDP2 each layer's W and W₀ are gathered whole
        one layer at a time, by every rank in the same order (the all-gathers match); only
        rank 0 computes the metrics, the other ranks return None."""
        metrics: dict[str, dict[str, float]] = {}
        spectra: dict[str, Tensor] = {}
        matrices: dict[str, dict[str, Tensor]] = {}
        computes = not self._sharded or self._rank == 0
        for name, gram in grams.items():
            weight, initial = sharded.full(weights[name]), self._initial_weight(name)
            if not computes:
                continue
            metrics[name], spectrum = self._layer_metrics(name, weight, gram, initial)
            if name != self._readout:  # the readout's G = I: its spectrum is all ones, nothing to read
                spectra[name] = spectrum
            if draw and weight.shape[1] <= IMAGE_MAX_INPUT_DIM:
                matrices[name] = feature_matrices(weight, gram, alphas=self.alphas)
        if not computes:
            return None
        return NFARecord(
            step=step,
            metrics=metrics,
            spectra=spectra,
            grams=dict(grams),
            estimator=estimator,
            readout=self._readout,
            skipped=self._skipped,
            matrices=matrices,
            probe_stochastic=None if self._noise_logged else self.probe_is_stochastic,
        )

    def _initial_weight(self, name: str) -> Tensor | None:
        """W₀ of layer ``name``, whole (gathered under FSDP2: every rank calls this), or None
        when there is none or it is not finite (weight_change and the centred NFA are then
        undefined: left out)."""
        initial = self._initial_weights.get(name)
        if initial is None:
            return None
        initial = sharded.full(initial)
        return initial if bool(torch.isfinite(initial).all()) else None

    def _layer_metrics(
        self, name: str, weight: Tensor, gram: Tensor, initial: Tensor | None
    ) -> tuple[dict[str, float], Tensor]:
        """The finite metrics a layer logs, and its spectrum; at the readout the metrics
        that are identically 1 there (α = 1, nulls, sphericities) are left out."""
        readout = name == self._readout
        values, spectrum = nfa_metrics_and_spectrum(
            weight,
            gram,
            alphas=self.alphas,
            initial_weight=initial,
            # G = I is rotation invariant: at the readout every null equals its value
            null_draws=0 if readout else self.null_draws,
            readout=readout,
        )
        if readout:  # and ψ(I) = 1: sphericity says nothing there either
            del values["sphericity"], values["sphericity_range"]
        return {key: value for key, value in values.items() if math.isfinite(value)}, spectrum


class _WithBuffers(nn.Module):
    """Runs ``module`` with substitute buffers (live buffers untouched); hooks on its
    layers still fire. The module is held, not registered, so it is not a child."""

    wrapped: nn.Module  # set with object.__setattr__: an instance attribute, not a submodule

    def __init__(self, module: nn.Module, buffers: dict[str, Tensor]) -> None:
        super().__init__()
        object.__setattr__(self, "wrapped", module)
        self.substitute = buffers

    @override
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return torch.func.functional_call(self.wrapped, self.substitute, args, kwargs, strict=False)
