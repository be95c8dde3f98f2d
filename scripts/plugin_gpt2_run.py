"""A ~150-module run for the learnscope tab: the model-zoo GPT-2 (tests/zoo), 24 blocks deep.

    python scripts/plugin_gpt2_run.py LOGDIR [--blocks 24] [--steps 30]

A random-init Hugging Face GPT-2 (width 32, 24 blocks: 147 modules with parameters)
learns sequences of a fixed random Markov chain with AdamW, with LossChangeAllocation
(Simpson on a 64-sequence probe set, optimizer parts) and NeuralFeatureAnsatz (each
block's mlp.c_fc, every 10 steps) logging to ``LOGDIR/gpt2``. CPU: minutes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("logdir")
    parser.add_argument("--blocks", type=int, default=24)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    sys.path.insert(0, str(TESTS))
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.loggers import TensorBoardLogger
    from transformers import GPT2Config, GPT2LMHeadModel

    import learnscope
    from zoo.common import DictDataset, HuggingFaceModule, eval_mode_probe_loss, markov_sequences, shuffled_loader

    vocab, length = 32, 16
    config = GPT2Config(n_layer=args.blocks, n_embd=32, n_head=2, vocab_size=vocab, n_positions=length,
                        attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0, eos_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    module = HuggingFaceModule(GPT2LMHeadModel(config), lr=3e-3)
    tokens = markov_sequences(512, length, vocab)
    loader = shuffled_loader(DictDataset(input_ids=tokens, labels=tokens), 32)
    lca = learnscope.LossChangeAllocation(
        probe_size=64, probe_batch_size=64, decompose=True, loss_fn=eval_mode_probe_loss
    )
    # NFA on each block's MLP input projection, G by Hutchinson probes (the exact G needs one
    # backward pass per output: vocabulary × positions)
    blocks = [f"model.transformer.h.{i}.mlp.c_fc" for i in range(args.blocks)]
    nfa = learnscope.NeuralFeatureAnsatz(every_n_steps=10, probe_size=32, null_draws=4, layers=blocks,
                                         estimator="hutchinson", num_probes=8)  # fmt: skip
    trainer = pl.Trainer(max_steps=args.steps, accelerator="cpu", devices=1, logger=TensorBoardLogger(args.logdir, name="gpt2"),
                         callbacks=[lca, nfa], enable_checkpointing=False, log_every_n_steps=1,
                         enable_model_summary=False)  # fmt: skip
    trainer.fit(module, loader)
    print(f"{len(lca.cumulative)} modules measured; logs in {trainer.logger.log_dir}")


if __name__ == "__main__":
    main()
