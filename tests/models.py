"""Real-data models shared by the tests: scikit-learn's bundled digits (1797 images)."""

from __future__ import annotations

from collections import defaultdict
from itertools import pairwise
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import Logger
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def digits(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardised 64-pixel digits and their labels (constant pixels stay 0)."""
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float64)
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-6)
    return x.to(dtype), torch.tensor(data.target, dtype=torch.long)


def digits_loader(
    batch_size: int = 64, shuffle: bool = True, n: int | None = None, dtype=torch.float32, seed: int = 0
) -> DataLoader:
    x, y = digits(dtype)
    if n is not None:
        x, y = x[:n], y[:n]
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=generator)


def mlp(sizes=(64, 100, 50, 10), dropout: float = 0.0, batchnorm: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            if batchnorm:
                layers.append(nn.BatchNorm1d(b))
            layers.append(nn.ReLU())
            if dropout:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class Classifier(pl.LightningModule):
    """Cross-entropy classifier; ``optimizer`` is 'sgd' or 'adam' with keyword options."""

    def __init__(self, net: nn.Module | None = None, optimizer: str = "sgd", **optimizer_options: Any) -> None:
        super().__init__()
        self.net = net if net is not None else mlp()
        self.optimizer_name = optimizer
        self.optimizer_options = optimizer_options or {"lr": 0.05}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[self.optimizer_name]
        return cls(self.parameters(), **self.optimizer_options)


class MemoryLogger(Logger):
    """Keeps every logged scalar: ``logger.series[tag] == {step: value}``."""

    def __init__(self) -> None:
        super().__init__()
        self.series: dict[str, dict[int, float]] = defaultdict(dict)

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for tag, value in metrics.items():
            self.series[tag][int(step if step is not None else -1)] = float(value)


def trainer(callbacks=(), loggers=None, max_steps: int = 50, **kwargs: Any) -> pl.Trainer:
    options = dict(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=loggers if loggers is not None else False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=list(callbacks),
        deterministic=True,
    )
    options.update(kwargs)
    return pl.Trainer(**options)


def state_of(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, torch.Tensor]:
    """Parameters, buffers and optimizer state tensors, for bitwise comparisons."""
    state = {f"param/{n}": p.detach().clone() for n, p in model.named_parameters()}
    state.update({f"buffer/{n}": b.detach().clone() for n, b in model.named_buffers()})
    if optimizer is not None:
        names = {id(p): n for n, p in model.named_parameters()}
        for p, s in optimizer.state.items():
            for key, value in s.items():
                if isinstance(value, torch.Tensor):
                    state[f"optim/{names[id(p)]}/{key}"] = value.detach().clone()
    return state


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


def trained_state(
    make_model, callbacks=(), max_steps: int = 5, n: int = 512, **trainer_options: Any
) -> dict[str, torch.Tensor]:
    """Parameters, buffers and optimizer state after ``max_steps`` steps from seed 0 on
    ``n`` digits, with ``callbacks``: compare runs with and without a probe bitwise.
    ``trainer_options`` go to the Trainer (e.g. ``accelerator="cuda"``)."""
    torch.manual_seed(0)
    model = make_model()
    fit = trainer(callbacks=list(callbacks), max_steps=max_steps, **trainer_options)
    fit.fit(model, digits_loader(n=n))
    return state_of(model, fit.optimizers[0])
