"""The tag contract (learnscope.contract): every tag the callbacks write is declared
there once, parses back to exactly one family, and the README's table is generated
from it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from learnscope import LossChangeAllocation, NeuralFeatureAnsatz, contract, tags
from learnscope.functional.decompose import PARTS
from learnscope.functional.lca import RULES
from learnscope.functional.nfa import nfa_metrics
from learnscope.report.reader import (
    LCA_RUN_METRICS,
    LcaRecords,
    NfaRecords,
    parse_tag,
    read_logdir,
)
from models import Classifier, digits, digits_loader, trainer

README = Path(__file__).resolve().parents[1] / "README.md"
SAMPLE_FIELDS = {
    "module": "encoder.layers.10.fc1",
    "layer": "blocks.1.attn.q",
    "part": "weight_decay",
    "data": "probe",
    "rule": "first_order",
    "unit": 12,
    "tensor": "in_proj_weight",
    "alpha": 0.5,
}
ROOTS = {"lca": "lca", "lca_val": "lca", "nfa": "nfa", "nfa.2": "nfa"}


def test_closed_values_equal_the_functional_layers_own_lists():
    assert contract.RULES == RULES
    assert contract.PARTS == PARTS


@pytest.mark.parametrize("family", contract.FAMILIES, ids=lambda f: f.name)
@pytest.mark.parametrize("root", ["default", "renamed"])
def test_every_family_formats_and_parses_back_to_itself_and_no_other(family, root):
    root = (
        contract.DEFAULT_ROOTS[family.writer]
        if root == "default"
        else {"lca": "lca_val", "nfa": "nfa.2"}[family.writer]
    )
    fields = {name: SAMPLE_FIELDS[name] for name in family.fields}
    tag = family.format(root, **fields)
    match = contract.parse_tag(tag, ROOTS)
    assert match.family is family and match.root == root
    assert match.fields == {
        name: format(value, "g") if name == "alpha" else str(value) for name, value in fields.items()
    }
    # the root says which callback wrote the tag; among that callback's families, only this one matches
    others = contract.families(family.writer)
    assert [other.name for other in others if other.match(tag, root) is not None] == [family.name]
    assert re.match(family.regex(root), tag) and re.match(family.regex(root, **fields), tag)
    # the regex of another root does not pick the tag up
    assert not re.match(family.regex("other"), tag)


def test_templates_render_as_the_callbacks_tags():
    family = contract.family
    assert family("lca_layer").format("lca", module="net.0") == "lca/layer/net.0"
    assert family("lca_ablation_part").format("lca_val", data="batch", rule="simpson", part="momentum") == (
        "lca_val/ablation/batch_simpson/part/momentum"
    )
    assert family("lca_unit").format(module="net.2") == "lca/unit/net.2"  # one tensor per module
    assert family("nfa_pearson").format("nfa", layer="net.0", alpha=1.0) == "nfa/net.0/pearson_a1"
    assert family("nfa_align").format(layer="net.0", alpha=0.5) == "nfa/net.0/align_a0.5"
    assert (
        contract.ablation_corner("probe", "adaptive")
        == tags.lca_ablation_corner("probe", "adaptive")
        == ("probe_adaptive")
    )


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: contract.family("lca_part").format(part="nesterov"), r"part must be one of \('gradient'"),
        (lambda: contract.family("lca_layer").format(), r"lca_layer takes the fields \('module',\)"),
        (lambda: contract.family("lca_layer").format("a/b", module="x"), "root must be"),
        (lambda: contract.family("lca_layer").format(module="a/b"), "module must be"),
        (lambda: contract.ablation_corner("train", "simpson"), r"data must be one of \('batch', 'probe'\)"),
        (lambda: contract.family("lca_nope"), "unknown tag family 'lca_nope'"),
        (lambda: contract.nfa_metric("pearson_a"), "'pearson_a' is not an NFA metric"),
    ],
)
def test_bad_fields_raise_naming_the_field_and_the_allowed_values(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize(
    "tag",
    [
        "lca/layer",  # no module
        "lca/layer/a/b",  # module names hold no '/'
        "lca/part/nesterov",  # not a part
        "lca/ablation/train_simpson/helped_fraction",  # not a data
        "lca/ablation/probe_midpoint/helped_fraction",  # not a rule
        "lca/unit/net.0/x",
        "lca/unit/net.0/7",  # per-unit scalars became one tensor per module
        "lca/mystery",
        "nfa/net.0/pearson",
        "nfa/net.0/align_a1x",
        "nfa/a/b/c",
        "other/total",  # not a callback root
    ],
)
def test_tags_outside_the_contract_do_not_parse(tag):
    assert contract.parse_tag(tag, ROOTS) is None


def test_run_level_metric_lists_derive_from_the_families():
    assert LCA_RUN_METRICS == contract.LCA_RUN_METRICS
    assert set(LCA_RUN_METRICS) < set(vars(LcaRecords()))  # every run-level LCA scalar is a field
    assert set(contract.NFA_RUN_METRICS) < set(vars(NfaRecords()))
    assert len(LCA_RUN_METRICS) == 17 and contract.NFA_RUN_METRICS == ("skipped", "probe_stochastic")


@pytest.mark.parametrize("readout", [False, True])
def test_nfa_metric_names_are_the_keys_nfa_metrics_returns(readout):
    # the functional layer's own output, for a hidden layer and for a readout (α = 1 left out)
    generator = torch.Generator().manual_seed(0)
    weight, initial = torch.randn(6, 9, generator=generator), torch.randn(6, 9, generator=generator)
    root = torch.randn(6, 6, generator=generator)
    metrics = nfa_metrics(
        weight, root @ root.T, alphas=(1.0, 0.5), initial_weight=initial, null_draws=2, readout=readout
    )
    names = contract.nfa_metric_names((1.0, 0.5), null=True)
    expected = [name for name in names if not (readout and name.endswith("_a1"))]
    assert sorted(metrics) == sorted(expected)
    without_null = contract.nfa_metric_names((0.25,), null=False)
    assert without_null == [
        "pearson_a0.25", "cosine_a0.25", "sphericity", "sphericity_range", "align_a0.25", "stable_rank",
        "weight_change", "cnfa_pearson_a1",
    ]  # fmt: skip


def test_readme_tag_table_is_the_generated_one():
    text = README.read_text(encoding="utf-8")
    found = re.search(r"<!-- tag-table:start[^>]*-->\n(.*?)\n<!-- tag-table:end -->", text, re.DOTALL)
    assert found, "README.md lost its tag-table markers"
    assert found.group(1) == contract.markdown_table(), "regenerate with: python -m learnscope.contract"
    printed = subprocess.run(
        [sys.executable, "-m", "learnscope.contract"], capture_output=True, text=True, check=True
    ).stdout
    assert printed.strip() == contract.markdown_table()
    assert (
        len(contract.markdown_table().splitlines()) == 2 + len(contract.FAMILIES) + 3 + len(contract.PLACEHOLDERS) - 1
    )


@pytest.mark.parametrize("module", ["learnscope.contract", "learnscope.report", "learnscope.tensorboard_layout"])
def test_the_contract_and_the_report_import_without_torch(module):
    code = f"import sys, {module}; print(sorted(m for m in ('torch', 'lightning') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_the_contract_imports_only_the_standard_library():
    code = (
        "import sys, learnscope.contract; "
        "print(sorted(m for m in ('torch', 'numpy', 'tensorboard', 'lightning') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# ---------------------------------------------------------------------------- what the callbacks write


class _NanOnLastStep(Classifier):
    """A classifier whose last training loss is NaN: the step's update makes θ
    non-finite, so LCA skips that step (writing ``<name>/skipped_steps``)."""

    def __init__(self, last: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.last = last

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step == self.last else loss


def _held_out() -> DataLoader:
    x, y = digits()
    return DataLoader(TensorDataset(x[1500:], y[1500:]), batch_size=100)


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, 10))


def _fit(logdir: Path, name: str, model: Classifier, callbacks: list, max_steps: int) -> Path:
    logger = TensorBoardLogger(logdir, name=name, version=0)
    trainer(callbacks=callbacks, loggers=[logger], max_steps=max_steps).fit(model, digits_loader(n=640))
    return Path(logger.log_dir)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """Event files of two tiny digits runs that together write every family."""
    logdir = tmp_path_factory.mktemp("contract")
    torch.manual_seed(0)
    full = _fit(
        logdir, "full", Classifier(_net(), "sgd", lr=0.05, momentum=0.9, weight_decay=1e-3),
        [
            LossChangeAllocation(
                probe_size=128, decompose=True, ablation=True, unit_allocations=True, histograms=True,
                parameter_counts=True, tensor_series=True,
            ),
            NeuralFeatureAnsatz(every_n_steps=2, probe_size=128, images=True),
        ],
        max_steps=3,
    )  # fmt: skip
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="skipped"):
        adaptive = _fit(
            logdir, "adaptive", _NanOnLastStep(last=2, net=_net(), optimizer="sgd", lr=0.5),
            [
                LossChangeAllocation(
                    probe=_held_out(), name="lca_val", rule="adaptive", max_intervals=2, tolerance=1e-12,
                    histograms=False,
                )
            ],
            max_steps=3,
        )  # fmt: skip
    return {"lca": full, "nfa": full, "lca_val": adaptive}


def _tags_by_kind(run_dir: Path) -> dict[str, list[str]]:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "histograms": 0, "images": 0, "tensors": 0})
    events.Reload()
    found = events.Tags()
    kinds = {"scalar": "scalars", "histogram": "histograms", "image": "images", "tensor": "tensors"}
    return {kind: list(found[key]) for kind, key in kinds.items()}


def test_every_tag_the_callbacks_write_is_in_the_contract_with_its_kind(written):
    roots = {root: "nfa" if root.startswith("nfa") else "lca" for root in written}
    checked = 0
    for run_dir in set(written.values()):
        for kind, tags_of_kind in _tags_by_kind(run_dir).items():
            for tag in tags_of_kind:
                if "/" not in tag:  # Lightning's and the model's own (epoch, train_loss) and the layout's config
                    assert tag in {"epoch", "train_loss", "hp_metric", "custom_scalars__config__"}, tag
                    continue
                match = contract.parse_tag(tag, roots)
                assert match is not None, f"{tag!r} ({kind}) is not in learnscope.contract"
                assert match.family.kind == kind, f"{tag!r} is a {kind}, the contract says {match.family.kind}"
                checked += 1
    assert checked > 100


def test_the_runs_write_every_family_of_the_contract(written):
    # the other direction: a family no callback writes any more fails here
    roots = {root: "nfa" if root.startswith("nfa") else "lca" for root in written}
    seen = set()
    for run_dir in set(written.values()):
        for tags_of_kind in _tags_by_kind(run_dir).values():
            seen |= {match.family.name for tag in tags_of_kind if (match := contract.parse_tag(tag, roots))}
    assert seen == {family.name for family in contract.FAMILIES}


def test_the_report_reads_the_runs_without_unrecognised_tags(written, recwarn):
    records = read_logdir(Path(written["lca"]).parents[1], progress=False)
    assert not [w for w in recwarn if "tag contract" in str(w.message)]
    runs = records.learnscope_runs
    assert {run.name for run in runs.values()} == {"full/version_0", "adaptive/version_0"}
    assert all(run.unrecognised_tags == [] and run.lca.extra == {} for run in runs.values())
    full, adaptive = runs["full/version_0"], runs["adaptive/version_0"]
    assert adaptive.roots[0] == "lca_val" and adaptive.lca.capped_steps.last() >= 1
    assert adaptive.lca.skipped_steps.last() >= 1
    assert set(full.lca.ablations) == {
        f"{data}_{rule}" for data in ("batch", "probe") for rule in ("first_order", "simpson")
    }


def test_the_report_warns_once_naming_tags_the_contract_does_not_know(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "run"))
    for step in range(3):
        for tag in ("lca/total", "lca/layer/net.0", "lca/mystery", "lca/layer/a/b", "nfa/skipped", "nfa/net.0/new_a1"):
            writer.add_scalar(tag, 1.0, step)
        writer.add_scalar("loss/train", 2.0, step)
    writer.close()
    with pytest.warns(UserWarning, match="tag contract") as caught:
        run = read_logdir(tmp_path, progress=False).runs["run"]
    assert len([w for w in caught if "tag contract" in str(w.message)]) == 1
    message = str(next(w for w in caught if "tag contract" in str(w.message)).message)
    assert all(tag in message for tag in ("lca/mystery", "lca/layer/a/b", "nfa/net.0/new_a1"))
    assert sorted(run.unrecognised_tags) == ["lca/layer/a/b", "lca/mystery", "nfa/net.0/new_a1"]
    assert run.lca.extra == {} and list(run.lca.layers) == ["net.0"] and set(run.other_scalars) == {"loss/train"}
    assert parse_tag("lca/mystery") is None
