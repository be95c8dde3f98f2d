"""NeuralFeatureAnsatz under sharded training (issue #20): time per measured step, DDP vs FSDP2.

``python benchmarks/nfa_fsdp_bench.py [--width 1024] [--steps 8] [--null-draws auto]`` runs
fsdp_bench's MLP and synthetic data in 2 CPU processes (gloo, ``GLOO_SOCKET_IFNAME=lo``),
under DDP and under ``ModelParallelStrategy`` with every Linear ``fully_shard``-ed, each once
without and once with ``NeuralFeatureAnsatz`` measuring every step (probe: 256 samples; under
DDP each rank takes half and G is summed, under FSDP every rank takes all of it). Printed from
rank 0: the median step time (first two steps left out) without and with NFA, and the difference.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import lightning.pytorch as pl
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fsdp_bench import BATCH, MLP, PROBE, SAMPLES, StepTimer, data, two_process_trainer
from learnscope import NeuralFeatureAnsatz


def one_fit(strategy: str, width: int, steps: int, null_draws: int | str | None) -> tuple[float, int]:
    """Median step time of one fit, with NFA on every step unless ``null_draws`` is None; and the rank."""
    pl.seed_everything(0, verbose=False)
    timer = StepTimer()
    callbacks: list[pl.Callback] = []
    if null_draws is not None:
        probe = DataLoader(data(PROBE), batch_size=128)
        callbacks.append(NeuralFeatureAnsatz(every_n_steps=1, probe=probe, images=False, null_draws=null_draws))
    trainer = two_process_trainer(strategy, steps, [*callbacks, timer])
    trainer.fit(MLP(width, shard=strategy == "fsdp"), DataLoader(data(SAMPLES), batch_size=BATCH))
    return statistics.median(timer.times[2:]), trainer.global_rank


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--null-draws", default="auto", help="NFA's null_draws: 'auto' or an int")
    parser.add_argument("--worker", nargs=2, metavar=("STRATEGY", "OUT"))
    args = parser.parse_args()
    draws = args.null_draws if args.null_draws == "auto" else int(args.null_draws)
    if args.worker:
        strategy, out = args.worker
        plain, rank = one_fit(strategy, args.width, args.steps, None)
        measured, _ = one_fit(strategy, args.width, args.steps, draws)
        Path(out, f"{strategy}{rank}.json").write_text(json.dumps([plain, measured]))
        sys.stdout.flush()
        os._exit(0)  # torch 2.13's gloo teardown sometimes aborts after the work is done
    print(f"MLP 256-{args.width}-{args.width}-{args.width}-10, 2 CPU processes, probe {PROBE}, null_draws={draws}")
    print(f"{'strategy':10s} {'step plain':>11s} {'step NFA':>10s} {'NFA cost':>10s}")
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo"}
    with tempfile.TemporaryDirectory() as out:
        for strategy in ("ddp", "fsdp"):
            command = [sys.executable, __file__, "--width", str(args.width), "--steps", str(args.steps)]
            command += ["--null-draws", str(args.null_draws), "--worker", strategy, out]
            subprocess.run(command, check=True, env=env, capture_output=True)
            plain, measured = json.loads(Path(out, f"{strategy}0.json").read_text())
            print(f"{strategy:10s} {plain * 1e3:9.1f}ms {measured * 1e3:8.1f}ms {(measured - plain) * 1e3:8.1f}ms")


if __name__ == "__main__":
    main()
