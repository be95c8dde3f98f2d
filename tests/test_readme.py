"""The README's first screen works as printed: its two set-up commands, the follow-up
commands name executables this environment installs, the report lands where the README
says, and the licence it names is the LICENSE file's and pyproject's."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
PYPROJECT = (ROOT / "pyproject.toml").read_text(encoding="utf-8")


def _project_field(name: str) -> str:
    """A top-level string field of pyproject's [project] table (tomllib is 3.11+)."""
    found = re.search(rf'^{name} = "([^"]+)"', PYPROJECT, flags=re.M)
    assert found, f"pyproject.toml has no {name}"
    return found.group(1)


def _bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def _setup_section() -> str:
    start = README.index("## Set-up")
    return README[start : README.index("\n## ", start + 1)]


def test_setup_has_exactly_two_setup_commands_and_the_ci_runs_the_test_one():
    commands = [
        line for block in _bash_blocks(_setup_section()) for line in block.splitlines() if "pip install" in line
    ]
    assert len(commands) == 2, commands
    main_job, tests = commands
    assert "examples/digits.py" in main_job
    assert tests.rstrip().endswith("-m pytest -q")
    assert tests in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_follow_up_commands_name_installed_executables():
    """Each follow-up command starts with `.venv/bin/<name>`, the venv the set-up commands
    create; <name> is a console script of this environment (tensorboard, learnscope)."""
    follow = [
        line.split("#")[0].strip()
        for block in _bash_blocks(_setup_section())
        for line in block.splitlines()
        if "pip install" not in line and line.strip()
    ]
    assert follow, "the set-up section lost its follow-up commands"
    here = Path(sys.executable).parent
    for line in follow:
        program = shlex.split(line)[0]
        assert program.startswith(".venv/bin/"), f"{line!r} only works with the venv on PATH"
        name = program.removeprefix(".venv/bin/")
        assert (here / name).exists(), f"{name} is not installed beside {sys.executable}"


def test_report_lands_where_the_readme_says(tmp_path):
    """`learnscope report LOGDIR` writes LOGDIR/learnscope_report/report.md, the path the
    README prints, for a run holding a few learnscope tags."""
    pytest.importorskip("matplotlib")
    from torch.utils.tensorboard import SummaryWriter

    from learnscope.report.cli import main

    assert "runs/digits/learnscope_report/report.md" in README
    logdir = tmp_path / "runs" / "digits"
    with SummaryWriter(str(logdir / "mlp" / "version_0")) as writer:
        for step in range(5):
            writer.add_scalar("lca/total", -0.1, step)
            writer.add_scalar("lca/delta_loss", -0.1, step)
            writer.add_scalar("lca/layer/net.0", -0.1, step)
            writer.add_scalar("lca/layer_cumulative/net.0", -0.1 * (step + 1), step)
    assert main(["report", str(logdir), "--no-progress"]) == 0
    assert (logdir / "learnscope_report" / "report.md").is_file()


def test_licence_is_one_licence():
    licence = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert _project_field("license") == "Apache-2.0"
    assert "Apache License" in licence and "Version 2.0, January 2004" in licence
    assert "Apache-2.0" in README and "(LICENSE)" in README


def test_citation_file_names_both_papers():
    citation = (ROOT / "CITATION.cff").read_text(encoding="utf-8")
    for identifier in ("1909.01440", "2212.13881"):
        assert identifier in citation and identifier in README
    version = _project_field("version")
    assert f"version: {version}" in citation


@pytest.mark.parametrize("name", ["tensorboard", "learnscope"])
def test_console_scripts_are_declared_or_depended_on(name):
    declared = re.findall(r"^(\w+) = \"learnscope\.", PYPROJECT, flags=re.M)
    depends = re.findall(r'^\s+"(\w+)[<>=]', PYPROJECT, flags=re.M)
    assert name in declared or name in depends, (declared, depends)
