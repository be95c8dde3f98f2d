"""LossChangeAllocation under sharded training (issue #20): memory per rank and time per step.

``python benchmarks/fsdp_bench.py [--width 1024] [--steps 8]`` launches two 2-process CPU
fits (gloo, ``GLOO_SOCKET_IFNAME=lo``) of the same MLP on synthetic data, one under DDP and
one under Lightning's ``ModelParallelStrategy`` with every Linear ``fully_shard``-ed (FSDP2),
each once without and once with ``LossChangeAllocation(rule="simpson")`` measuring every
step (probe: 256 samples, whole set on every rank under FSDP, half per rank under DDP).

Printed per strategy, from rank 0:

* **extra peak / shard**: the peak bytes of tensors alive at once during the fit with LCA
  minus the same without it (torch's allocator records, ``memory_bench.peak_bytes``), as a
  multiple of the parameter bytes this rank holds (the shard under FSDP, the whole model
  under DDP);
* **step time**: the median wall time of a training step (first two steps left out)
  without and with LCA, and their difference, the cost of one measured step.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from learnscope import LossChangeAllocation
from memory_bench import peak_of_events

INPUTS, CLASSES, SAMPLES, PROBE, BATCH = 256, 10, 4096, 256, 64


def data(n: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, INPUTS, generator=generator)
    teacher = torch.randn(INPUTS, CLASSES, generator=generator)
    return TensorDataset(x, (x @ teacher).argmax(1))


class MLP(pl.LightningModule):
    def __init__(self, width: int, shard: bool) -> None:
        super().__init__()
        sizes = [INPUTS, width, width, width, CLASSES]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(sizes)):
            layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
        self.net = nn.Sequential(*layers)
        self.shard = shard

    def configure_model(self) -> None:
        if not self.shard:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class StepTimer(pl.Callback):
    """Wall time of each training step (put it last: its batch end follows LCA's measurement)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times.append(time.perf_counter() - self._start)


def peak_bytes_outside_fsdp(fn) -> int:
    """Peak bytes of the tensors ``fn`` allocates and holds at once, from torch's CPU allocator
    records (as ``memory_bench.peak_bytes``), leaving out the buffers FSDP's own collectives
    allocate (under a ``FSDP::`` record function): FSDP2 frees its all-gather buffers by
    resizing their storage, a free the allocator records miss, so they would pile up here;
    they are the same one-layer-at-a-time buffers as in a training step."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, stack = [], [(node, False) for node in prof.profiler.kineto_results.experimental_event_tree()]
    while stack:
        node, in_fsdp = stack.pop()
        in_fsdp = in_fsdp or node.name.startswith("FSDP::")
        size = int(node.extra_fields.alloc_size) if node.tag == _EventType.Allocation else 0
        if size < 0 or (size > 0 and not in_fsdp):  # every free; allocations outside FSDP's collectives
            events.append((node.start_time_ns, size, int(node.extra_fields.ptr)))
        stack.extend((child, in_fsdp) for child in node.children)
    return peak_of_events(events)


class MeasuredLCA(LossChangeAllocation):
    """LossChangeAllocation that records, for every measured step, the bytes it holds when the
    measurement starts (θ_t copies, the reused start gradient) and the peak bytes of the tensors
    the measurement allocates and holds at once (torch's allocator records: FSDP's all-gathered
    weights and unsharded gradients of the probe passes included)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.extra: list[int] = []

    def _flush(self) -> None:
        done = [e for e in self._events if e.done]
        if not done:
            return super()._flush()
        held = sum(t.nbytes for e in done for t in e.start.values())
        held += sum(g.nbytes for e in done if e.start_evaluation for g in e.start_evaluation.gradient.values())
        self.extra.append(held + peak_bytes_outside_fsdp(super()._flush))


def two_process_trainer(strategy: str, steps: int, callbacks: list[pl.Callback]) -> pl.Trainer:
    """A 2-process CPU Trainer under DDP or, for ``strategy="fsdp"``, ModelParallelStrategy (FSDP2)."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    return pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if strategy == "fsdp" else "ddp",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )


def one_fit(strategy: str, width: int, steps: int, lca: str | None) -> dict:
    """One fit: ``lca`` None (plain), ``"timed"`` or ``"memory"`` (profiled measurements)."""
    pl.seed_everything(0, verbose=False)
    model = MLP(width, shard=strategy == "fsdp")
    timer = StepTimer()
    callbacks: list[pl.Callback] = []
    if lca is not None:
        kind = MeasuredLCA if lca == "memory" else LossChangeAllocation
        callbacks.append(kind(probe=DataLoader(data(PROBE), batch_size=128), rule="simpson", histograms=False))
    callbacks.append(timer)
    trainer = two_process_trainer(strategy, steps, callbacks)
    trainer.fit(model, DataLoader(data(SAMPLES), batch_size=BATCH))
    held = sum(p.to_local().nbytes if hasattr(p, "to_local") else p.nbytes for p in model.parameters())
    extra = getattr(callbacks[0], "extra", [0])
    return {
        "extra": statistics.median(extra[1:] or extra),  # the first measured step also builds the probe set's caches
        "param_bytes": held,
        "step": statistics.median(timer.times[2:]),
        "rank": trainer.global_rank,
    }


def worker(strategy: str, width: int, steps: int, out: str) -> None:
    runs = {name: one_fit(strategy, width, steps, lca) for name, lca in (("plain", None), ("lca", "timed"))}
    runs["memory"] = one_fit(strategy, width, 4, "memory")
    Path(out, f"{strategy}{runs['plain']['rank']}.json").write_text(json.dumps(runs))
    sys.stdout.flush()
    os._exit(0)  # torch 2.13's gloo teardown sometimes aborts after the work is done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--worker", nargs=2, metavar=("STRATEGY", "OUT"))
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], args.width, args.steps, args.worker[1])
        return
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo"}
    print(
        f"MLP {INPUTS}-{args.width}-{args.width}-{args.width}-{CLASSES}, 2 CPU processes (gloo), "
        f"batch {BATCH}/rank, probe {PROBE}, simpson, LCA every step"
    )
    print(
        f"{'strategy':10s} {'params/rank':>12s} {'extra peak':>11s} {'× shard':>8s} "
        f"{'step plain':>11s} {'step LCA':>9s} {'LCA cost':>9s}"
    )
    with tempfile.TemporaryDirectory() as out:
        for strategy in ("ddp", "fsdp"):
            command = [sys.executable, __file__, "--width", str(args.width), "--steps", str(args.steps)]
            subprocess.run([*command, "--worker", strategy, out], check=True, env=env, capture_output=True)
            r = json.loads(Path(out, f"{strategy}0.json").read_text())
            extra = r["memory"]["extra"]
            held = r["plain"]["param_bytes"]
            plain, lca = r["plain"]["step"], r["lca"]["step"]
            print(
                f"{strategy:10s} {held / 2**20:10.1f}MB {extra / 2**20:9.1f}MB {extra / held:8.2f} "
                f"{plain * 1e3:9.1f}ms {lca * 1e3:7.1f}ms {(lca - plain) * 1e3:7.1f}ms"
            )


if __name__ == "__main__":
    main()
