"""LightningCLI: the callbacks are configured from the command line and from a
YAML file (examples/cli.py, examples/cli_config.yaml), and log their tags."""

from __future__ import annotations

import importlib.util
import inspect
import sys
from pathlib import Path

import pytest

pytest.importorskip("jsonargparse")
pytest.importorskip("sklearn")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

import learnscope

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CONFIG = EXAMPLES / "cli_config.yaml"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


@pytest.fixture(scope="module")
def example():
    """examples/cli.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("learnscope_example_cli", EXAMPLES / "cli.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # jsonargparse resolves classes and docstrings through sys.modules
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    # LightningCLI warns when sys.argv (here pytest's) is set beside args=[...]
    monkeypatch.setattr(sys, "argv", ["cli.py"])


def the(callbacks, cls):
    found = [callback for callback in callbacks if type(callback) is cls]
    assert len(found) == 1, f"expected one {cls.__name__} in {callbacks}"
    return found[0]


def scalars(log_dir: str) -> dict[str, dict[int, float]]:
    """Every scalar the run wrote: ``{tag: {step: value}}``."""
    events = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def probe_loss(module, batch):  # deliberately unannotated, as most users write it
    x, y = batch
    return nn.functional.cross_entropy(module(x), y)


def graphs_in(batch):  # a batch_size_fn, unannotated
    return len(batch[1])


def logits_of(output):
    return output


def test_command_line_adds_lca_with_its_flags_and_it_logs_lca_tags(example, tmp_path):
    cli = example.cli_main(
        [
            "fit",
            "--trainer.callbacks+=learnscope.LossChangeAllocation",
            "--trainer.callbacks.rule=adaptive",
            "--trainer.callbacks.probe_size=256",
            "--trainer.callbacks.histograms=false",
            "--trainer.max_steps=3",
            "--trainer.num_sanity_val_steps=0",
            f"--trainer.default_root_dir={tmp_path}",
            *QUIET,
        ]
    )
    lca = the(cli.trainer.callbacks, learnscope.LossChangeAllocation)
    assert (lca.rule, lca.probe, lca.probe_size, lca.histograms) == ("adaptive", "train", 256, False)
    assert lca.probe_samples == 256
    assert cli.trainer.global_step == 3

    logged = scalars(cli.trainer.logger.log_dir)
    assert set(logged["lca/total"]) == {0, 1, 2}
    assert {f"lca/layer/net.{i}" for i in (0, 2, 4)} <= set(logged)
    # adaptive starts at 2 Simpson sub-intervals and doubles until the error is below 1e-3
    assert all(splits >= 2 for splits in logged["lca/splits"].values())
    assert all(error < 1e-3 for error in logged["lca/abs_error"].values())
    assert not any(tag.startswith("nfa/") for tag in logged)
    for module, value in lca.cumulative.items():
        assert logged[f"lca/layer_cumulative/{module}"][2] == pytest.approx(value, rel=1e-6)


def test_yaml_config_turns_on_both_callbacks_with_its_flags(example, tmp_path):
    cli = example.cli_main(
        ["fit", "--config", str(CONFIG), "--trainer.max_steps=4", f"--trainer.default_root_dir={tmp_path}", *QUIET]
    )
    lca = the(cli.trainer.callbacks, learnscope.LossChangeAllocation)
    nfa = the(cli.trainer.callbacks, learnscope.NeuralFeatureAnsatz)
    assert (lca.rule, lca.probe_size, lca.modules, lca.unit_allocations) == ("simpson", 512, ["net.*"], True)
    assert (nfa.every_n_steps, nfa.probe_size, nfa.null_draws, nfa.images) == (25, 512, "auto", False)
    assert tuple(nfa.alphas) == (1.0, 0.5)
    assert cli.trainer.global_step == 4
    assert cli.model.hparams.hidden == [128, 64]

    logged = scalars(cli.trainer.logger.log_dir)
    assert set(logged["lca/total"]) == {0, 1, 2, 3}
    events = EventAccumulator(cli.trainer.logger.log_dir, size_guidance={"tensors": 0})
    events.Reload()
    (units,) = events.Tensors("lca/unit/net.2")  # one tensor per window: steps 0-3 end with the fit
    assert units.step == 3 and units.tensor_proto.tensor_shape.dim[0].size == 64  # hidden [128, 64]
    # every_n_steps=25 > max_steps: NFA measures at fit start (step 0) and fit end (step 4)
    assert set(logged["nfa/net.0/pearson_a1"]) == {0, 4}
    assert -1.0 <= logged["nfa/net.0/pearson_a1"][4] <= 1.0
    assert "nfa/net.4/pearson_a0.5" in logged and "nfa/net.4/pearson_a1" not in logged  # the readout
    # LightningCLI saved the resolved config, callbacks included, beside the logs
    saved = (Path(cli.trainer.logger.log_dir) / "config.yaml").read_text()
    assert "class_path: learnscope.LossChangeAllocation" in saved
    assert "class_path: learnscope.NeuralFeatureAnsatz" in saved


def test_command_line_options_override_the_yaml_config(example, tmp_path):
    cli = example.cli_main(
        [
            "--config", str(CONFIG),
            "--trainer.callbacks+=learnscope.LossChangeAllocation",
            "--trainer.callbacks.preset=cheap",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        run=False,
    )  # fmt: skip
    callbacks = [c for c in cli.trainer.callbacks if type(c) is learnscope.LossChangeAllocation]
    assert len(callbacks) == 2  # += appends to the config's list
    cheap = callbacks[1]
    assert (cheap.preset, cheap.probe, cheap.rule, cheap.histograms, cheap.decompose) == (
        "cheap", "batch", "first_order", False, False,
    )  # fmt: skip
    assert callbacks[0].rule == "simpson" and callbacks[0].state_key != cheap.state_key


def test_a_cli_flag_equal_to_its_default_still_overrides_the_preset(example, tmp_path):
    # LightningCLI passes every flag; the unset ones arrive as None and the preset fills them
    cli = example.cli_main(
        ["--trainer.callbacks+=learnscope.LossChangeAllocation", "--trainer.callbacks.preset=cheap",
         "--trainer.callbacks.decompose=true", f"--trainer.default_root_dir={tmp_path}"],
        run=False,
    )  # fmt: skip
    callback = the(cli.trainer.callbacks, learnscope.LossChangeAllocation)
    assert (callback.probe, callback.rule, callback.histograms, callback.decompose) == (
        "batch",
        "first_order",
        False,
        True,
    )


@pytest.mark.parametrize(
    "callback, flag, function",
    [
        ("LossChangeAllocation", "loss_fn", probe_loss),
        ("NeuralFeatureAnsatz", "output_fn", logits_of),
        ("LossChangeAllocation", "batch_size_fn", graphs_in),
        ("NeuralFeatureAnsatz", "batch_size_fn", graphs_in),
    ],
)
def test_function_flags_accept_an_import_path(example, tmp_path, callback, flag, function):
    """``--trainer.callbacks.loss_fn=package.module.function`` (a plain, unannotated function)."""
    path = f"{function.__module__}.{function.__name__}"
    cli = example.cli_main(
        [f"--trainer.callbacks+=learnscope.{callback}", f"--trainer.callbacks.{flag}={path}",
         f"--trainer.default_root_dir={tmp_path}"],
        run=False,
    )  # fmt: skip
    instance = the(cli.trainer.callbacks, getattr(learnscope, callback))
    assert getattr(instance, flag) is function


@pytest.mark.parametrize("callback", ["LossChangeAllocation", "NeuralFeatureAnsatz"])
def test_help_lists_every_constructor_flag(example, capsys, callback):
    cls = getattr(learnscope, callback)
    with pytest.raises(SystemExit) as exit_info:
        example.cli_main(["fit", "--trainer.callbacks.help", f"learnscope.{callback}"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for name in inspect.signature(cls.__init__).parameters:
        if name != "self":
            assert f"--trainer.callbacks.{name} " in text, name
    if callback == "LossChangeAllocation":
        # the rule's choices (None: the preset's, else "simpson")
        assert "Optional[Literal['first_order', 'trapezoid'," in text and "'simpson', 'adaptive']]" in text
        assert "(type: int, default: 1)" in text  # every_n_steps


def test_a_bad_flag_value_is_a_usage_error_naming_the_flag(example, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        example.cli_main(
            ["--trainer.callbacks+=learnscope.LossChangeAllocation", "--trainer.callbacks.rule=rk4",
             f"--trainer.default_root_dir={tmp_path}"],
            run=False,
        )  # fmt: skip
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "rule" in error and "rk4" in error
