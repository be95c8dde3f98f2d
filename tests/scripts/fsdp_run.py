"""Run by tests/test_fsdp.py: the callbacks under Lightning's ModelParallelStrategy (FSDP2).
On CPU with gloo, or on 2 GPUs with NCCL when LEARNSCOPE_FSDP_ACCELERATOR=cuda.

``python fsdp_run.py OUT MODE``, Lightning launching the second process itself:

* ``hsdp``: NeuralFeatureAnsatz in one process under ModelParallelStrategy on a model
  ``fully_shard``-ed on a 2-D (HSDP) mesh (refused before the first step);
* ``dtensor``: LossChangeAllocation in one process on a model ``fully_shard``-ed by hand
  under the single-device strategy (refused before the first step);
* ``bad_config``: LossChangeAllocation(rule="adaptive") under ModelParallelStrategy;
* ``fsdp1``: LossChangeAllocation under Lightning's FSDPStrategy (GPUs only; refused at setup);
* ``fit``: three fits of the digits MLP with every Linear and the net ``fully_shard``-ed
  in ``configure_model`` (2 CPU processes, gloo): without callbacks, with LCA on every
  step (simpson, decompose, histograms), with LCA every 3rd step on the minibatch, with
  the cheap preset, and with LCA stopped after 3 steps and resumed from the sharded checkpoint;
  then NeuralFeatureAnsatz on every step (between two snapshots of each rank's shards, .grad
  and RNG), NFA every 3rd step beside LCA on every step, and NFA stopped after 3 steps and resumed;
* ``nfa``: the fit without callbacks and the NFA fits alone (a quicker look while developing).

Writes OUT/rank{r}.json (the error a fit raised, if any, and the steps taken) and, from
rank 0, OUT/fit.pt: each fit's final parameters and momentum buffers (gathered), the
logged scalars and, per measured step, θ_{t+1}, Δ and the applied gradient (gathered); for
the NFA fits the gathered parameters at every step and rank 0's last G. Each rank's json also
says whether NFA left its state untouched and whether it holds a record.
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
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from learnscope import LossChangeAllocation, NeuralFeatureAnsatz
from models import Classifier, MemoryLogger, digits, digits_loader, mlp

LR, MOMENTUM, STEPS, PROBE = 0.05, 0.9, 6, 256
#: "cuda" for the GPU tests (NCCL); the CPU tests use gloo
ACCELERATOR = os.environ.get("LEARNSCOPE_FSDP_ACCELERATOR", "cpu")


class Sharded(Classifier):
    """The digits MLP with each Linear (and the whole net) sharded by FSDP2."""

    def configure_model(self) -> None:
        mesh = (
            self.device_mesh["data_parallel"] if self.device_mesh is not None else init_device_mesh(ACCELERATOR, (1,))
        )
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR, momentum=MOMENTUM)


class Hybrid(Sharded):
    """The same MLP under HSDP: ``fully_shard`` on a 2-D (replicate, shard) mesh, here 1 × 1."""

    def configure_model(self) -> None:
        mesh = init_device_mesh(ACCELERATOR, (1, 1), mesh_dim_names=("replicate", "shard"))
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)


class WeightTap(pl.Callback):
    """Keeps every parameter, gathered (every rank takes part; all keep them), at fit start and
    after every optimizer step: W₀ and the W (and biases) each NFA measurement saw."""

    def __init__(self):
        self.weights = {}

    def _keep(self, trainer, pl_module):
        self.weights[trainer.global_step] = {n: p.detach().full_tensor().cpu() for n, p in pl_module.named_parameters()}

    def on_train_start(self, trainer, pl_module):
        self._keep(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._keep(trainer, pl_module)


class Snapshot(pl.Callback):
    """This rank's parameter shards, their ``.grad`` shards and the global RNG state at fit start
    and after every optimizer step; placed before and after NeuralFeatureAnsatz in the callback
    list, the two snapshots show what its measurement changed."""

    def __init__(self):
        self.states = {}

    def _keep(self, trainer, pl_module):
        params = dict(pl_module.named_parameters())
        self.states[trainer.global_step] = {
            "params": {n: p.to_local().clone() for n, p in params.items()},
            "grads": {n: None if p.grad is None else p.grad.to_local().clone() for n, p in params.items()},
            "types": {n: type(p).__name__ for n, p in params.items()},
            "rng": torch.get_rng_state(),
        }

    def on_train_start(self, trainer, pl_module):
        self._keep(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._keep(trainer, pl_module)


def same(a, b) -> bool:
    """Whether two snapshots (nested dicts of tensors, None allowed) are bitwise equal."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


class Recorder(LossChangeAllocation):
    """Keeps θ_{t+1}, Δ and the applied gradient of every measured step, gathered (every rank
    takes part in the gathers; rank 0 keeps them)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.steps = {}

    def observe(self, step, names, allocation, parts):
        live = dict(self._pl_module.named_parameters())
        self.steps[step] = {
            "end": {n: live[n].full_tensor().cpu() for n in names},
            "delta": {n: _full(live[n], allocation.delta[n]).cpu() for n in names},
            "grad": {n: live[n].grad.full_tensor().cpu() for n in names},
        }


def _full(param, local):
    return DTensor.from_local(
        local, param.device_mesh, param.placements, shape=param.shape, stride=param.stride()
    ).full_tensor()


def probe_loader() -> DataLoader:
    x, y = digits()
    return DataLoader(TensorDataset(x[:PROBE], y[:PROBE]), batch_size=128)


def fit(callbacks, strategy=None, devices=2, loggers=False, max_steps=STEPS, ckpt_path=None, module=Sharded):
    pl.seed_everything(0, verbose=False)
    model = module(net=mlp())
    trainer = pl.Trainer(
        accelerator=ACCELERATOR,
        devices=devices,
        strategy=strategy or ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_steps=max_steps,
        logger=loggers,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    error = None
    try:
        trainer.fit(model, digits_loader(batch_size=32, shuffle=False), ckpt_path=ckpt_path)
    except Exception as err:  # the refusals under test
        error = {"type": type(err).__name__, "message": str(err)}
    return trainer, model, error


def resumed(out: str) -> dict:
    """LCA on every step, stopped after 3 steps with a sharded checkpoint and resumed to 6."""
    first = MemoryLogger()
    trainer, _, error = fit([Recorder(probe=probe_loader())], loggers=[first], max_steps=3)
    assert error is None, error
    path = Path(out, "sharded.ckpt")
    trainer.save_checkpoint(path)  # a directory of per-rank shards (torch.distributed.checkpoint)
    callback, logger = Recorder(probe=probe_loader()), MemoryLogger()
    trainer, _, error = fit([callback], loggers=[logger], ckpt_path=path)
    assert error is None, error
    return {"first": dict(first.series), "series": dict(logger.series), "measured_steps": callback.measured_steps}


def final_state(trainer, model) -> dict:
    """Parameters and momentum buffers, gathered from the shards."""
    optimizer = trainer.optimizers[0]
    state = {f"param/{n}": p.full_tensor().cpu() for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        for key, value in optimizer.state[p].items():
            state[f"optim/{n}/{key}"] = (value.full_tensor() if isinstance(value, DTensor) else value).cpu()
    return state


def run_fits(out: str) -> None:
    results = {}
    trainer, model, _ = fit([])
    results["plain"] = final_state(trainer, model)
    every = Recorder(probe=probe_loader(), rule="simpson", decompose=True, histograms=True)
    logger = MemoryLogger()
    trainer, model, error = fit([every], loggers=[logger])
    assert error is None, error
    results["every"] = {"state": final_state(trainer, model), "series": dict(logger.series), "steps": every.steps}
    third = LossChangeAllocation(every_n_steps=3, probe="batch", rule="trapezoid", decompose=True)
    logger = MemoryLogger()
    trainer, model, error = fit([third], loggers=[logger])
    assert error is None, error
    results["third"] = {"state": final_state(trainer, model), "series": dict(logger.series)}
    cheap, logger = Recorder(preset="cheap"), MemoryLogger()
    trainer, model, error = fit([cheap], loggers=[logger])
    assert error is None, error
    results["cheap"] = {"state": final_state(trainer, model), "series": dict(logger.series), "steps": cheap.steps}
    results["resumed"] = resumed(out)
    nfa, this_rank = nfa_fits()
    results.update(nfa)
    if trainer.global_rank == 0:
        torch.save(results, Path(out, "fit.pt"))
    write(out, trainer, None, **this_rank)


def nfa_fits() -> tuple[dict, dict]:
    """NFA on every step (with the weights it saw, gathered) and NFA every 3rd step beside the LCA
    of the "every" fit; and, for this rank, whether the measurements left its shards, their
    ``.grad`` and the RNG bitwise as they were, and whether it holds a record (rank 0 only)."""
    nfa = NeuralFeatureAnsatz(every_n_steps=1, probe=probe_loader(), null_draws=8)
    tap, before, after, logger = WeightTap(), Snapshot(), Snapshot(), MemoryLogger()
    trainer, model, error = fit([before, nfa, after, tap], loggers=[logger])
    assert error is None, error
    results = {"nfa": {"state": final_state(trainer, model), "series": dict(logger.series), "weights": tap.weights}}
    results["nfa"]["grams"] = nfa.last_record.grams if nfa.last_record is not None else None  # G at step 6
    this_rank = {
        "nfa_untouched": sorted(before.states) == list(range(STEPS + 1)) and same(before.states, after.states),
        "nfa_record": nfa.last_record is not None,
        "param_types": sorted({t for state in after.states.values() for t in state["types"].values()}),
    }
    lca = Recorder(probe=probe_loader(), rule="simpson", decompose=True, histograms=True)
    nfa, logger = NeuralFeatureAnsatz(every_n_steps=3, probe=probe_loader(), null_draws=8), MemoryLogger()
    trainer, model, error = fit([lca, nfa], loggers=[logger])
    assert error is None, error
    results["both"] = {"state": final_state(trainer, model), "series": dict(logger.series)}
    results["nfa_resumed"] = nfa_resumed()
    return results, this_rank


def nfa_resumed() -> dict:
    """NFA on every step, stopped after 3 steps with a sharded checkpoint and resumed to 6 (W₀ saved
    whole), with the weights the resumed part measured."""
    nfa = NeuralFeatureAnsatz(every_n_steps=1, probe=probe_loader(), null_draws=8)
    trainer, _, error = fit([nfa], max_steps=3)
    assert error is None, error
    path = Path(os.environ["LEARNSCOPE_FSDP_OUT"], "nfa_sharded.ckpt")
    trainer.save_checkpoint(path)
    nfa, tap, logger = (
        NeuralFeatureAnsatz(every_n_steps=1, probe=probe_loader(), null_draws=8),
        WeightTap(),
        MemoryLogger(),
    )
    trainer, _, error = fit([nfa, tap], loggers=[logger], ckpt_path=path)
    assert error is None, error
    initial_type = type(nfa.initial_weights["net.0"]).__name__
    return {"series": dict(logger.series), "weights": tap.weights, "initial_type": initial_type}


def write(out, trainer, error, **extra) -> None:
    record = {"error": error, "steps": trainer.global_step, **extra}
    Path(out, f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def main(out: str, mode: str) -> None:
    os.environ["LEARNSCOPE_FSDP_OUT"] = out
    if mode == "fit":
        run_fits(out)
    elif mode == "nfa":  # the NFA fits alone (for a quick look; the tests use "fit")
        trainer, model, _ = fit([])
        plain = final_state(trainer, model)
        results, this_rank = nfa_fits()
        if trainer.global_rank == 0:
            torch.save({"plain": plain, **results}, Path(out, "fit.pt"))
        write(out, trainer, None, **this_rank)
    elif mode == "hsdp":
        strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)
        trainer, _, error = fit([NeuralFeatureAnsatz(probe_size=128)], strategy, devices=1, module=Hybrid)
        write(out, trainer, error)
    elif mode == "dtensor":
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
        trainer, _, error = fit([LossChangeAllocation(probe_size=128)], strategy="auto", devices=1)
        write(out, trainer, error)
    else:
        callback = {
            "bad_config": LossChangeAllocation(probe_size=128, rule="adaptive"),
            "fsdp1": LossChangeAllocation(probe_size=128),
        }[mode]
        trainer, _, error = fit([callback], strategy="fsdp" if mode == "fsdp1" else None)
        write(out, trainer, error)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # torch 2.13's gloo teardown sometimes aborts after the work is done (see lca_fsdp.py)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
