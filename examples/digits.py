"""learnscope's main job: an MLP on scikit-learn's 1797 handwritten digits with both
probes on, TensorBoard logs, a printed summary and the offline report.

    python examples/digits.py [--logdir runs/digits] [--epochs 12]

It prints a line per epoch while it trains, then the commands to open the results
(TensorBoard's learnscope tab, and ``LOGDIR/learnscope_report/report.md``).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

import learnscope
from cli import DigitsClassifier  # the example model (examples/cli.py), unaware of the probes
from learnscope.report.cli import main as report_main


def digits_data(n_train: int = 1400) -> tuple[TensorDataset, TensorDataset]:
    """Standardised 8×8 digits, a fixed random split into training and held-out sets."""
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-6)
    y = torch.tensor(data.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, held_out = order[:n_train], order[n_train:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[held_out], y[held_out])


def digits_loaders(batch_size: int = 64) -> tuple[DataLoader, DataLoader]:
    train, val = digits_data()
    return DataLoader(train, batch_size=batch_size, shuffle=True), DataLoader(val, batch_size=256)


class EpochProgress(pl.Callback):
    """One line per epoch: what a user waits for, without a progress bar in a log."""

    def __init__(self, lca: learnscope.LossChangeAllocation) -> None:
        self.lca = lca
        self.started = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loss = trainer.callback_metrics.get("train/loss")
        val = trainer.callback_metrics.get("val/acc")
        parts = [
            f"epoch {trainer.current_epoch + 1:2d}/{trainer.max_epochs}",
            f"step {trainer.global_step:4d}",
            f"train loss {float(loss):.3f}" if loss is not None else "",
            f"val acc {float(val):.3f}" if val is not None else "",
            f"LCA so far {sum(self.lca.cumulative.values()):+.3f}",
            f"{time.perf_counter() - self.started:5.1f} s",
        ]
        print("  ".join(p for p in parts if p), flush=True)


def executable(name: str) -> str:
    """``name`` as a user can type it: the copy beside this interpreter (a venv's bin/)
    when it exists, relative to the working directory where possible."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        return name
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", default="runs/digits")
    parser.add_argument("--epochs", type=int, default=12)
    args = parser.parse_args()

    pl.seed_everything(0, verbose=False)
    train, val = digits_loaders()
    # per_step_series: every step's per-layer LCA (the report's synchronisation test and the tab's heatmap
    # read it); by default per-layer series are summed over logging windows
    lca = learnscope.LossChangeAllocation(
        probe="train", probe_size=1024, rule="simpson", unit_allocations=True, per_step_series=True
    )
    nfa = learnscope.NeuralFeatureAnsatz(every_n_steps=50, probe_size=1024)
    logger = TensorBoardLogger(args.logdir, name="mlp")
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        logger=logger,
        callbacks=[lca, nfa, EpochProgress(lca)],
        log_every_n_steps=10,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    print(f"Training an MLP on 1797 digits for {args.epochs} epochs with LCA (every step) and NFA (every 50 steps)")
    started = time.perf_counter()
    trainer.fit(DigitsClassifier(), train, val)
    seconds = time.perf_counter() - started

    print(f"\nTrained {trainer.global_step} steps in {seconds:.1f} s with both probes on.")
    print(f"LCA cumulative relative error: {lca.cumulative_relative_error:.3%} (Simpson, 1024 probe samples)")
    print("Cumulative LCA per layer (negative = helped):")
    for module, value in sorted(lca.cumulative.items()):
        print(f"  {module:8s} {value:+.4f}")
    print()
    # the report covers every run under LOGDIR and lands where `learnscope report LOGDIR` writes it
    report_main(["report", args.logdir, "--no-progress"])
    logdir = shlex.quote(args.logdir)
    print("\nNext:")
    print(f"  {executable('tensorboard')} --logdir {logdir}    # then open http://localhost:6006/#learnscope")
    print(f"  {executable('learnscope')} report {logdir}         # rewrites {Path(args.logdir) / 'learnscope_report'}")


if __name__ == "__main__":
    main()
