"""The callbacks under sharded training (docs/fsdp.md).

Lightning's ModelParallelStrategy (FSDP2 ``fully_shard``) runs on CPU with gloo, so the
2-process tests run here and in CI; ``GLOO_SOCKET_IFNAME=lo`` keeps gloo on the loopback
interface (without it gloo crashed in ``init_process_group`` on this machine when the
processes were launched by hand). Lightning's FSDPStrategy (FSDP1) refuses a CPU
accelerator: it is covered by the ``cuda``-marked tests, skipped without GPUs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy, SingleDeviceStrategy

from learnscope._probe import ProbeError, require_supported_strategy

SCRIPTS = Path(__file__).parent / "scripts"
ENV = {**os.environ, "GLOO_SOCKET_IFNAME": "lo"}
REFUSAL = "Supported: a single device or DDP"


def _run(tmp_path: Path, mode: str, ranks: int) -> list[dict]:
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / "fsdp_run.py"), str(tmp_path), mode],
        capture_output=True,
        text=True,
        timeout=240,
        env=ENV,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(ranks)]


# -- refusal at setup ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("strategy", "refused"),
    [
        (FSDPStrategy(), True),
        (ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1), True),
        (DDPStrategy(), False),
        (SingleDeviceStrategy("cpu"), False),
    ],
)
def test_sharding_strategies_are_refused_by_name(strategy, refused):
    trainer = SimpleNamespace(strategy=strategy)
    if not refused:
        require_supported_strategy(trainer, owner="LossChangeAllocation")
        return
    with pytest.raises(ProbeError, match=f"LossChangeAllocation does not support {type(strategy).__name__} ") as err:
        require_supported_strategy(trainer, owner="LossChangeAllocation")
    assert REFUSAL in str(err.value) and "docs/fsdp.md" in str(err.value)


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "owner"), [("lca", "LossChangeAllocation"), ("nfa", "NeuralFeatureAnsatz")])
def test_model_parallel_fit_is_refused_at_setup_on_every_rank(tmp_path, mode, owner):
    """Before the check, LossChangeAllocation crashed the run at its first measured step
    (``NotImplementedError: Operator c10d.allreduce_.default does not have a sharding
    strategy registered``) and NeuralFeatureAnsatz in its first probe forward."""
    for rank in _run(tmp_path, mode, ranks=2):
        assert rank["steps"] == 0  # refused before the first optimizer step
        assert rank["error"]["type"] == "ProbeError"
        assert rank["error"]["message"].startswith(f"{owner} does not support ModelParallelStrategy ")
        assert REFUSAL in rank["error"]["message"]


@pytest.mark.slow
def test_hand_sharded_parameters_are_refused_before_the_first_step(tmp_path):
    (rank,) = _run(tmp_path, "dtensor", ranks=1)
    assert rank["steps"] == 0
    assert rank["error"]["message"].startswith(
        "LossChangeAllocation does not support sharded parameters: 'net.0.weight' is a DTensor"
    )
