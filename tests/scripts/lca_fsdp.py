"""Run by tests/test_lca_reliability.py under torch.distributed.run (2 processes, gloo):
LCA of FSDP2 (fully_shard) steps on local shards equals the unsharded value.

Writes OUT/rank{r}.json: per step, the sharded per-module sums and ΔL, and (rank 0)
the unsharded single-process values at the same parameters; plus whether the
evaluations left the shards and their .grad bitwise as they were.
"""

import copy
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from learnscope.functional import allocate_step, gradient_evaluator
from learnscope.functional.sharded import local_shards, module_sums, sharded_evaluator
from models import digits, mlp


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    net = mlp()
    reference = copy.deepcopy(net)  # unsharded twin for the single-process value
    mesh = init_device_mesh("cpu", (world,))
    for layer in net:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(net, mesh=mesh)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    x, y = digits()
    probe_x, probe_y = x[:512], y[:512]
    train_x, train_y = x[512:].chunk(world)[rank], y[512:].chunk(world)[rank]

    def probe_loss(module):
        return nn.functional.cross_entropy(module(probe_x), probe_y)

    evaluate = sharded_evaluator(net, probe_loss)
    results, untouched = [], True
    for step in range(4):
        batch = slice(64 * step, 64 * (step + 1))
        optimizer.zero_grad()
        nn.functional.cross_entropy(net(train_x[batch]), train_y[batch]).backward()
        start = local_shards(net)
        optimizer.step()
        end = local_shards(net)
        grads_before = {n: p.grad for n, p in net.named_parameters()}
        allocation = allocate_step(evaluate, start, end, rule="simpson")
        untouched &= all(torch.equal(local_shards(net)[n], end[n]) for n in end)
        untouched &= all(p.grad is grads_before[n] for n, p in net.named_parameters())
        sums = module_sums(allocation.allocations, lambda t: _all_reduce(t))
        record = {"step": step, "modules": sums, "delta_loss": allocation.delta_loss}
        full_start = {n: p.full_tensor() if hasattr(p, "full_tensor") else p for n, p in _full(net, start).items()}
        full_end = {n: p.full_tensor() if hasattr(p, "full_tensor") else p for n, p in _full(net, end).items()}
        if rank == 0:
            single = allocate_step(
                gradient_evaluator(
                    lambda p: nn.functional.cross_entropy(torch.func.functional_call(reference, p, (probe_x,)), probe_y)
                ),
                full_start,
                full_end,
                rule="simpson",
            )
            record["unsharded"] = {
                m: sum(
                    float(a.sum(dtype=torch.float64))
                    for n, a in single.allocations.items()
                    if n.rpartition(".")[0] == m
                )
                for m in sums
            }
            record["unsharded_delta_loss"] = single.delta_loss
        results.append(record)
    Path(out, f"rank{rank}.json").write_text(json.dumps({"results": results, "untouched": untouched}))
    dist.barrier()  # both ranks have written their results
    # torch 2.13's gloo/FSDP teardown aborted rank 1 ("terminate called without an active exception")
    # after all the work was done, in about 1 run in 10, with or without destroy_process_group and a
    # barrier: leave without running the C++ destructors.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _all_reduce(tensor):
    dist.all_reduce(tensor)
    return tensor


def _full(net, local):
    """DTensors with this rank's local values, to gather the full parameters."""
    from torch.distributed.tensor import DTensor

    full = {}
    for name, p in net.named_parameters():
        full[name] = DTensor.from_local(local[name], p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
    return full


if __name__ == "__main__":
    main(sys.argv[1])
