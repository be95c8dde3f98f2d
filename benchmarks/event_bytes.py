"""Event-file bytes per measured step of LossChangeAllocation (issue #17: plain TensorBoard stays clean).

Trains each model N steps under a TensorBoardLogger with the callback at its defaults (and a
few variants), and prints the run's event-file bytes per measured step, beside a run without
the callback (Lightning's own ``train_loss`` and ``epoch``). Runs against whichever learnscope
is on the path, so the same script measures the code before and after a change::

    PYTHONPATH=src python benchmarks/event_bytes.py                # this checkout
    PYTHONPATH=/path/to/other/src python benchmarks/event_bytes.py  # another one

Models: ``mlp26``, a 26-module ReLU MLP on digits (64 → 25 × 64 → 10, every module a
Linear: 26 reported modules), and ``gpt2``, the model-zoo GPT-2 of ``tests/zoo`` (2 layers,
width 64). ``--steps`` sets N (default 200 for the MLP, 100 for GPT-2). Every variant uses
``probe_size=--probe-size`` (default 128): what is logged does not depend on the probe set's
size, and a small one keeps the measurement quick.
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import os
import sys
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from learnscope import LossChangeAllocation

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "no callback": None,
    "defaults": {},
    "defaults + unit_allocations": {"unit_allocations": True},
    "cheap preset": {"preset": "cheap"},
    "defaults, per_step_series": {"per_step_series": True},
}


class _Classifier(pl.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def mlp26() -> tuple[pl.LightningModule, DataLoader]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    data = TensorDataset(torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y))
    torch.manual_seed(0)
    widths = [64] + [64] * 25 + [10]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(widths) - 2 else [])
    loader = DataLoader(data, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    return _Classifier(nn.Sequential(*layers)), loader


def gpt2() -> tuple[pl.LightningModule, DataLoader]:
    sys.path.insert(0, str(ROOT / "tests"))
    from zoo import gpt2 as zoo_gpt2

    return zoo_gpt2.build(stochastic=False)


MODELS = {"mlp26": (mlp26, 200), "gpt2": (gpt2, 100)}


def event_bytes(build, steps: int, flags: dict | None, probe_size: int) -> tuple[int, int]:
    """(event-file bytes, measured steps) of one run."""
    accepted = inspect.signature(LossChangeAllocation).parameters
    if flags is not None and not set(flags) <= set(accepted):
        return -1, 0
    module, loader = build()
    callbacks = [] if flags is None else [LossChangeAllocation(probe_size=probe_size, **flags)]
    with tempfile.TemporaryDirectory() as logdir:
        logger = TensorBoardLogger(logdir, name="run", version=0)
        trainer = pl.Trainer(
            max_steps=steps,
            max_epochs=-1,
            accelerator="cpu",
            logger=logger,
            callbacks=callbacks,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
        )
        trainer.fit(module, loader)
        size = sum(f.stat().st_size for f in Path(logger.log_dir).rglob("*tfevents*"))
    measured = callbacks[0].measured_steps if callbacks else steps
    return size, measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--probe-size", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    import learnscope

    print(f"learnscope from {Path(learnscope.__file__).parent}")
    print(f"{'model':8} {'variant':30} {'steps':>6} {'bytes':>11} {'bytes/step':>11}")
    for model in args.models:
        build, default_steps = MODELS[model]
        steps = args.steps or default_steps
        for variant in args.variants:
            size, measured = event_bytes(build, steps, VARIANTS[variant], args.probe_size)
            if size < 0:
                print(f"{model:8} {variant:30} {'(flag not in this version)':>30}")
                continue
            print(f"{model:8} {variant:30} {measured:6d} {size:11,d} {size / max(1, measured):11,.0f}")


if __name__ == "__main__":
    main()
