"""Hugging Face GPT-2 (2 layers, width 64), random init, as a causal language model on
sequences from a fixed random Markov chain. Its projections are ``Conv1D`` layers
(weight stored [in, out]); attention dropout is applied functionally, gated on the
attention module's own ``training`` flag."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from .common import MODEL_SEED, DictDataset, HuggingFaceModule, markov_sequences, shuffled_loader

VOCAB = 32
LENGTH = 16
LAYERS = 2

#: What NeuralFeatureAnsatz measures by default once it handles Conv1D (issue 15, item 3).
NFA_LAYERS = tuple(
    f"model.transformer.h.{i}.{name}"
    for i in range(LAYERS)
    for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
) + ("model.lm_head",)
NFA_OPTIONS: dict = {}


def build(stochastic: bool = True, samples: int = 256, batch_size: int = 16) -> tuple[HuggingFaceModule, DataLoader]:
    """The module and its training loader; ``stochastic=False`` sets every dropout rate to 0."""
    from transformers import GPT2Config, GPT2LMHeadModel

    rate = 0.1 if stochastic else 0.0
    config = GPT2Config(
        n_layer=LAYERS,
        n_embd=64,
        n_head=2,
        vocab_size=VOCAB,
        n_positions=LENGTH,
        attn_pdrop=rate,
        resid_pdrop=rate,
        embd_pdrop=rate,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(MODEL_SEED)
    module = HuggingFaceModule(GPT2LMHeadModel(config))
    tokens = markov_sequences(samples, LENGTH, VOCAB)
    return module, shuffled_loader(DictDataset(input_ids=tokens, labels=tokens), batch_size)
