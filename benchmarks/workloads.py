"""Reference workloads of the performance benchmarks (issue #7).

Two models on random data, both trained with Adam at batch 128:

* ``mlp``: 784-512-512-10 ReLU MLP (669 706 parameters, c = 10 outputs);
* ``cnn``: a small CNN on 1×28×28 inputs (conv 8, pool, conv 16, pool, linear 10;
  9 098 parameters): its probe cost is convolution work, its bookkeeping negligible.

Everything here is plain setup: seeded models and data, a LightningModule that
logs its training loss as a user's would, and a Trainer factory configured the
same way for every run so that only the callbacks differ.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

BATCH_SIZE = 128
NUM_CLASSES = 10
TRAIN_SAMPLES = 4096  # the probe subset (up to 1024 samples) is drawn from these
DATA_SEED = 1234
MODEL_SEED = 0


def mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, NUM_CLASSES)
    )


def cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 7 * 7, NUM_CLASSES),
    )


@dataclass(frozen=True)
class Workload:
    name: str
    build: Callable[[], nn.Sequential]
    input_shape: tuple[int, ...]

    def net(self) -> nn.Sequential:
        torch.manual_seed(MODEL_SEED)
        return self.build()

    def data(self, samples: int = TRAIN_SAMPLES) -> tuple[Tensor, Tensor]:
        generator = torch.Generator().manual_seed(DATA_SEED)
        x = torch.randn(samples, *self.input_shape, generator=generator)
        y = torch.randint(0, NUM_CLASSES, (samples,), generator=generator)
        return x, y

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.build().parameters())


WORKLOADS = {
    "mlp": Workload("mlp", mlp, (784,)),
    "cnn": Workload("cnn", cnn, (1, 28, 28)),
}


class Classifier(pl.LightningModule):
    """Cross-entropy on a given net, Adam (lr 1e-3); logs its loss like a user's module."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def train_loader(workload: Workload) -> DataLoader:
    x, y = workload.data()
    generator = torch.Generator().manual_seed(DATA_SEED)
    return DataLoader(TensorDataset(x, y), batch_size=BATCH_SIZE, shuffle=True, generator=generator, drop_last=True)


LOG_EVERY_N_STEPS = 50  # Lightning's default, used by every Trainer run of the benchmarks


class StepClock(pl.Callback):
    """Wall-clock time at the end of every training batch.

    Put it last in the callback list: Lightning calls ``on_train_batch_end`` of the
    callbacks in order, so each interval includes every other callback's work.
    """

    def __init__(self, warmup: int, on_warm: Callable[[], None] | None = None) -> None:
        if warmup < 1:
            raise ValueError("warmup must be at least 1 step")
        self.warmup = warmup
        self.on_warm = on_warm
        self.stamps: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.stamps.append(time.perf_counter())
        if len(self.stamps) == self.warmup and self.on_warm is not None:
            self.on_warm()  # e.g. reset a stopwatch so that it covers the same window

    @property
    def steps(self) -> int:
        """Steps in the timed window: every step after the first ``warmup``."""
        return len(self.stamps) - self.warmup

    def per_step(self) -> float:
        """Mean seconds per step after the first ``warmup`` steps (they hold the probe
        set's construction, the first full evaluation and allocator warm-up)."""
        return (self.stamps[-1] - self.stamps[self.warmup - 1]) / self.steps


class _StopAt(pl.Callback):
    """Ends the fit after ``steps`` optimizer steps, whatever ``max_steps`` says."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        trainer.should_stop = trainer.should_stop or trainer.global_step >= self.steps


def fit(
    workload: Workload,
    callbacks: Sequence[pl.Callback],
    steps: int,
    *,
    logdir: str | None = None,
    log_every_n_steps: int = LOG_EVERY_N_STEPS,
    planned_steps: int | None = None,
) -> Classifier:
    """Train ``steps`` optimizer steps from the seeded initialisation (same batches
    every time). ``logdir``: a TensorBoardLogger there (what users get), else no logger.
    ``planned_steps``: the Trainer's ``max_steps`` (what callbacks see as the run's
    length), the fit stopping after ``steps`` all the same."""
    from lightning.pytorch.loggers import TensorBoardLogger

    model = Classifier(workload.net())
    logger: Any = TensorBoardLogger(logdir, name="", version="") if logdir is not None else False
    if planned_steps is not None:
        callbacks = [*callbacks, _StopAt(steps)]
    trainer = pl.Trainer(
        max_steps=steps if planned_steps is None else planned_steps,
        accelerator="cpu",
        devices=1,
        logger=logger,
        log_every_n_steps=log_every_n_steps,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=list(callbacks),
    )
    trainer.fit(model, train_loader(workload))
    return model


def scratch_dir() -> str:
    return tempfile.mkdtemp(prefix="learnscope-bench-")
