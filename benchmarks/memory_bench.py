"""Peak memory (issue #7, target 4), from torch's own allocator records.

``peak_bytes(fn)`` runs ``fn`` under ``torch.profiler`` with ``profile_memory=True``
and returns the largest number of tensor bytes that were allocated during the run
and alive at the same time (the CPU allocator reports its running total with every
allocation and free). Tensors that existed before the call are not counted, so a
whole ``Trainer.fit`` is profiled and the peak with a callback is compared with
the peak of the same fit without it.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from timing import TimedLCA
from workloads import Workload, fit, scratch_dir

CHUNK = 256


def peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak bytes of tensors allocated by ``fn`` and alive at once (CPU allocator events).

    The running total is rebuilt from the allocation events themselves, matching
    each free to its allocation by address: the allocator's own ``total_allocated``
    is a process-wide counter that frees of older blocks do not reach.
    """
    from torch._C._profiler import _EventType

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            fields = node.extra_fields
            events.append((node.start_time_ns, int(fields.alloc_size), int(fields.ptr)))
        stack.extend(node.children)
    return peak_of_events(events)


def peak_of_events(events: list[tuple[int, int, int]]) -> int:
    """The peak of live bytes over ``(time, size, address)`` allocator events (size < 0: a
    free), each free matched to its allocation by address (frees of blocks allocated
    before the events began are ignored)."""
    live: dict[int, int] = {}
    total = peak = 0
    for _, size, ptr in sorted(events):
        if size > 0:
            live[ptr] = size
            total += size
            peak = max(peak, total)
        elif ptr in live:
            total -= live.pop(ptr)
    return peak


@dataclass
class MemoryResult:
    name: str
    measured: int  # peak extra bytes
    bound: int
    parts: dict[str, int]


def _fit_peak(workload: Workload, callbacks: list[Any], steps: int) -> int:
    logdir = scratch_dir()
    try:
        return peak_bytes(lambda: fit(workload, callbacks, steps, logdir=logdir))
    finally:
        shutil.rmtree(logdir, ignore_errors=True)


def chunk_peak(workload: Workload) -> tuple[int, int]:
    """(peak bytes of one probe chunk's loss + autograd.grad on the bare network,
    parameter bytes): the chunk's activations are the difference."""
    net = workload.net()
    params = list(net.parameters())
    x, y = workload.data()
    x, y = x[:CHUNK], y[:CHUNK]

    def step() -> None:
        loss = nn.functional.cross_entropy(net(x), y)
        torch.autograd.grad(loss, params)

    step()
    return peak_bytes(step), sum(p.numel() * p.element_size() for p in params)


def lca_memory(workload: Workload, probe_size: int, steps: int = 4) -> list[MemoryResult]:
    """Peak extra bytes of LCA configurations. The bound is the issue's: 3 × the
    parameter bytes plus one probe chunk's activations (its forward+backward peak
    less the gradient it returns), plus, with ``parameter_counts=True``, the two int32
    counters per (float32) parameter. The probe set's own storage (P samples, kept on
    the module's device) is reported apart in ``parts`` and is not in the bound."""
    chunk, param_bytes = chunk_peak(workload)
    activations = chunk - param_bytes
    bound = 3 * param_bytes + activations
    x, y = workload.data(probe_size)
    probe_set = x.numel() * x.element_size() + y.numel() * y.element_size()
    plain = _fit_peak(workload, [], steps)
    results = []
    for name, flags in (
        ("LCA simpson", {"rule": "simpson", "decompose": False}),
        ("LCA simpson+decompose", {"rule": "simpson", "decompose": True}),
        ("LCA cheap", {"probe": "batch", "rule": "first_order", "decompose": False}),
        ("LCA simpson+counts", {"rule": "simpson", "decompose": False, "parameter_counts": True}),
    ):
        callback = TimedLCA(probe_size=probe_size, probe_batch_size=CHUNK, **flags)
        peak = _fit_peak(workload, [callback], steps)
        # parameter_counts=True keeps two int32 counters per (float32) parameter: counted in the bound
        counters = 2 * param_bytes if flags.get("parameter_counts") else 0
        results.append(
            MemoryResult(
                name,
                peak - plain,
                bound + counters,
                {
                    "param_bytes": param_bytes,
                    "chunk_activations": activations,
                    "chunk_peak": chunk,
                    "probe_set": 0 if flags.get("probe") == "batch" else probe_set,
                    "plain_fit_peak": plain,
                    "fit_peak": peak,
                    "counters": counters,
                },
            )
        )
    return results


def nfa_memory(workload: Workload, samples: int) -> MemoryResult:
    from nfa_bench import NFAProblem

    problem = NFAProblem(workload, samples)
    gram_bytes = 0
    for index in problem.layers:
        k = problem.net[index].weight.shape[0]
        gram_bytes += k * k * 8
    problem.chunks = problem.chunks[:1]
    problem.reference()
    one_chunk = peak_bytes(problem.reference)
    problem = NFAProblem(workload, samples)
    problem.learnscope()
    measured = peak_bytes(problem.learnscope)
    return MemoryResult(
        "NFA exact (functional)",
        measured,
        gram_bytes + one_chunk,
        {"gram_bytes": gram_bytes, "reference_chunk_peak": one_chunk},
    )
