"""Data and LightningModule helpers shared by the zoo models: synthetic token tasks
with learnable structure, the digits as 1×8×8 images, a Hugging Face wrapper, and a
probe loss evaluated in eval mode (what issue 15 wants every probe pass to be)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

DATA_SEED = 1234
MODEL_SEED = 0


def markov_sequences(n: int, length: int, vocab: int, successors: int = 2, seed: int = DATA_SEED) -> Tensor:
    """``n`` token sequences of ``length`` from a fixed random Markov chain in which every
    token is followed by one of ``successors`` tokens (uniformly): next-token prediction
    can bring the loss from log(vocab) down to log(successors)."""
    generator = torch.Generator().manual_seed(seed)
    allowed = torch.stack([torch.randperm(vocab, generator=generator)[:successors] for _ in range(vocab)])
    tokens = torch.empty(n, length, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, vocab, (n,), generator=generator)
    for t in range(1, length):
        choice = torch.randint(0, successors, (n,), generator=generator)
        tokens[:, t] = allowed[tokens[:, t - 1], choice]
    return tokens


def majority_group_task(n: int, length: int, vocab: int, groups: int, seed: int = DATA_SEED) -> tuple[Tensor, Tensor]:
    """Random tokens labelled with the group (``token * groups // vocab``) that occurs most
    often in the sequence (ties: the lowest group): a bag-of-tokens classification."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (n, length), generator=generator)
    counts = torch.nn.functional.one_hot(tokens * groups // vocab, groups).sum(1)
    return tokens, counts.argmax(1)


class DictDataset(Dataset):
    """Samples as dicts of tensors (what Hugging Face models take as keyword arguments)."""

    def __init__(self, **tensors: Tensor) -> None:
        self.tensors = tensors
        self.length = len(next(iter(tensors.values())))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {key: value[index] for key, value in self.tensors.items()}


def shuffled_loader(dataset: Dataset, batch_size: int) -> DataLoader:
    generator = torch.Generator().manual_seed(DATA_SEED)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator, drop_last=True)


def digit_images() -> TensorDataset:
    """The 1797 standardised sklearn digits as 1×8×8 images with their labels."""
    from models import digits  # tests/models.py

    x, y = digits()
    return TensorDataset(x.reshape(-1, 1, 8, 8), y)


class HuggingFaceModule(pl.LightningModule):
    """A Hugging Face model trained on dict batches with its own loss (``labels`` in the
    batch), AdamW: the usual way such models are wrapped in Lightning."""

    def __init__(self, model: torch.nn.Module, lr: float = 1e-3) -> None:
        super().__init__()
        self.model = model
        self.lr = lr

    def forward(self, **inputs: Any) -> Any:
        return self.model(**inputs)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.model(**batch).loss
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


@contextlib.contextmanager
def eval_except_batchnorm(module: nn.Module) -> Iterator[None]:
    """Every submodule but batch-statistics normalisation in eval mode, each flag restored after."""
    saved = [(m, m.training) for m in module.modules()]
    try:
        for m, _ in saved:
            if not isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.training = False
        yield
    finally:
        for m, flag in saved:
            m.training = flag


def eval_mode_probe_loss(module: pl.LightningModule, batch: Any) -> Tensor:
    """A ``loss_fn`` for LossChangeAllocation: the module's ``training_step`` loss with every
    module but BatchNorm in eval mode, as issue 15 wants every probe pass to be (attention
    dropout and DropPath off, BatchNorm normalising with the chunk's own statistics)."""
    with eval_except_batchnorm(module):
        return module.training_step(batch, 0)
