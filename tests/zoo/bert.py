"""Hugging Face BERT for sequence classification (2 layers, width 32), random init, on
a synthetic bag-of-tokens task. Attention-probability dropout is applied functionally,
gated on the attention module's own ``training`` flag."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from .common import MODEL_SEED, DictDataset, HuggingFaceModule, majority_group_task, shuffled_loader

VOCAB = 32
LENGTH = 16
LABELS = 4
LAYERS = 2

#: Every nn.Linear: q/k/v, the attention output, intermediate and output dense maps,
#: the pooler and the classifier.
NFA_LAYERS = tuple(
    f"model.bert.encoder.layer.{i}.{name}"
    for i in range(LAYERS)
    for name in (
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
    )
) + ("model.bert.pooler.dense", "model.classifier")
NFA_OPTIONS: dict = {}


def build(stochastic: bool = True, samples: int = 256, batch_size: int = 16) -> tuple[HuggingFaceModule, DataLoader]:
    """The module and its training loader; ``stochastic=False`` sets every dropout rate to 0."""
    from transformers import BertConfig, BertForSequenceClassification

    rate = 0.1 if stochastic else 0.0
    config = BertConfig(
        hidden_size=32,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=VOCAB,
        max_position_embeddings=LENGTH,
        hidden_dropout_prob=rate,
        attention_probs_dropout_prob=rate,
        num_labels=LABELS,
    )
    torch.manual_seed(MODEL_SEED)
    module = HuggingFaceModule(BertForSequenceClassification(config))
    tokens, labels = majority_group_task(samples, LENGTH, VOCAB, LABELS)
    return module, shuffled_loader(DictDataset(input_ids=tokens, labels=labels), batch_size)
