"""Run by tests/test_lca_reliability.py: LCA and NFA under 2-process gloo DDP on CPU.

Writes OUT/rank{r}.json with the LCA totals per step and the final NFA metrics as
every rank computed them, and (rank 0) OUT/params.pt with θ_t and θ_{t+1} of every
measured step plus OUT/final.pt with the final state_dict and the NFA's W₀, so the
test can recompute both in one process.
"""

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from learnscope import LossChangeAllocation, NeuralFeatureAnsatz
from models import Classifier, digits_loader, mlp


class Totals(LossChangeAllocation):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.totals, self.delta_losses, self.params = {}, {}, {}

    def observe(self, step, names, allocation, parts):
        self.totals[step] = allocation.total
        self.delta_losses[step] = allocation.delta_loss
        live = dict(self._pl_module.named_parameters())
        self.params[step] = {
            "end": {n: live[n].detach().clone() for n in names},
            "delta": {n: allocation.delta[n].clone() for n in names},
        }


def main(out: str, devices: int) -> None:
    pl.seed_everything(0, verbose=False)
    model = Classifier(net=mlp(batchnorm=True), optimizer="sgd", lr=0.05, momentum=0.9)
    callback = Totals(probe_size=600, probe_batch_size=128, rule="simpson")
    nfa = NeuralFeatureAnsatz(every_n_steps=3, probe_size=600, probe_batch_size=128, images=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_steps=6,
        logger=TensorBoardLogger(out, name="tb"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback, nfa],
        log_every_n_steps=1,
    )
    trainer.fit(model, digits_loader(batch_size=64, shuffle=False))
    rank = trainer.global_rank
    results = {"totals": callback.totals, "delta_losses": callback.delta_losses, "nfa": nfa.last_record.metrics}
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    if rank == 0:
        torch.save(callback.params, Path(out, "params.pt"))
        torch.save({"state": model.state_dict(), "initial": nfa.initial_weights}, Path(out, "final.pt"))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
