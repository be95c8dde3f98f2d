"""LCA on sharded parameters (FSDP2, ``torch.distributed.fsdp.fully_shard``).

The allocation is a sum over parameters, so every rank can allocate its own local
shards and the per-module sums are added over ranks (docs/fsdp.md):

    A_module = Σ_{i ∈ module} Δ_i k_i = Σ_ranks Σ_{i ∈ local shard} Δ_i k_i

:func:`sharded_evaluator` gives :func:`learnscope.functional.allocate_step` the loss and
the *local* gradient shards at any point, by running the module's own FSDP forward and
backward (all-gather, reduce-scatter) with θ written into the shards; the live shards
and their ``.grad`` are restored bitwise afterwards. Every rank must evaluate the same
probe data (FSDP's collectives must match), so the reduce-scattered gradient, FSDP's
mean over ranks, is the gradient of the probe loss.

The LossChangeAllocation callback does not use this yet (see docs/fsdp.md): it is
the functional building block, usable in a hand-written FSDP2 loop.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from learnscope.functional.lca import Evaluation

__all__ = ["local_shards", "module_sums", "sharded_evaluator"]


def _local(tensor: Tensor) -> Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def local_shards(module: nn.Module) -> dict[str, Tensor]:
    """Detached clones of this rank's shard of every trainable parameter."""
    return {n: _local(p.detach()).clone() for n, p in module.named_parameters() if p.requires_grad}


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
        saved_values = {n: _local(p.detach()).clone() for n, p in params.items()}
        saved_grads = {n: p.grad for n, p in params.items()}
        try:
            with torch.no_grad():
                for n, p in params.items():
                    _local(p.detach()).copy_(point[n])
                    p.grad = None
            with torch.random.fork_rng(devices=[]), torch.enable_grad():
                loss = loss_fn(module)
                loss.backward()
            gradient = {
                n: torch.zeros_like(point[n]) if p.grad is None else _local(p.grad).detach().clone()
                for n, p in params.items()
            }
            value = float(loss.detach())
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    _local(p.detach()).copy_(saved_values[n])
                    p.grad = saved_grads[n]
        return Evaluation(value, gradient)

    return evaluate


def module_sums(allocations: Mapping[str, Tensor], reduce: Callable[[Tensor], Tensor]) -> dict[str, float]:
    """Per-module sums of local allocations, added over ranks in one collective."""
    modules = sorted({name.rpartition(".")[0] or "root" for name in allocations})
    local = torch.zeros(len(modules), dtype=torch.float64)
    index = {m: i for i, m in enumerate(modules)}
    for name, a in allocations.items():
        local[index[name.rpartition(".")[0] or "root"]] += float(a.sum(dtype=torch.float64))
    total = reduce(local)
    return {m: float(total[i]) for m, i in index.items()}
