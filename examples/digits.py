"""learnscope's main job: an MLP on scikit-learn's 1797 handwritten digits with both
probes on, TensorBoard logs, a printed summary and the offline report.

    python examples/digits.py [--logdir runs/digits] [--epochs 12]

Then: ``tensorboard --logdir runs/digits`` and open the report's ``report.md``.
"""

from __future__ import annotations

import argparse
import time

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

import learnscope
from cli import DigitsClassifier  # the example model (examples/cli.py), unaware of the probes
from learnscope.report.cli import main as report_main


def digits_loaders(batch_size: int = 64) -> tuple[DataLoader, DataLoader]:
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-6)
    y = torch.tensor(data.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, val = order[:1400], order[1400:]
    return (
        DataLoader(TensorDataset(x[train], y[train]), batch_size=batch_size, shuffle=True),
        DataLoader(TensorDataset(x[val], y[val]), batch_size=256),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", default="runs/digits")
    parser.add_argument("--epochs", type=int, default=12)
    args = parser.parse_args()

    pl.seed_everything(0, verbose=False)
    train, val = digits_loaders()
    lca = learnscope.LossChangeAllocation(probe="train", probe_size=1024, rule="simpson", unit_allocations=True)
    nfa = learnscope.NeuralFeatureAnsatz(every_n_steps=50, probe_size=1024)
    logger = TensorBoardLogger(args.logdir, name="mlp")
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        logger=logger,
        callbacks=[lca, nfa],
        log_every_n_steps=10,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    started = time.perf_counter()
    trainer.fit(DigitsClassifier(), train, val)
    seconds = time.perf_counter() - started

    print(f"\nTrained {trainer.global_step} steps in {seconds:.1f} s with both probes on.")
    print(f"LCA cumulative relative error: {lca.cumulative_relative_error:.3%} (Simpson, 1024 probe samples)")
    print("Cumulative LCA per layer (negative = helped):")
    for module, value in sorted(lca.cumulative.items()):
        print(f"  {module:8s} {value:+.4f}")
    print()
    report_main(["report", logger.log_dir, "--out", f"{logger.log_dir}/report", "--no-progress"])
    print(f"\nTensorBoard: tensorboard --logdir {args.logdir}   (custom scalars: 'learnscope' charts)")


if __name__ == "__main__":
    main()
