"""Lightning's own demo ``Transformer`` (``nn.Transformer`` encoder-decoder: nn.MultiheadAttention
with attention dropout, nn.Dropout, LayerNorm) in ``LightningTransformer``, made small
and trained on sequences from a fixed random Markov chain instead of WikiText2 (which
downloads). Its ``forward(inputs, target)`` takes two batch elements."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.demos import LightningTransformer, Transformer
from torch.utils.data import DataLoader, TensorDataset

from .common import MODEL_SEED, markov_sequences, shuffled_loader

VOCAB = 32
LENGTH = 16
LAYERS = 1


class SmallLightningTransformer(LightningTransformer):
    """``LightningTransformer`` (its ``training_step`` unchanged) around a small ``Transformer``;
    no WikiText2 download in ``prepare_data``. SGD at ``lr`` 0.005 instead of the demo's 0.1:
    on this task, with dropout off, Simpson's 3-point rule leaves a cumulative relative error
    of 3.5e-3 over 10 steps at lr 0.1, 2.0e-3 at 0.02 and 1.5e-4 at 0.005 (quadrature error
    on a strongly curved path: at lr 0.02, ``rule="adaptive"`` with tolerance 1e-6 brings it
    to 2.5e-6 over 4 steps)."""

    def __init__(self, vocab_size: int = VOCAB, dropout: float = 0.1, lr: float = 0.005) -> None:
        pl.LightningModule.__init__(self)  # LightningTransformer's own builds the 200-wide model
        self.model = Transformer(vocab_size=vocab_size, ninp=32, nhead=2, nhid=64, nlayers=LAYERS, dropout=dropout)
        self.lr = lr

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.model.parameters(), lr=self.lr)

    def prepare_data(self) -> None:
        pass


def _attention(prefix: str) -> tuple[str, ...]:
    return tuple(f"{prefix}.{part}" for part in ("q", "k", "v", "out_proj"))


#: What NeuralFeatureAnsatz measures once it handles nn.MultiheadAttention (issue 15, item 3):
#: each attention's q, k, v maps and out_proj, the feed-forward Linear layers and the decoder.
NFA_LAYERS = (
    tuple(
        name
        for i in range(LAYERS)
        for name in (
            *_attention(f"model.transformer.encoder.layers.{i}.self_attn"),
            f"model.transformer.encoder.layers.{i}.linear1",
            f"model.transformer.encoder.layers.{i}.linear2",
        )
    )
    + tuple(
        name
        for i in range(LAYERS)
        for name in (
            *_attention(f"model.transformer.decoder.layers.{i}.self_attn"),
            *_attention(f"model.transformer.decoder.layers.{i}.multihead_attn"),
            f"model.transformer.decoder.layers.{i}.linear1",
            f"model.transformer.decoder.layers.{i}.linear2",
        )
    )
    + ("model.decoder",)
)
#: The default input_fn passes both batch elements (forward(inputs, target)); the model
#: flattens its tokens into rows, (n·T, vocab): one row per sample is (n, T, vocab).
NFA_OPTIONS: dict = {"output_fn": lambda out: out.view(-1, LENGTH, out.shape[-1])}


def build(
    stochastic: bool = True, samples: int = 256, batch_size: int = 16
) -> tuple[SmallLightningTransformer, DataLoader]:
    """The module and its loader of (inputs, target = inputs shifted by one); ``stochastic=False``:
    dropout 0 everywhere (nn.Dropout and the attention weights')."""
    torch.manual_seed(MODEL_SEED)
    module = SmallLightningTransformer(dropout=0.1 if stochastic else 0.0)
    tokens = markov_sequences(samples, LENGTH + 1, VOCAB)
    return module, shuffled_loader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size)
