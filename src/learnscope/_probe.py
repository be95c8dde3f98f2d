"""Probe plumbing shared by the callbacks: which data a probe evaluates, and how to
evaluate a LightningModule at other parameter values without perturbing training.

What "without perturbing" means here (checked bitwise in tests): parameters,
buffers, ``.grad``, every RNG stream (torch CPU/CUDA, ``random``, NumPy), each
module's own ``.training`` flag and the optimizer state are exactly as before.
The recipe: ``torch.func.functional_call`` with detached leaves and cloned
buffers, ``torch.autograd.grad`` (never ``.backward``), forked RNGs, saved and
restored mode flags, and ``self.log`` silenced during probe passes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np  # a dependency of Lightning and TensorBoard
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset, Subset

from learnscope._compat import reparametrized, validation_data_source
from learnscope.functional.lca import Evaluation
from learnscope.functional.sharded import fsdp2_layout, local, local_gradient, written_into

PROBE_SEED = 20191003  # fixed: the probe subset never depends on the run's seed or RNG state


class ProbeError(RuntimeError):
    """A probe cannot read the user's batches, outputs or losses (a configuration error)."""


class NonFiniteProbe(ArithmeticError):
    """The probe loss or gradient is NaN or infinite at some evaluated point."""


# --------------------------------------------------------------------------- isolation


@contextlib.contextmanager
def preserved_rng(device: torch.device | None = None) -> Iterator[None]:
    """Fork torch (CPU and the module's accelerator), Python and NumPy RNG streams."""
    devices = [device] if device is not None and device.type == "cuda" else []
    py_state = random.getstate()
    np_state = np.random.get_state()
    try:
        with torch.random.fork_rng(devices=devices, enabled=True):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def uses_batch_statistics(module: nn.Module) -> bool:
    """Whether ``module`` follows PyTorch's running-statistics convention: in training
    mode it normalises with the statistics of the batch it is given (BatchNorm,
    SyncBatchNorm, InstanceNorm with ``track_running_stats``, and third-party layers
    built on them or on the same ``running_mean`` / ``track_running_stats`` attributes)."""
    return hasattr(module, "running_mean") or hasattr(module, "track_running_stats")


PROBE_MODES = ("deterministic", "eval", "dropout_off")
#: The dropout layers of torch.nn (and their subclasses, by isinstance).
DROPOUT_LAYERS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


@contextlib.contextmanager
def module_modes(module: nn.Module, mode: str) -> Iterator[None]:
    """Temporarily set modes for a probe pass, restoring each module's own flag after.

    ``mode="deterministic"`` (LCA): every module in eval mode, so that anything a
    module does differently when training (``nn.Dropout``, the attention-weight
    dropout of ``nn.MultiheadAttention`` and of Hugging Face attention, DropPath /
    StochasticDepth, noise layers, MoE jitter, ...) is off, whatever library it comes
    from; except normalisation layers in training mode that use batch statistics
    (:func:`uses_batch_statistics`), which keep training mode and normalise with each
    probe chunk's own statistics (their running buffers are cloned by the caller).
    ``mode="eval"`` (NFA): every module in eval mode (samples never interact).
    ``mode="dropout_off"`` (LCA's fallback for models that cannot be evaluated in eval
    mode, e.g. a forward that returns other outputs when not training): every module
    as it is, except ``nn.Dropout`` layers, which are off.
    """
    if mode not in PROBE_MODES:
        raise ValueError(f"mode must be one of {PROBE_MODES}, got {mode!r}")
    saved = [(m, m.training) for m in module.modules()]
    try:
        for m, training in saved:
            if mode == "dropout_off":
                m.training = training and not isinstance(m, DROPOUT_LAYERS)
            else:
                m.training = training and mode == "deterministic" and uses_batch_statistics(m)
        yield
    finally:
        for m, flag in saved:
            m.training = flag


def seed_random_streams(seed: int, device: torch.device | None = None) -> None:
    """Set torch's CPU stream (and ``device``'s, when it is a CUDA device), Python's and
    NumPy's to ``seed``. Call it inside :func:`preserved_rng`: the run's own streams are
    restored afterwards. Probe passes seed every chunk this way, so that a forward that
    still draws random numbers in eval mode draws the same ones at every θ (common
    random numbers): the probe loss stays a function of θ."""
    torch.random.default_generator.manual_seed(seed)
    if device is not None and device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.default_generators[index].manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


@contextlib.contextmanager
def silenced_logging(pl_module: nn.Module) -> Iterator[None]:
    """Make ``self.log`` / ``self.log_dict`` no-ops for the probe's own passes."""
    names = [n for n in ("log", "log_dict") if hasattr(pl_module, n)]
    shadowed = {n: n in vars(pl_module) for n in names}
    saved = {n: vars(pl_module)[n] for n in names if shadowed[n]}
    try:
        for n in names:
            object.__setattr__(pl_module, n, _no_op)
        yield
    finally:
        for n in names:
            if shadowed[n]:
                object.__setattr__(pl_module, n, saved[n])
            else:
                object.__delattr__(pl_module, n)


def _no_op(*args: Any, **kwargs: Any) -> None:
    return None


@contextlib.contextmanager
def probe_context(module: nn.Module, *, mode: str, device: torch.device | None = None) -> Iterator[None]:
    """Everything a probe pass needs: grad on, inference mode off, eager execution,
    forked RNG, probe module modes, and silenced logging."""
    stance = (
        torch.compiler.set_stance("force_eager") if hasattr(torch.compiler, "set_stance") else contextlib.nullcontext()
    )
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        stack.enter_context(stance)
        stack.enter_context(preserved_rng(device))
        stack.enter_context(module_modes(module, mode))
        stack.enter_context(silenced_logging(module))
        yield


# --------------------------------------------------------------------------- data


def batch_size_of(batch: Any) -> int:
    """Leading dimension of the first tensor found in a (nested) batch: a tensor, a
    mapping, a list or tuple, or a dataclass (its fields in order)."""
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.ndim > 0 else 1
    if isinstance(batch, Mapping):
        items: Sequence[Any] = list(batch.values())
    elif isinstance(batch, (list, tuple)):
        items = batch
    elif dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        items = [getattr(batch, f.name) for f in dataclasses.fields(batch)]
    else:
        raise ProbeError(f"cannot find a tensor in a batch of type {type(batch).__name__}")
    for item in items:
        try:
            return batch_size_of(item)
        except ProbeError:
            continue
    raise ProbeError(f"cannot find a tensor in a batch of type {type(batch).__name__}")


def samples_in(batch: Any, batch_size_fn: Callable[[Any], int] | None = None) -> int:
    """The number of samples in ``batch``: ``batch_size_fn(batch)`` when given (checked to be
    an int >= 0), else :func:`batch_size_of`."""
    if batch_size_fn is None:
        return batch_size_of(batch)
    try:
        size = batch_size_fn(batch)
    except Exception as error:
        raise ProbeError(f"batch_size_fn raised {type(error).__name__}: {error}") from error
    if isinstance(size, Tensor) and size.numel() == 1 and not size.is_floating_point():
        size = int(size)
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ProbeError(f"batch_size_fn must return the number of samples as an int >= 0, got {size!r}")
    return size


@dataclass
class ProbeChunk:
    """One fixed piece of the probe set, already on the module's device."""

    batch: Any
    batch_idx: int
    weight: float  # share of the probe loss: samples in the chunk / samples in the set
    size: int


def chunk_weights(
    batches: Sequence[Any], *, equal: bool = False, batch_size_fn: Callable[[Any], int] | None = None
) -> list[ProbeChunk]:
    """Weight chunks by their sample count (a mean over samples), or equally (a mean
    over micro-batches, as gradient accumulation does). ``batch_size_fn`` counts the
    samples of batches whose first tensor's leading dimension is not it (e.g. graphs)."""
    if not batches:
        raise ProbeError("the probe set is empty")
    if equal:
        return [ProbeChunk(b, i, 1.0 / len(batches), 0) for i, b in enumerate(batches)]
    try:
        sizes = [samples_in(b, batch_size_fn) for b in batches]
    except ProbeError as err:
        if batch_size_fn is not None:
            raise
        raise ProbeError(
            f"{err}: the probe set's chunks are weighted by their number of samples, read from the first tensor "
            "of each batch (tensors, tuples, lists, dicts or dataclasses of tensors). For other batch types pass "
            "batch_size_fn=callable(batch) -> number of samples, or probe=DataLoader(...) yielding such batches."
        ) from None
    total = sum(sizes)
    if total == 0:
        raise ProbeError("the probe set is empty")
    return [
        ProbeChunk(b, i, (1.0 / len(batches)) if equal else (n / total), n)
        for i, (b, n) in enumerate(zip(batches, sizes))
    ]


class ProbeData(Sequence[ProbeChunk]):
    """The probe chunks this rank evaluates: ``L(θ) = Σ_c w_c ℓ_c(θ)``, where the weights
    of all ranks' chunks together sum to 1 (a mean over samples, or over micro-batches).

    It owns the weighting and the sharding over ranks, so an objective only sums
    ``w_c ℓ_c`` over its chunks and adds the ranks' sums. A sequence of
    :class:`ProbeChunk`."""

    def __init__(self, chunks: Sequence[ProbeChunk]) -> None:
        self.chunks: tuple[ProbeChunk, ...] = tuple(chunks)

    @classmethod
    def fixed(
        cls,
        batches: Sequence[Any],
        *,
        batch_size_fn: Callable[[Any], int] | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> ProbeData:
        """A fixed probe set: each batch weighted by its share of the samples of the whole
        set; rank ``rank`` of ``world_size`` keeps every ``world_size``-th chunk (whole
        chunks, so BatchNorm sees the same chunk statistics as in one process)."""
        chunks = chunk_weights(batches, batch_size_fn=batch_size_fn)
        return cls([c for i, c in enumerate(chunks) if i % world_size == rank])

    @classmethod
    def minibatches(cls, batches: Sequence[tuple[Any, int]], *, world_size: int = 1) -> ProbeData:
        """One optimizer step's ``(batch, batch_idx)`` micro-batches on this rank, each
        weighted ``1 / (micro-batches × ranks)``: the loss gradient accumulation and DDP
        train on."""
        chunks = chunk_weights([batch for batch, _ in batches], equal=True)
        for chunk, (_, index) in zip(chunks, batches):
            chunk.batch_idx = index
            chunk.weight /= world_size
        return cls(chunks)

    @property
    def samples(self) -> int:
        """Samples in this rank's chunks (0 for micro-batches, which are not counted)."""
        return sum(chunk.size for chunk in self.chunks)

    def to(self, convert: Callable[[Any], Any]) -> ProbeData:
        """The same chunks with ``convert`` applied to each batch (e.g. a device move)."""
        return ProbeData([dataclasses.replace(c, batch=convert(c.batch)) for c in self.chunks])

    def __getitem__(self, index: Any) -> Any:
        return self.chunks[index]

    def __len__(self) -> int:
        return len(self.chunks)

    def __repr__(self) -> str:
        return f"ProbeData({len(self.chunks)} chunks, {self.samples} samples)"


def _subset_loader(loader: DataLoader, size: int | None, batch_size: int) -> DataLoader | None:
    """A deterministic subset of a map-style loader's dataset, in fixed order, or None
    when the dataset is not map-style (then whole batches are taken in order)."""
    dataset = loader.dataset
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__") or loader.batch_size is None:
        return None
    n = len(dataset)
    if size is not None and size < n:
        generator = torch.Generator().manual_seed(PROBE_SEED)
        indices = torch.randperm(n, generator=generator)[:size].sort().values.tolist()
        dataset = Subset(dataset, indices)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=loader.collate_fn, num_workers=0)


def collect_batches(
    loader: Any,
    size: int | None,
    batch_size: int,
    *,
    subset: bool = True,
    batch_size_fn: Callable[[Any], int] | None = None,
) -> list[Any]:
    """Take the probe batches from ``loader`` (a DataLoader or any iterable of batches).

    For a map-style DataLoader and ``subset=True``: a fixed random subset of ``size``
    samples (seeded independently of the run), re-batched by ``batch_size``. Otherwise
    whole batches in order until ``size`` samples are reached (None: all of them).
    The caller forks the RNG streams: iterating a loader may draw from them.
    """
    source = _subset_loader(loader, size, batch_size) if subset and isinstance(loader, DataLoader) else None
    if source is not None:
        return list(source)
    batches, seen = [], 0
    for batch in loader:
        batches.append(batch)
        if size is not None:
            seen += samples_in(batch, batch_size_fn)
        if size is not None and seen >= size:
            break
    return batches


def require_validation_data(trainer: Any, *, owner: str) -> None:
    """Fail in ``setup`` when ``probe="val"`` but the trainer has no validation data."""
    source = validation_data_source(trainer)
    if source is None or source.instance is None or not source.is_defined():
        raise ProbeError(
            f"{owner}(probe='val') needs validation data, but the trainer has none: "
            "pass val_dataloaders / define val_dataloader, or set probe='train'."
        )


#: Lightning strategies that shard parameters or optimizer state across ranks. The probes
#: evaluate the module at other θ with ``torch.func.functional_call`` on whole parameters
#: and reduce plain tensors; under these a parameter is a shard (a ``DTensor`` or a flat
#: buffer), so they are refused at ``setup`` instead of failing in the middle of training.
SHARDING_STRATEGIES = ("FSDPStrategy", "ModelParallelStrategy", "DeepSpeedStrategy")
SUPPORTED_STRATEGIES = "a single device or DDP (strategy='ddp', 'ddp_spawn', 'ddp_fork', 'ddp_notebook')"


def shards_parameters(trainer: Any) -> bool:
    """Whether the trainer runs Lightning's ``ModelParallelStrategy`` (FSDP2 ``fully_shard``,
    the one sharding strategy LossChangeAllocation supports). Every rank then evaluates the
    whole fixed probe set: FSDP's all-gathers need the same forwards on every rank."""
    return "ModelParallelStrategy" in {cls.__name__ for cls in type(getattr(trainer, "strategy", None)).__mro__}


def require_supported_strategy(trainer: Any, *, owner: str, model_parallel: bool = False) -> bool:
    """Fail in ``setup`` under a strategy that shards parameters (docs/fsdp.md), except
    ``ModelParallelStrategy`` when ``model_parallel``; return whether it is that one."""
    strategy = getattr(trainer, "strategy", None)
    names = {cls.__name__ for cls in type(strategy).__mro__}
    refused = next((name for name in SHARDING_STRATEGIES if name in names), None)
    if refused == "ModelParallelStrategy" and model_parallel:
        return True
    if refused is not None:
        kind = "" if refused == type(strategy).__name__ else f", a {refused}"
        also = " or ModelParallelStrategy with FSDP2 fully_shard" if model_parallel else ""
        raise ProbeError(
            f"{owner} does not support {type(strategy).__name__}{kind} (it shards parameters or optimizer "
            f"state across ranks). Supported: {SUPPORTED_STRATEGIES}{also}. Remove the callback for this "
            "run, or train with DDP; see docs/fsdp.md."
        )
    return False


def check_sharded_parameters(module: nn.Module, *, owner: str, model_parallel: bool = False) -> bool:
    """Before the first step: whether the trainable parameters are FSDP2 shards the callback
    handles (``model_parallel``: the trainer runs ``ModelParallelStrategy`` and the owner
    supports it). Fails on sharded ``DTensor`` parameters anywhere else (e.g. ``fully_shard``
    applied by hand), on other layouts (tensor parallelism, HSDP), and under
    ``ModelParallelStrategy`` on parameters left unsharded."""
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    sharded = [n for n, p in params.items() if hasattr(p, "device_mesh")]
    if model_parallel:
        problem = fsdp2_layout(params)
        plain = next((n for n in params if n not in sharded), None)
        if plain is not None:
            problem = f"{plain!r} is not sharded (apply fully_shard to every module with trainable parameters)"
        if problem is None:
            return True
        raise ProbeError(
            f"{owner} supports ModelParallelStrategy only with FSDP2 (fully_shard on a 1-D data-parallel mesh, "
            f"tensor_parallel_size=1) over every trainable parameter: {problem}; see docs/fsdp.md."
        )
    if sharded:
        raise ProbeError(
            f"{owner} does not support sharded parameters: {sharded[0]!r} is a "
            f"{type(params[sharded[0]]).__name__} (FSDP2 fully_shard or tensor parallelism). "
            f"Supported: {SUPPORTED_STRATEGIES} with plain tensor parameters; see docs/fsdp.md."
        )
    return False


def _validation_loader(trainer: Any) -> Any:
    loader = trainer.val_dataloaders
    if loader is None:
        loader = validation_data_source(trainer).dataloader()
    return loader


def to_module_device(trainer: Any, batch: Any) -> Any:
    """What the fit loop does to a batch: precision conversion, then transfer hooks and device."""
    batch = trainer.precision_plugin.convert_input(batch)
    return trainer.strategy.batch_to_device(batch)


def build_probe_set(
    trainer: Any,
    pl_module: nn.Module,
    probe: Any,
    size: int | None,
    batch_size: int,
    *,
    owner: str,
    batch_size_fn: Callable[[Any], int] | None = None,
) -> ProbeData:
    """The fixed probe set of a ``probe`` flag: ``"train"``, ``"val"`` or a DataLoader.

    Drawn once, without touching any RNG stream the run uses, and kept on the
    module's device. Raises :class:`ProbeError` naming ``probe`` when no data comes.
    """
    device = getattr(pl_module, "device", None)
    with preserved_rng(device), torch.inference_mode(False):
        if isinstance(probe, DataLoader):
            raw = collect_batches(probe, None, batch_size, subset=False, batch_size_fn=batch_size_fn)
            what = "the probe DataLoader"
        else:
            loader = trainer.train_dataloader if probe == "train" else _validation_loader(trainer)
            if isinstance(loader, (list, tuple)) and len(loader) >= 1:
                loader = loader[0]
            if loader is None or isinstance(loader, Mapping):
                raise ProbeError(
                    f"{owner}(probe={probe!r}) cannot take probe samples from a {type(loader).__name__}: "
                    "pass probe=DataLoader(...) instead"
                )
            raw = collect_batches(loader, size, batch_size, batch_size_fn=batch_size_fn)
            what = f"the {probe} data"
        if not raw:
            raise ProbeError(f"{owner}: {what} yielded no batches; set probe to non-empty data")
        try:
            whole = shards_parameters(trainer)  # FSDP's collectives need the same forwards on every rank
            data = ProbeData.fixed(
                raw,
                batch_size_fn=batch_size_fn,
                rank=0 if whole else getattr(trainer, "global_rank", 0),
                world_size=1 if whole else getattr(trainer, "world_size", 1),
            )
        except ProbeError as err:
            raise ProbeError(f"{owner}: {err}") from None
        return data.to(lambda batch: to_module_device(trainer, batch))


def precision_context(trainer: Any) -> contextlib.AbstractContextManager:
    """The trainer's precision context for a probe forward: its ``forward_context`` (e.g.
    true half precision, or double), except under autocast mixed precision, whose probe
    math stays in float32."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    plugin = getattr(trainer, "precision_plugin", None)
    if plugin is None or isinstance(plugin, MixedPrecision):
        return contextlib.nullcontext()
    return plugin.forward_context()


def rank_sum(trainer: Any) -> Callable[[Tensor], Tensor] | None:
    """A sum over ranks for :class:`ProbeObjective` (None in a single process)."""
    if getattr(trainer, "world_size", 1) <= 1:
        return None

    def reduce(tensor: Tensor) -> Tensor:
        return trainer.strategy.reduce(tensor, reduce_op="sum")

    return reduce


def rank_reduce(trainer: Any) -> Callable[[Tensor, str], Tensor]:
    """``reduce(tensor, op)``: ``op`` (``"sum"``, ``"min"``) of a small plain tensor over ranks,
    returned on the CPU (sent from the strategy's device: NCCL reduces only CUDA tensors)."""

    def reduce(tensor: Tensor, op: str) -> Tensor:
        device = getattr(trainer.strategy, "root_device", tensor.device)
        return trainer.strategy.reduce(tensor.to(device), reduce_op=op).cpu()

    return reduce


# --------------------------------------------------------------------------- losses


def loss_from_output(output: Any) -> Tensor:
    """The loss tensor of a ``training_step`` result: a tensor, or ``["loss"]`` of a dict."""
    if isinstance(output, Mapping) and "loss" in output:
        output = output["loss"]
    if not isinstance(output, Tensor):
        raise ProbeError(
            f"training_step returned {type(output).__name__}, not a loss tensor (or a dict with 'loss'): "
            "pass loss_fn=callable(module, batch) -> scalar tensor to the callback"
        )
    if output.numel() != 1:
        raise ProbeError(
            f"training_step returned a tensor of shape {tuple(output.shape)}, not a scalar loss: "
            "pass loss_fn=callable(module, batch) -> scalar tensor to the callback"
        )
    return output.reshape(())


class _LossModule(nn.Module):
    """Lets ``functional_call`` evaluate ``training_step`` (or ``loss_fn``) at any θ."""

    prefix = "module."

    def __init__(self, module: nn.Module, loss_fn: Callable[[nn.Module, Any], Tensor] | None) -> None:
        super().__init__()
        self.module = module
        self.loss_fn = loss_fn

    def forward(self, batch: Any, batch_idx: int) -> Tensor:
        if self.loss_fn is not None:
            return loss_from_output(self.loss_fn(self.module, batch))
        training_step: Callable[[Any, int], Any] = getattr(self.module, "training_step")  # noqa: B009
        return loss_from_output(training_step(batch, batch_idx))


class ProbeObjective:
    """``L(θ) = Σ_c w_c ℓ_c(θ)``: the loss on fixed probe chunks as a function of the
    tracked parameters only, with its gradient. An LCA evaluator that can also
    accumulate into caller-owned buffers
    (:class:`~learnscope.functional.lca.AccumulatingEvaluator`).

    Modules are set by :func:`module_modes` (``mode``): by default everything in eval
    mode but batch-statistics normalisation. Buffers are cloned for every chunk, so
    running statistics are never read from or written to the live module by a
    train-mode BatchNorm (it normalises with the chunk's own statistics), and any
    other buffer is read as it is. Every chunk's forward starts from a fixed random
    stream (:func:`seed_random_streams`), so whatever randomness is left draws the
    same numbers at every θ; :meth:`check_determinism` finds out whether any is left.
    ``reduce`` adds a tensor over ranks (see :class:`ProbeData` for the weights).
    """

    def __init__(
        self,
        module: nn.Module,
        chunks: Sequence[ProbeChunk],
        *,
        loss_fn: Callable[[nn.Module, Any], Tensor] | None = None,
        mode: str = "deterministic",
        step_context: Callable[[], contextlib.AbstractContextManager] | None = None,
        reduce: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        self.module = module
        self.chunks = chunks if isinstance(chunks, ProbeData) else ProbeData(chunks)
        self.wrapper = _LossModule(module, loss_fn)
        self.mode = mode
        self.step_context = step_context or contextlib.nullcontext
        self.reduce = reduce
        self.evaluations = 0

    def __call__(self, params: Mapping[str, Tensor], /) -> Evaluation:
        """The probe loss and its gradient at ``params`` (fresh gradient tensors)."""
        return self._evaluate(params, None, 1.0)

    def accumulate_into(self, params: Mapping[str, Tensor], out: dict[str, Tensor], alpha: float) -> float:
        """Add ``alpha·∇L(params)`` into ``out`` in place and return ``L(params)``:
        every chunk's backward adds into ``out`` directly (no second gradient buffer),
        except under DDP, where the ranks' gradients are summed first."""
        if self.reduce is not None:
            fresh = self(params)
            for name, g in fresh.gradient.items():
                out[name].add_(g, alpha=alpha)
            return fresh.loss
        return self._evaluate(params, out, alpha).loss

    def _evaluate(self, params: Mapping[str, Tensor], out: dict[str, Tensor] | None, alpha: float) -> Evaluation:
        leaves = {name: p.detach().requires_grad_(True) for name, p in params.items()}
        if out is not None:
            for name, leaf in leaves.items():
                leaf.grad = out[name]  # backward adds every chunk's gradient into it in place
        loss_sum = self._backward_chunks(leaves, alpha)
        gradient = {name: torch.zeros_like(leaf) if leaf.grad is None else leaf.grad for name, leaf in leaves.items()}
        for leaf in leaves.values():
            leaf.grad = None
        if self.reduce is not None:
            loss_sum, gradient = self._all_reduce(loss_sum, gradient)
        elif not self.chunks:
            raise ProbeError("the probe set is empty")
        self.evaluations += 1
        loss_value = float(loss_sum)
        if not torch.isfinite(loss_sum):
            raise NonFiniteProbe(f"the probe loss is {loss_value}")
        return Evaluation(loss_value, gradient)

    def _backward_chunks(self, leaves: dict[str, Tensor], alpha: float) -> Tensor:
        """Σ_c w_c ℓ_c in float64, with ``alpha·∇`` of it accumulated into the leaves' ``.grad``.

        The parameters are bound once per evaluation; buffers are re-cloned for every
        chunk. Weighting the scalar loss, not the gradients, saves a pass over the
        parameters; ``backward(inputs=)`` accumulates into the probe's own leaves (never
        the model's): the first chunk's gradient is kept as it is and later chunks are
        added in place, so no second parameter-sized gradient is alive."""
        prefix = _LossModule.prefix
        inputs = list(leaves.values())
        device = inputs[0].device if inputs else None
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        named = {prefix + name: leaf for name, leaf in leaves.items()}
        with (
            probe_context(self.module, mode=self.mode, device=device),
            reparametrized(self.wrapper, named, tie_weights=True),
        ):
            for index, chunk in enumerate(self.chunks):
                seed_random_streams(PROBE_SEED + index, device)
                loss = self._chunk_loss(chunk)
                torch.autograd.backward(loss * (alpha * chunk.weight), inputs=inputs)
                loss_sum += loss.detach().to(torch.float64) * chunk.weight
                del loss
        return loss_sum

    def _chunk_loss(self, chunk: ProbeChunk) -> Tensor:
        """``ℓ_c`` at the bound parameters, with the module's buffers cloned (read, never written)."""
        prefix = _LossModule.prefix
        buffers = {prefix + n: b.clone() for n, b in self.module.named_buffers()}
        with self.step_context(), reparametrized(self.wrapper, buffers):
            return self.wrapper(chunk.batch, chunk.batch_idx)

    def _all_reduce(self, loss: Tensor, gradient: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Sum the loss and every gradient over ranks in one collective (float64 loss kept exact)."""
        assert self.reduce is not None
        tensors = list(gradient.values())
        flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors] + [loss.reshape(1)])
        flat = self.reduce(flat)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
        return flat[-1], gradient

    def check_determinism(self, params: Mapping[str, Tensor]) -> ProbeNoise | None:
        """The self-check: the first chunk's loss at ``params`` under two different random
        streams (:func:`stochastic_forward`). None when both agree."""
        if not self.chunks:
            return None
        chunk = self.chunks[0]
        named = {_LossModule.prefix + name: p.detach() for name, p in params.items()}
        device = next(iter(named.values())).device if named else None
        with (
            probe_context(self.module, mode=self.mode, device=device),
            torch.no_grad(),
            reparametrized(self.wrapper, named, tie_weights=True),
        ):
            return stochastic_forward(self.module, lambda: self._chunk_loss(chunk), device)


class ShardedObjective:
    """``L(θ) = Σ_c w_c ℓ_c(θ)`` on FSDP2-sharded parameters (docs/fsdp.md): evaluated at a
    point of *local shards*, with the gradient's local shard.

    The point is written into the live shards and each chunk runs the module's own
    forward and backward, so FSDP all-gathers the parameters and reduce-scatters the
    gradient into ``.grad``; shards, ``.grad`` and buffers are restored bitwise after
    (:func:`learnscope.functional.sharded.written_into`). FSDP averages the ranks'
    gradients. ``replicated``: every rank holds the whole probe set (each rank's weights
    sum to 1), so the average is the gradient and the loss needs no collective. Otherwise
    (a step's micro-batches, different on each rank, weights summing to 1 over ranks) the
    local gradient is multiplied by the world size and the loss summed over ranks with
    ``reduce``. Every rank runs one forward and backward per chunk, the same number on
    every rank, so FSDP's collectives match.
    """

    def __init__(
        self, like: ProbeObjective, params: Mapping[str, Tensor], *, world_size: int, replicated: bool
    ) -> None:
        """The loss of ``like`` (its module, chunks, loss, mode, precision and ``reduce``) on the
        sharded ``params``."""
        self.module, self.params, self.chunks, self.wrapper = like.module, params, like.chunks, like.wrapper
        self.mode, self.step_context, self.reduce = like.mode, like.step_context, like.reduce
        self.scale = 1.0 if replicated else float(world_size)
        self.replicated = replicated
        self.evaluations = 0

    def __call__(self, point: Mapping[str, Tensor], /) -> Evaluation:
        """The probe loss and the local shard of its gradient at ``point`` (local shards)."""
        gradient: dict[str, Tensor] = {}

        def keep(params: Mapping[str, Tensor]) -> None:
            gradient.update({n: local_gradient(p, self.scale, owned=True) for n, p in params.items()})

        return Evaluation(self._evaluate(point, keep), gradient)

    def accumulate_into(self, point: Mapping[str, Tensor], out: dict[str, Tensor], alpha: float) -> float:
        """Add ``alpha·`` the local shard of the gradient at ``point`` into ``out`` in place and
        return the loss (``simpson`` then builds k in the start gradient's buffers, and the
        gradient FSDP reduce-scattered is dropped at once: no buffer for the midpoint's)."""

        def add(params: Mapping[str, Tensor]) -> None:
            for n, p in params.items():
                if p.grad is not None:
                    out[n].add_(local(p.grad.detach()), alpha=alpha * self.scale)

        return self._evaluate(point, add)

    def _evaluate(self, point: Mapping[str, Tensor], read: Callable[[Mapping[str, Tensor]], None]) -> float:
        """Run the chunks' forwards and backwards at ``point``, ``read(params)`` the gradients FSDP
        wrote into ``.grad`` before they are put back, and return the (checked) loss."""
        with written_into(self.params, point, self.module):
            with probe_context(self.module, mode=self.mode):
                loss_sum: Tensor | float = 0.0
                for index, chunk in enumerate(self.chunks):
                    seed_random_streams(PROBE_SEED + index)
                    with self.step_context():
                        loss = self.wrapper(chunk.batch, chunk.batch_idx)
                    (loss * chunk.weight).backward()
                    loss_sum = loss_sum + loss.detach().to(torch.float64) * chunk.weight
            read(self.params)
        loss_sum = torch.as_tensor(loss_sum, dtype=torch.float64)
        if not self.replicated and self.reduce is not None:
            loss_sum = self.reduce(loss_sum)
        self.evaluations += 1
        if not torch.isfinite(loss_sum):  # the same on every rank: every rank skips the step
            raise NonFiniteProbe(f"the probe loss is {float(loss_sum)}")
        return float(loss_sum)

    def check_determinism(self, point: Mapping[str, Tensor]) -> ProbeNoise | None:
        """The self-check of :meth:`ProbeObjective.check_determinism`, on the live sharded module."""
        if not self.chunks:
            return None
        chunk = self.chunks[0]
        with (
            written_into(self.params, point, self.module),
            probe_context(self.module, mode=self.mode),
            torch.no_grad(),
            self.step_context(),
        ):
            return stochastic_forward(self.module, lambda: self.wrapper(chunk.batch, chunk.batch_idx), None)


class ProbeLosses:
    """The probe losses one callback evaluates, all in one probe mode: ``"probe"``, its
    fixed probe set, and ``"batch"``, one optimizer step's micro-batches.

    Before the first integral, :meth:`check_once` runs the self-check: a model that
    cannot be evaluated with its modules in eval mode (a forward that returns other
    outputs when not training, say) falls back to its own modes with dropout layers off
    (``mode = "dropout_off"``), with one warning; then, if the loss is still random,
    one warning naming the module and ``stochastic = True``."""

    def __init__(
        self,
        module: nn.Module,
        *,
        fixed: ProbeData | None,
        loss_fn: Callable[[nn.Module, Any], Tensor] | None,
        step_context: Callable[[], contextlib.AbstractContextManager],
        reduce: Callable[[Tensor], Tensor] | None,
        world_size: int,
        owner: str,
        stochastic_tag: str,
    ) -> None:
        self.module, self.fixed, self.loss_fn = module, fixed, loss_fn
        self.step_context, self.reduce, self.world_size = step_context, reduce, world_size
        self.owner, self.stochastic_tag = owner, stochastic_tag
        self.mode = "deterministic"
        self.stochastic: bool | None = None  # the self-check's verdict (None: not checked yet)
        #: FSDP2: the sharded trainable parameters (then objectives are :class:`ShardedObjective`)
        self.sharded: Mapping[str, Tensor] | None = None

    def objective(self, data: str, minibatches: Sequence[tuple[Any, int]] = ()) -> ProbeObjective | ShardedObjective:
        """The loss on ``data``: ``"probe"`` (the fixed set) or ``"batch"`` (``minibatches``)."""
        if data == "batch":
            chunks = ProbeData.minibatches(minibatches, world_size=self.world_size)
        else:
            assert self.fixed is not None, "no fixed probe set was built"
            chunks = self.fixed
        objective = ProbeObjective(
            self.module,
            chunks,
            loss_fn=self.loss_fn,
            mode=self.mode,
            step_context=self.step_context,
            reduce=self.reduce,
        )
        if self.sharded is None:
            return objective
        return ShardedObjective(objective, self.sharded, world_size=self.world_size, replicated=data != "batch")

    def check_once(self, objective: ProbeObjective | ShardedObjective, params: Mapping[str, Tensor]) -> None:
        """The self-check at ``params``, the first time only (see the class docstring)."""
        if self.stochastic is not None:
            return
        try:
            noise = objective.check_determinism(params)
        except Exception as error:
            if isinstance(error, ProbeError) or objective.mode != "deterministic":
                raise
            self.mode = objective.mode = "dropout_off"
            warn(
                f"{self.owner}: the probe loss cannot be evaluated with the modules in eval mode "
                f"({type(error).__name__}: {error}); the probe passes keep every module's own mode and turn off "
                "only nn.Dropout layers. Pass loss_fn=callable(module, batch) -> scalar to evaluate it your way."
            )
            noise = objective.check_determinism(params)
        self.stochastic = noise is not None
        if noise is not None:
            warn(
                f"{self.owner}: the probe loss is not deterministic: {noise.describe()}. Every probe "
                "chunk is evaluated with the same random numbers at every θ, so the allocations still sum to the "
                "change of that one noisy loss, but it is not the model's deterministic loss "
                f"({self.stochastic_tag} = 1). Draw random numbers only when `self.training` is True in "
                "that module, or pass loss_fn=callable(module, batch) -> scalar that evaluates it without noise."
            )


def warn(message: str) -> None:
    """One warning on rank zero (Lightning's ``rank_zero_warn``, imported late: this
    module does not need Lightning otherwise)."""
    from lightning.pytorch.utilities import rank_zero_warn

    rank_zero_warn(message)


# --------------------------------------------------------------------------- self-check


def _close(a: float, b: float) -> bool:
    return a == b or abs(a - b) <= 1e-6 * max(abs(a), abs(b))


@dataclass(frozen=True)
class ProbeNoise:
    """One probe forward run twice at the same θ under two random streams: what it
    returned (``value_a``, ``value_b``: the first entry of its fingerprint, the loss for
    a scalar) and where the two forwards first part. ``module`` is a qualified module
    name (``""``: the root, i.e. the LightningModule's own code or ``loss_fn``), None
    when no module could be named."""

    value_a: float
    value_b: float
    module: str | None
    module_type: str | None

    def describe(self) -> str:
        where = "somewhere in the forward"
        if self.module == "":
            where = f"in the root module's own code ({self.module_type}: its training_step, forward or loss_fn)"
        elif self.module is not None:
            where = f"in module {self.module!r} ({self.module_type})"
        return (
            f"two evaluations at the same θ on the same chunk differ ({self.value_a:.8g} vs {self.value_b:.8g}): "
            f"the forward draws random numbers even with every module in eval mode, first {where}"
        )


def stochastic_forward(module: nn.Module, forward: Callable[[], Any], device: torch.device | None) -> ProbeNoise | None:
    """Run ``forward()`` (a probe pass of ``module``) under two different random streams
    and compare what it returns; None when both agree (to 1e-6 relative: GPU reductions
    are not always bitwise repeatable), else a :class:`ProbeNoise` naming the module
    where the two forwards first part (traced with temporary hooks). Call it inside
    :func:`preserved_rng` (e.g. :func:`probe_context`)."""
    fingerprints, traces = [], []
    for seed in (PROBE_SEED, PROBE_SEED + 1):
        seed_random_streams(seed, device)
        with traced_forward(module) as trace:
            fingerprints.append(_digest(forward()))
        traces.append(trace)
    first, second = fingerprints
    if len(first) == len(second) and all(_close(p, q) for p, q in zip(first, second)):
        return None
    culprit = first_divergence(traces[0], traces[1])
    kind = None if culprit is None else type(module.get_submodule(culprit)).__name__
    nan = float("nan")
    return ProbeNoise(first[0] if first else nan, second[0] if second else nan, culprit, kind)


def _digest(value: Any) -> tuple[float, ...]:
    """A cheap fingerprint of every floating tensor in a (nested) value."""
    out: list[float] = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, Tensor):
            if item.is_floating_point() or item.is_complex():
                out += _sums(item)
        elif isinstance(item, Mapping):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return tuple(out)


#: Elements per block of :func:`_sums` (at least; at most 64 blocks per tensor).
_DIGEST_BLOCK = 2**16


def _sums(tensor: Tensor) -> list[float]:
    """``[Σ x, Σ |x|]`` of a floating tensor in double precision (the real part of the first
    for a complex one), summed in blocks of at least :data:`_DIGEST_BLOCK` elements and at
    most 64 blocks: a double copy of the whole tensor, and of its ``|x|``, would be four times
    a float32 activation's bytes, alive beside the activations of the forward being traced
    (on a small CNN, the largest memory the LCA probe used)."""
    flat = tensor.detach().reshape(-1)  # a view of a contiguous tensor
    wide = torch.complex128 if tensor.is_complex() else torch.float64
    size = max(_DIGEST_BLOCK, -(-flat.numel() // 64))
    total = torch.zeros((), dtype=wide, device=flat.device)
    magnitude = torch.zeros((), dtype=torch.float64, device=flat.device)
    for block in flat.split(size):
        block = block.to(wide)
        total += block.sum()
        magnitude += block.abs().sum()
    return [float(total.real), float(magnitude)]


@dataclass
class _TraceEvent:
    kind: str  # "in" (a module is called) or "out" (it returned)
    module: str
    parent: str | None  # the module running when this one was called
    digest: tuple[float, ...]


@contextlib.contextmanager
def traced_forward(module: nn.Module) -> Iterator[list[_TraceEvent]]:
    """Record, for every submodule call, a fingerprint of its inputs and of its output."""
    events: list[_TraceEvent] = []
    running: list[str] = []

    def before(name: str) -> Callable:
        def hook(mod: nn.Module, args: Any, kwargs: Any) -> None:
            events.append(_TraceEvent("in", name, running[-1] if running else None, _digest((args, kwargs))))
            running.append(name)

        return hook

    def after(name: str) -> Callable:
        def hook(mod: nn.Module, args: Any, output: Any) -> None:
            if running and running[-1] == name:
                running.pop()
            events.append(_TraceEvent("out", name, running[-1] if running else None, _digest(output)))

        return hook

    handles = []
    try:
        for name, sub in module.named_modules():
            handles.append(sub.register_forward_pre_hook(before(name), with_kwargs=True))
            handles.append(sub.register_forward_hook(after(name)))
        yield events
    finally:
        for handle in handles:
            handle.remove()


def first_divergence(a: Sequence[_TraceEvent], b: Sequence[_TraceEvent]) -> str | None:
    """The module where two traced forwards of the same inputs first differ.

    A module whose output differs although its inputs agreed drew the random numbers
    itself (or a child of it did, which would have been found first: outputs are
    recorded innermost first). A module whose inputs differ although every earlier
    call agreed was handed them by its caller's own code (e.g. functional dropout
    in the parent's forward): the caller is named. Identical traces: the root.
    """
    for x, y in zip(a, b):
        same = (
            x.kind == y.kind
            and x.module == y.module
            and len(x.digest) == len(y.digest)
            and all(_close(p, q) for p, q in zip(x.digest, y.digest))
        )
        if same:
            continue
        if x.kind == "out" and x.module == y.module:
            return x.module
        return x.parent if x.parent is not None else ""
    return ""
