"""Run by tests/test_fsdp.py: the callbacks under Lightning's ModelParallelStrategy (FSDP2).

``python fsdp_run.py OUT MODE``: MODE ``lca`` / ``nfa`` fits the digits MLP with every
Linear ``fully_shard``-ed in ``configure_model`` (2 CPU processes, gloo) with that
callback; ``dtensor`` fits it in one process with ``fully_shard`` applied by hand under
the single-device strategy. Writes OUT/rank{r}.json: the error the fit raised (its
type and message) and the optimizer steps taken before it.
"""

import json
import os
import socket
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from learnscope import LossChangeAllocation, NeuralFeatureAnsatz
from models import Classifier, digits_loader, mlp


class Sharded(Classifier):
    """The digits MLP with each Linear (and the whole net) sharded by FSDP2."""

    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"] if self.device_mesh is not None else init_device_mesh("cpu", (1,))
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def main(out: str, mode: str) -> None:
    pl.seed_everything(0, verbose=False)
    if mode == "dtensor":
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
        strategy, devices, callback = "auto", 1, LossChangeAllocation(probe_size=128)
    else:
        strategy, devices = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1), 2
        callback = LossChangeAllocation(probe_size=128) if mode == "lca" else NeuralFeatureAnsatz(probe_size=128)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    )
    error = None
    try:
        trainer.fit(Sharded(net=mlp()), digits_loader(batch_size=64, shuffle=False))
    except Exception as err:  # the refusal under test
        error = {"type": type(err).__name__, "message": str(err)}
    result = {"error": error, "steps": trainer.global_step}
    Path(out, f"rank{trainer.global_rank}.json").write_text(json.dumps(result))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # torch 2.13's gloo teardown sometimes aborts after the work is done (see lca_fsdp.py)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
