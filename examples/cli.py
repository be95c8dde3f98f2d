"""learnscope with LightningCLI: the probes are switched on from the command line or
a YAML file, and the model and data module stay unaware of them.

    python examples/cli.py fit --trainer.callbacks+=learnscope.LossChangeAllocation --trainer.callbacks.rule=adaptive
    python examples/cli.py fit --config examples/cli_config.yaml --trainer.max_steps=200
    python examples/cli.py fit --trainer.callbacks.help learnscope.LossChangeAllocation   # the flags

Logs go to ``runs/cli/lightning_logs/version_N`` (``--trainer.default_root_dir``);
then ``tensorboard --logdir runs/cli`` or ``learnscope report runs/cli``.
"""

from __future__ import annotations

from itertools import pairwise

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LightningCLI
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class DigitsClassifier(pl.LightningModule):
    """A ReLU MLP classifier of 8×8 digits (64 pixels, 10 classes), trained with
    SGD; LightningCLI's ``--optimizer`` replaces the optimizer if given."""

    def __init__(self, hidden: list[int] = [128, 64], lr: float = 0.05, momentum: float = 0.9) -> None:  # noqa: B006
        super().__init__()
        self.save_hyperparameters()
        sizes = [64, *hidden, 10]
        layers: list[nn.Module] = []
        for i, (inputs, outputs) in enumerate(pairwise(sizes)):
            layers.append(nn.Linear(inputs, outputs))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val/loss", nn.functional.cross_entropy(logits, y))
        self.log("val/acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum)


class DigitsDataModule(pl.LightningDataModule):
    """scikit-learn's 1797 bundled handwritten digits (no download), pixels
    standardised, split into training and validation sets with a fixed seed."""

    def __init__(self, batch_size: int = 64, val_size: int = 397, split_seed: int = 0) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.val_size = val_size
        self.split_seed = split_seed

    def setup(self, stage: str) -> None:
        data = load_digits()
        x = torch.tensor(data.data, dtype=torch.float32)
        x = (x - x.mean(0)) / x.std(0).clamp_min(1e-6)
        y = torch.tensor(data.target)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.split_seed))
        train, val = order[self.val_size :], order[: self.val_size]
        self.train_set = TensorDataset(x[train], y[train])
        self.val_set = TensorDataset(x[val], y[val])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256)


def cli_main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Build (and with ``run=True`` run) the CLI; ``args=None`` reads ``sys.argv``."""
    return LightningCLI(
        DigitsClassifier,
        DigitsDataModule,
        seed_everything_default=0,
        trainer_defaults={"default_root_dir": "runs/cli", "accelerator": "cpu", "devices": 1},
        args=args,
        run=run,
    )


if __name__ == "__main__":
    cli_main()
