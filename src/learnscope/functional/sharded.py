"""LCA on sharded parameters (FSDP2, ``torch.distributed.fsdp.fully_shard``).

The allocation is a sum over parameters, so every rank can allocate its own local
shards and the per-module sums are added over ranks (docs/fsdp.md):

    A_module = Σ_{i ∈ module} Δ_i k_i = Σ_ranks Σ_{i ∈ local shard} Δ_i k_i

:func:`sharded_evaluator` gives :func:`learnscope.functional.allocate_step` the loss and
the *local* gradient shards at any point, by running the module's own FSDP forward and
backward (all-gather, reduce-scatter) with θ written into the shards (:func:`written_into`);
the live shards, their ``.grad`` and the module's buffers are restored bitwise afterwards.
FSDP's reduce-scatter averages the ranks' gradients, so when every rank evaluates the
same probe data the local gradient shard is that of the probe loss.

The LossChangeAllocation callback uses these through
:class:`learnscope._probe.ShardedObjective` and :class:`learnscope.estimators.ShardedSteps`
under Lightning's ``ModelParallelStrategy``.

The NeuralFeatureAnsatz needs whole weights, one layer at a time: :func:`full` gathers one
(every rank, in the same order), :func:`shard_like` cuts a whole tensor back into this
rank's shard of a ``DTensor``'s layout (W₀ restored from a checkpoint), and
:func:`any_non_finite` agrees across ranks on which tensors hold a NaN or an infinity.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from learnscope.functional.lca import Evaluation

__all__ = [
    "any_non_finite",
    "exchange_",
    "fsdp2_layout",
    "full",
    "local",
    "local_gradient",
    "local_shards",
    "local_views",
    "module_sums",
    "shard_like",
    "sharded_evaluator",
    "written_into",
]


def local(tensor: Tensor) -> Tensor:
    """This rank's shard of a ``DTensor`` (a view of its storage); any other tensor as it is."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def full(tensor: Tensor) -> Tensor:
    """The whole of a ``DTensor`` (an all-gather over its mesh: every rank must call it for the
    same tensors in the same order, or the ranks wait on each other forever); any other tensor
    as it is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def shard_like(whole: Tensor, like: Tensor) -> Tensor:
    """``whole`` (the full tensor, held by every rank) cut into ``like``'s ``DTensor`` layout:
    each rank keeps its own shard, without communication; when ``like`` is not a ``DTensor``,
    ``whole`` on ``like``'s device."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor):
        return whole.to(device=like.device)
    on_device = whole.to(device=local(like).device)
    return distribute_tensor(on_device, like.device_mesh, like.placements, src_data_rank=None)


def any_non_finite(groups: Mapping[str, Sequence[Tensor]], reduce: Callable[[Tensor, str], Tensor] | None) -> list[str]:
    """The names of ``groups`` with a tensor holding a NaN or an infinity on any rank: each rank
    checks its local shards and the flags are summed over ranks with ``reduce(flags, "sum")``
    (one small collective; None: this process only), so every rank returns the same list."""
    names = list(groups)
    flags = torch.tensor(
        [not all(bool(torch.isfinite(local(t)).all()) for t in groups[n]) for n in names], dtype=torch.float64
    )
    if reduce is not None:
        flags = reduce(flags, "sum")
    return [n for n, flag in zip(names, flags.tolist()) if flag > 0]


def local_views(params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Detached views of this rank's shard of each of ``params`` (they see every in-place update)."""
    return {n: local(p.detach()) for n, p in params.items()}


def local_shards(module: nn.Module) -> dict[str, Tensor]:
    """Detached clones of this rank's shard of every trainable parameter."""
    return {n: local(p.detach()).clone() for n, p in module.named_parameters() if p.requires_grad}


def local_gradient(param: Tensor, scale: float = 1.0, *, owned: bool = False) -> Tensor:
    """``scale ·`` this rank's shard of ``param.grad`` (zeros when there is none). A fresh tensor,
    unless ``owned``: the gradient is one nobody else holds (FSDP assigned it during a probe pass
    and the old reference is put back), so its shard is used, scaled in place, without a copy."""
    grad = param.grad
    if grad is None:
        return torch.zeros_like(local(param.detach()))
    shard = local(grad.detach())
    if not owned:
        return shard * scale
    return shard.mul_(scale) if scale != 1.0 else shard


def fsdp2_layout(params: Mapping[str, Tensor]) -> str | None:
    """None when every ``DTensor`` among ``params`` is FSDP2's layout (a 1-D mesh, ``Shard(0)``,
    the data-parallel layout this module supports), else a sentence saying which is not."""
    for name, p in params.items():
        mesh = getattr(p, "device_mesh", None)
        if mesh is None:
            continue
        placements = [type(x).__name__ + str(getattr(x, "dim", "")) for x in getattr(p, "placements", ())]
        if mesh.ndim != 1 or placements != ["Shard0"]:
            return f"{name!r} is a DTensor on a {mesh.ndim}-D mesh with placements {placements}"
    return None


#: elements exchanged at a time by :func:`written_into` (its only scratch: 1 MiB in float32)
EXCHANGE_CHUNK = 1 << 18


@contextlib.contextmanager
def written_into(params: Mapping[str, Tensor], point: Mapping[str, Tensor], module: nn.Module) -> Iterator[None]:
    """Put ``point`` (local shards) into ``params``' local shards and clear their ``.grad``;
    on exit restore the shards and the module's buffers bitwise and each ``.grad`` reference
    (FSDP2 assigns a new gradient tensor, so the saved reference is exactly the old one).

    The values are exchanged, not copied (:func:`exchange_`): inside the block ``point``'s
    tensors hold the live shards' values, and they are exchanged back on exit, so no second
    copy of the shards is made. A point entry of another dtype or layout is copied in and
    the live shard saved instead."""
    # a point that is the live shard itself (the end point θ_{t+1}) is neither copied nor saved
    moved = [n for n, p in params.items() if not _same_tensor(point[n], local(p.detach()))]
    saved = {n: local(params[n].detach()).clone() for n in moved if not _exchangeable(point[n], params[n])}
    saved_grads = {n: p.grad for n, p in params.items()}
    saved_buffers = {n: b.clone() for n, b in module.named_buffers()}  # a train-mode BatchNorm writes them
    exchanged: list[str] = []
    try:
        with torch.no_grad():
            for n in moved:
                if n in saved:
                    local(params[n].detach()).copy_(point[n])
                else:
                    exchange_(local(params[n].detach()), point[n])
                    exchanged.append(n)
            for p in params.values():
                p.grad = None
        yield
    finally:
        with torch.no_grad():
            for n in exchanged:
                exchange_(local(params[n].detach()), point[n])
            for n, value in saved.items():
                local(params[n].detach()).copy_(value)
            for n, p in params.items():
                p.grad = saved_grads[n]
            for n, b in module.named_buffers():
                b.copy_(saved_buffers[n])


def exchange_(a: Tensor, b: Tensor) -> None:
    """Exchange the values of two contiguous tensors of one shape and dtype in place, bitwise,
    :data:`EXCHANGE_CHUNK` elements at a time (one chunk of scratch memory)."""
    flat_a, flat_b = a.view(-1), b.view(-1)
    scratch = torch.empty(min(EXCHANGE_CHUNK, flat_a.numel()), dtype=a.dtype, device=a.device)
    for start in range(0, flat_a.numel(), EXCHANGE_CHUNK):
        x, y = flat_a[start : start + EXCHANGE_CHUNK], flat_b[start : start + EXCHANGE_CHUNK]
        chunk = scratch[: x.numel()]
        chunk.copy_(x)
        x.copy_(y)
        y.copy_(chunk)


def _exchangeable(value: Tensor, param: Tensor) -> bool:
    """Whether ``value`` and ``param``'s local shard can be exchanged by :func:`exchange_`."""
    shard = local(param.detach())
    return (
        value.shape == shard.shape
        and value.dtype == shard.dtype
        and value.device == shard.device
        and value.is_contiguous()
        and shard.is_contiguous()
    )


def _same_tensor(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` are the same memory (a view of one another with the same layout)."""
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype


def sharded_evaluator(
    module: nn.Module, loss_fn: Callable[[nn.Module], Tensor]
) -> Callable[[Mapping[str, Tensor]], Evaluation]:
    """An evaluator over local shards: ``evaluate({name: local shard}) -> Evaluation``.

    ``loss_fn(module)`` computes the probe loss with the module's normal forward; it
    must be the same computation on every rank. The module should be in eval mode or
    have no stochastic layers (RNG streams are forked all the same).
    """
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}

    def evaluate(point: Mapping[str, Tensor]) -> Evaluation:
        with written_into(params, point, module):
            with torch.random.fork_rng(devices=[]), torch.enable_grad():
                loss = loss_fn(module)
                loss.backward()
            gradient = {n: local_gradient(p, owned=True) for n, p in params.items()}
            value = float(loss.detach())
        return Evaluation(value, gradient)

    return evaluate


def module_sums(allocations: Mapping[str, Tensor], reduce: Callable[[Tensor], Tensor]) -> dict[str, float]:
    """Per-module sums of local allocations, added over ranks in one collective."""
    modules = sorted({name.rpartition(".")[0] or "root" for name in allocations})
    local_sums = torch.zeros(len(modules), dtype=torch.float64)
    index = {m: i for i, m in enumerate(modules)}
    for name, a in allocations.items():
        local_sums[index[name.rpartition(".")[0] or "root"]] += float(a.sum(dtype=torch.float64))
    total = reduce(local_sums)
    return {m: float(total[i]) for m, i in index.items()}
