"""Reproduce the Neural Feature Ansatz on real data with the NeuralFeatureAnsatz callback.

The setting of BRIEF §3.5: a bias-free ReLU MLP 64→256→256→256→10 on scikit-learn's
bundled digits (1400 training images, standardised pixels), every weight scaled
by 0.1 at initialisation (the "rich", feature-learning regime), plain SGD on the
mean squared error to one-hot targets. The NFA predicts that each hidden layer's
WᵀW lines up with its AGOP; the callback measures it at initialisation, during
training and at the end. The script prints a per-layer table at both ends.

Read ``excess_a1`` (correlation minus a rotation null) beside ``pearson_a1``:
small init drives the weights to a low stable rank, and then almost any G gives a
high α = 1 correlation. The readout layer (net.6) has G = I, so its α = 1 metrics
are not reported at all.

    python examples/nfa_reproduction.py                 # 200 epochs, lr 2, batch 128
    python examples/nfa_reproduction.py --epochs 50 --logdir runs   # + TensorBoard

Needs only the package and scikit-learn; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import math
import time
from collections import defaultdict
from itertools import pairwise
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from learnscope.callbacks.nfa import NeuralFeatureAnsatz

WIDTHS = (64, 256, 256, 256, 10)
TABLE_METRICS = ("pearson_a1", "null_a1", "excess_a1", "pearson_a0.5", "excess_a0.5", "stable_rank", "weight_change")


def digits_data(n_train: int = 1400) -> tuple[TensorDataset, TensorDataset]:
    """Standardised digits (statistics of the training images), one-hot targets; train / held-out."""
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = nn.functional.one_hot(torch.tensor(data.target), 10).to(torch.float32)
    mean, std = x[:n_train].mean(0), x[:n_train].std(0).clamp_min(1e-6)
    x = (x - mean) / std
    return TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[n_train:], y[n_train:])


def mlp(widths: tuple[int, ...] = WIDTHS, init_scale: float = 0.1) -> nn.Sequential:
    """Bias-free ReLU MLP, PyTorch's default init multiplied by ``init_scale``."""
    layers: list[nn.Module] = []
    for index, (fan_in, fan_out) in enumerate(pairwise(widths)):
        linear = nn.Linear(fan_in, fan_out, bias=False)
        with torch.no_grad():
            linear.weight.mul_(init_scale)
        layers.append(linear)
        if index < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class MSERegressor(pl.LightningModule):
    """``net`` trained with plain SGD on the squared error to one-hot targets."""

    def __init__(self, net: nn.Module, lr: float) -> None:
        super().__init__()
        self.net = net
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_accuracy", (self(x).argmax(1) == y.argmax(1)).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class History(Logger):
    """Keeps every logged scalar in memory: ``history.series[tag][step] = value``."""

    def __init__(self) -> None:
        super().__init__()
        self.series: dict[str, dict[int, float]] = defaultdict(dict)

    @property
    def name(self) -> str:
        return "history"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for tag, value in metrics.items():
            self.series[tag][-1 if step is None else int(step)] = float(value)


def reproduce(
    epochs: int = 200,
    lr: float = 2.0,
    batch_size: int = 128,
    init_scale: float = 0.1,
    every_n_steps: int = 100,
    seed: int = 0,
    logdir: str | None = None,
) -> tuple[History, NeuralFeatureAnsatz, MSERegressor]:
    """Train once with the callback; returns the scalars, the callback and the model."""
    pl.seed_everything(seed, verbose=False)
    train, held_out = digits_data()
    model = MSERegressor(mlp(init_scale=init_scale), lr=lr)
    history = History()
    loggers: list[Logger] = [history]
    if logdir is not None:
        loggers.append(TensorBoardLogger(logdir, name="nfa_reproduction"))
    callback = NeuralFeatureAnsatz(every_n_steps=every_n_steps, probe="train", probe_size=1024)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=loggers,
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        check_val_every_n_epoch=max(1, epochs),
        num_sanity_val_steps=0,
        log_every_n_steps=every_n_steps,
    )
    trainer.fit(
        model,
        DataLoader(train, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed)),
        DataLoader(held_out, batch_size=512),
    )
    return history, callback, model


def layer_table(history: History, step: int, layers: list[str]) -> str:
    """One row per layer of the metrics at ``step`` (blank where not logged)."""
    header = f"{'layer':8s}" + "".join(f"{metric:>15s}" for metric in TABLE_METRICS)
    rows = [header]
    for layer in layers:
        cells = []
        for metric in TABLE_METRICS:
            value = history.series.get(f"nfa/{layer}/{metric}", {}).get(step, math.nan)
            cells.append(f"{'—':>15s}" if math.isnan(value) else f"{value:15.3f}")
        rows.append(f"{layer:8s}" + "".join(cells))
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--lr", type=float, default=2.0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--init-scale", type=float, default=0.1)
    parser.add_argument("--every-n-steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--logdir", default=None, help="also write TensorBoard event files here")
    args = parser.parse_args()

    start = time.perf_counter()
    history, callback, _ = reproduce(
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        init_scale=args.init_scale,
        every_n_steps=args.every_n_steps,
        seed=args.seed,
        logdir=args.logdir,
    )
    seconds = time.perf_counter() - start
    steps = sorted(history.series["nfa/skipped"])
    layers = list(callback.initial_weights)
    print(
        f"\nNFA on digits, bias-free ReLU MLP {'→'.join(map(str, WIDTHS))}, init ×{args.init_scale}, "
        f"SGD lr {args.lr}, batch {args.batch_size}, {args.epochs} epochs, MSE (readout: {callback.readout})"
    )
    for label, step in (("initialisation", steps[0]), ("end of training", steps[-1])):
        print(f"\n{label} (step {step})\n{layer_table(history, step, layers)}")
    accuracy = history.series.get("val_accuracy", {})
    if accuracy:
        print(f"\nheld-out accuracy {accuracy[max(accuracy)]:.3f}")
    print(f"{steps[-1]} optimizer steps, {len(steps)} measurements, {seconds:.1f} s")


if __name__ == "__main__":
    main()
