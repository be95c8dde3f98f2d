"""LossChangeAllocation's overhead on the model zoo (issue 15): for each zoo model of
tests/zoo/, the median time per training step of plain training, with the cheap preset
and with Simpson (the default probe: 1024 training samples, or all of a smaller set),
and their ratios to plain training. Also, per model, Simpson's error with the stochastic
layers on and off, and the layers NeuralFeatureAnsatz measures against the zoo's list.

    python benchmarks/zoo_bench.py                  # every model, 5 repeats
    python benchmarks/zoo_bench.py --quick          # 2 repeats
    python benchmarks/zoo_bench.py --models gpt2,vit --no-accuracy

Method (as benchmarks/run.py): every case is measured side by side in this one process,
in interleaved repeats (the order rotates from repeat to repeat; timing.interleaved); each
run trains a freshly seeded model in a real Trainer with a TensorBoardLogger and a
StepClock gives its mean time per step after a warm-up; the table shows medians over
repeats and ratios of those medians.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))  # the zoo and tests/models.py

import lightning.pytorch as pl
import torch

import zoo
from learnscope import LossChangeAllocation, NeuralFeatureAnsatz
from run import machine_note, quiet
from timing import interleaved, median, spread
from workloads import LOG_EVERY_N_STEPS, StepClock, scratch_dir

CASES: dict[str, Callable[[], list[pl.Callback]]] = {
    "plain": list,
    "cheap": lambda: [LossChangeAllocation(preset="cheap")],
    "simpson": lambda: [LossChangeAllocation()],
}
#: The cheap preset on a short run (no compile), with and without the decomposition (issue 19, target 1).
CHEAP_CASES: dict[str, Callable[[], list[pl.Callback]]] = {
    "plain": list,
    "cheap": lambda: [LossChangeAllocation(preset="cheap", compile_statistics=False)],
    "cheap+decompose": lambda: [LossChangeAllocation(preset="cheap", decompose=True, compile_statistics=False)],
}
ACCURACY_STEPS = 10  # as tests/test_zoo.py
ACCURACY_PROBE_SIZE = 64


def _trainer(callbacks: list[pl.Callback], steps: int, logger: Any) -> pl.Trainer:
    return pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=logger,
        log_every_n_steps=LOG_EVERY_N_STEPS,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )


def time_per_step(
    name: str, case: str, steps: int, warmup: int, cases: dict[str, Callable[[], list[pl.Callback]]] = CASES
) -> float:
    """Seconds per step after ``warmup`` steps of zoo model ``name`` with ``cases[case]``'s callbacks."""
    from lightning.pytorch.loggers import TensorBoardLogger

    module, loader = zoo.load(name).build()
    clock = StepClock(warmup)
    logdir = scratch_dir()
    try:
        trainer = _trainer([*cases[case](), clock], steps, TensorBoardLogger(logdir, name="", version=""))
        trainer.fit(module, loader)
    finally:
        shutil.rmtree(logdir, ignore_errors=True)
    return clock.per_step()


def timing_section(
    names: list[str], repeats: int, steps: int, warmup: int, progress: Callable[[str], None]
) -> list[str]:
    lines = [
        "P / B: Simpson's probe samples / training batch size (Simpson: 2 gradients over P per step)",
        (
            f"Time per training step ({steps} steps, the first {warmup} not timed; "
            f"medians of {repeats} interleaved repeats)"
        ),
        (
            f"  {'model':18s} {'params':>8s} {'P / B':>9s} {'plain ms':>9s} {'cheap ms':>9s} {'simpson ms':>11s} "
            f"{'cheap ÷ plain':>14s} {'simpson ÷ plain':>16s}   noise (plain/cheap/simpson)"
        ),
    ]
    for name in names:
        progress(f"timing {name}")
        cases = {case: (lambda name=name, case=case: time_per_step(name, case, steps, warmup)) for case in CASES}
        samples = interleaved(cases, repeats)
        per_step = {case: median(values) for case, values in samples.items()}
        module, loader = zoo.load(name).build()
        params = sum(p.numel() for p in module.parameters())
        probe = min(LossChangeAllocation.DEFAULTS["probe_size"], len(loader.dataset))
        noise = "/".join(f"±{spread(samples[case]) * 100:.0f}%" for case in CASES)
        lines.append(
            f"  {name:18s} {params:8,d} {f'{probe} / {loader.batch_size}':>9s} "
            f"{per_step['plain'] * 1e3:9.1f} {per_step['cheap'] * 1e3:9.1f} "
            f"{per_step['simpson'] * 1e3:11.1f} {per_step['cheap'] / per_step['plain']:14.2f} "
            f"{per_step['simpson'] / per_step['plain']:16.2f}   {noise}"
        )
    return lines


def cheap_ratios(
    names: list[str],
    repeats: int = 3,
    steps: int = 18,
    warmup: int = 3,
    progress: Callable[[str], None] | None = None,
) -> dict[str, dict[str, float]]:
    """Per zoo model: the cheap preset's time per step ÷ plain training's on a short run without
    compile (``"cheap"``), and with ``decompose=True`` (``"cheap+decompose"``); ``"plain"``: the
    plain step in seconds. Medians of ``repeats`` interleaved repeats, side by side in this process."""
    out = {}
    for name in names:
        if progress is not None:
            progress(f"zoo cheap ratios {name}")
        time_per_step(name, "plain", warmup + 2, warmup)  # first-fit costs of this model, not measured
        cases = {
            case: (lambda name=name, case=case: time_per_step(name, case, steps, warmup, CHEAP_CASES))
            for case in CHEAP_CASES
        }
        per_step = {case: median(values) for case, values in interleaved(cases, repeats).items()}
        out[name] = {
            "plain": per_step["plain"],
            "cheap": per_step["cheap"] / per_step["plain"],
            "cheap+decompose": per_step["cheap+decompose"] / per_step["plain"],
        }
    return out


def cheap_section(ratios: dict[str, dict[str, float]], repeats: int, steps: int) -> list[str]:
    """The table of :func:`cheap_ratios`."""
    lines = [
        f"Cheap preset, short run without compile ({steps} steps; medians of {repeats} interleaved repeats)",
        f"  {'model':18s} {'plain ms':>9s} {'cheap ÷ plain':>14s} {'+ decompose ÷ plain':>20s}",
    ]
    for name, r in ratios.items():
        lines.append(f"  {name:18s} {r['plain'] * 1e3:9.1f} {r['cheap']:14.3f} {r['cheap+decompose']:20.3f}")
    return lines


def _per_step_relative_errors(series: dict[str, dict[int, float]]) -> list[float]:
    delta, total = series["lca/delta_loss"], series["lca/total"]
    return [abs(total[s] - delta[s]) / abs(delta[s]) for s in sorted(delta)]


def simpson_errors(name: str, stochastic: bool, eval_loss: bool = False) -> tuple[float, float]:
    """(cumulative relative error, median per-step relative error) of Simpson over the
    tests' run (``ACCURACY_STEPS`` steps, probe_size ``ACCURACY_PROBE_SIZE``); ``eval_loss``:
    the probe loss with every module but BatchNorm in eval mode (zoo.common.eval_mode_probe_loss)."""
    from models import MemoryLogger
    from zoo.common import eval_mode_probe_loss

    module, loader = zoo.load(name).build(stochastic)
    callback = LossChangeAllocation(
        probe="train",
        probe_size=ACCURACY_PROBE_SIZE,
        rule="simpson",
        loss_fn=eval_mode_probe_loss if eval_loss else None,
    )
    logger = MemoryLogger()
    torch.manual_seed(0)
    _trainer([callback], ACCURACY_STEPS, logger).fit(module, loader)
    return callback.cumulative_relative_error, statistics.median(_per_step_relative_errors(logger.series))


def nfa_layers(name: str) -> tuple[list[str], list[str]]:
    """(measured, expected but not measured) layer names of NeuralFeatureAnsatz."""
    zoo_model = zoo.load(name)
    module, loader = zoo_model.build()
    callback = NeuralFeatureAnsatz(every_n_steps=1, probe_size=32, null_draws=0, images=False, **zoo_model.NFA_OPTIONS)
    _trainer([callback], 1, False).fit(module, loader)
    measured = list(callback.last_record.grams)
    return measured, [layer for layer in zoo_model.NFA_LAYERS if layer not in measured]


def accuracy_section(names: list[str], progress: Callable[[str], None]) -> list[str]:
    lines = [
        (
            f"Simpson's error ({ACCURACY_STEPS} steps, probe_size {ACCURACY_PROBE_SIZE}; as tests/test_zoo.py) and "
            "NFA layers measured"
        ),
        "  cumulative relative error / median per-step relative error, with the stochastic layers on (the library's probe),",
        "  with them on in training but a probe loss in eval mode but BatchNorm (an independent loss_fn written in the test),",
        "  and with every dropout / drop-path rate 0",
        (
            f"  {'model':18s} {'stochastic on':>19s} | {'eval-mode probe':>19s} | {'rates 0':>19s} | "
            "NFA measured / expected; not measured"
        ),
    ]
    for name in names:
        progress(f"accuracy {name}")
        on = simpson_errors(name, True)
        eval_loss = simpson_errors(name, True, eval_loss=True)
        off = simpson_errors(name, False) if name != "resnet" else (math.nan, math.nan)  # it has none
        measured, missing = nfa_layers(name)
        expected = len(zoo.load(name).NFA_LAYERS)
        kinds = dict.fromkeys(".".join(layer.split(".")[-2:]) for layer in missing)  # e.g. attn.c_attn
        short = f"{len(missing)}: " + ", ".join(kinds) if missing else ""
        lines.append(
            f"  {name:18s} {on[0]:9.2e} {on[1]:9.2e} | {eval_loss[0]:9.2e} {eval_loss[1]:9.2e} | "
            f"{off[0]:9.2e} {off[1]:9.2e} | "
            f"{len(measured):2d} / {expected:2d}; {short or '-'}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 repeats of 10 steps")
    parser.add_argument("--models", default=",".join(zoo.MODELS), help=f"comma-separated, of {','.join(zoo.MODELS)}")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (default 1: this machine's 2 cores are shared)"
    )
    parser.add_argument("--no-accuracy", action="store_true", help="only the timing table")
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.models.split(",") if name.strip()]
    for name in names:
        zoo.load(name)  # fails at once, naming the allowed models
    quiet()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    def progress(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {message}", file=sys.stderr, flush=True)

    repeats, steps, warmup = (2, 10, 3) if args.quick else (5, 18, 3)
    mode = "quick" if args.quick else "default"
    lines = [f"learnscope on the model zoo (issue 15), {mode} mode", machine_note(args.threads, mode), ""]
    lines += timing_section(names, repeats, steps, warmup, progress)
    lines += [""] + cheap_section(cheap_ratios(names, repeats, steps, warmup, progress), repeats, steps)
    if not args.no_accuracy:
        lines += [""] + accuracy_section(names, progress)
    lines.append(f"total time {time.perf_counter() - started:.0f} s")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
