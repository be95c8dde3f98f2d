"""The LCA paper's analyses (Lan et al., 2019) and the NFA's alignment, on digits, in one command.

    python examples/paper_figures.py [--out runs/paper_figures] [--quick] [--models fc cnn]

Trains two models on scikit-learn's 1797 handwritten digits (bundled with scikit-learn:
nothing is downloaded) with SGD-momentum: the fully connected net 64-100-100-10 (``fc``)
and a small BatchNorm CNN with one residual block (``cnn``). Each run has three probes:
``LossChangeAllocation`` on a fixed subset of the training data (``parameter_counts=True``,
``tensor_series=True``, ``per_step_series=True`` for the synchronisation test), a second one
(``name="lca_val"``) on held-out digits, and ``NeuralFeatureAnsatz``. The figures are
drawn by the report's own functions (``learnscope.report.figures``) from the event files,
into ``OUT/<model>/``:

    helped_fraction.png          fraction of parameters that helped, per iteration
    param_helped_fraction.png    per-parameter helped fraction (the paper's histogram)
    tensor_lca.png               per-layer totals split by parameter tensor (which layers hurt)
    lca_per_layer.png            per-layer totals (when the per-tensor split is not logged)
    synchronisation.png          per-layer LCA over iterations, local minima marked
    synchronisation_driver_removed.png   the same with the layers' shared driver removed
    lca_overlay.png              train against held-out LCA
    lca_distribution.png         the allocations' distribution, skewness and kurtosis
    nfa_alignment.png            NFA Pearson(WᵀW, AGOP^α) against the rotation null, ±1.96·SE
    lca_nfa_steps.png            LCA and NFA on one step axis (NFA at s, LCA of the steps < s)

and prints the table "claim | paper | measured here | reproduced?" (also OUT/claims.md).
About 1-2 minutes on 2 CPU cores (``--quick``: a shorter run, for a look).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader

from digits import digits_data  # the main job's split (examples/digits.py)
from learnscope import LossChangeAllocation, NeuralFeatureAnsatz, contract
from learnscope.report import figures
from learnscope.report.reader import RunRecords, read_logdir
from learnscope.report.shape import histogram_quantile, last_histogram, read_tensor_lca, tensor_totals
from learnscope.report.summary import RunSummary, SyncSettings, cumulative_layer_lca, summarise_run
from learnscope.report.sync import format_p_value

MODELS = ("fc", "cnn")
HELD_OUT = "lca_val"  # the held-out LCA callback's name (tag root)
LOG_EVERY = 10  # histograms every 10 steps: a run of 10k + 1 steps has one at its last step


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/paper_figures"), help="output directory")
    parser.add_argument("--quick", action="store_true", help="61 steps per model instead of 401")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), help="which models to train")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------- data, models


def fc_net() -> nn.Module:
    """The LCA paper's fully connected net, sized for 8×8 digits: 64-100-100-10."""
    return nn.Sequential(nn.Linear(64, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 10))


class ResidualCNN(nn.Module):
    """conv-BN-ReLU stem (stride 2: 8×8 → 4×4, which keeps it fast on a CPU), one
    residual block (two conv-BN, identity skip), global average pooling and a linear
    readout; input: 64 pixels as a 1×8×8 image."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, channels, 3, stride=2, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.head = nn.Linear(channels, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem_bn(self.stem(x.view(-1, 1, 8, 8))))
        h = torch.relu(h + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(h))))))
        return self.head(h.mean(dim=(2, 3)))


NETS: dict[str, Callable[[], nn.Module]] = {"fc": fc_net, "cnn": ResidualCNN}


class DigitsClassifier(pl.LightningModule):
    """Cross-entropy on digits with SGD, momentum 0.9."""

    def __init__(self, net: nn.Module, lr: float = 0.05) -> None:
        super().__init__()
        self.net, self.lr = net, lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


# ---------------------------------------------------------------------------- training


@dataclass
class Settings:
    steps: int = 401
    n_train: int = 1400
    probe_size: int = 512
    nfa_every: int = 20
    batch_size: int = 64


@dataclass
class TrainedRun:
    """One model's training: its callbacks and where its event files are."""

    model: str
    lca: LossChangeAllocation
    lca_val: LossChangeAllocation
    nfa: NeuralFeatureAnsatz
    log_dir: Path
    seconds: float


def train(model: str, out: Path, settings: Settings) -> TrainedRun:
    """Train ``model`` for ``settings.steps`` steps with both LCA probes and NFA on."""
    pl.seed_everything(0, verbose=False)
    train_set, held_out = digits_data(settings.n_train)
    lca = LossChangeAllocation(
        probe="train",
        probe_size=settings.probe_size,
        parameter_counts=True,
        tensor_series=True,
        per_step_series=True,  # the synchronisation test reads every step's per-layer LCA
    )
    lca_val = LossChangeAllocation(
        probe=DataLoader(held_out, batch_size=512), name=HELD_OUT, histograms=False, per_step_series=True
    )
    nfa = NeuralFeatureAnsatz(every_n_steps=settings.nfa_every, probe_size=settings.probe_size, images=False)
    logger = TensorBoardLogger(out / "logs", name="", version=model)  # OUT/logs/<model>
    trainer = pl.Trainer(
        max_steps=settings.steps,
        logger=logger,
        callbacks=[lca, lca_val, nfa],
        log_every_n_steps=LOG_EVERY,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    loader = DataLoader(train_set, batch_size=settings.batch_size, shuffle=True)
    started = time.perf_counter()
    trainer.fit(DigitsClassifier(NETS[model]()), loader)
    return TrainedRun(model, lca, lca_val, nfa, Path(logger.log_dir), time.perf_counter() - started)


# ---------------------------------------------------------------------------- analyses


@dataclass
class Analysis:
    """What one model's event files say: the records of both LCA sections and the summary."""

    model: str
    run: RunRecords
    held_out: RunRecords | None
    summary: RunSummary
    tensor_totals: dict[tuple[str, str], float]
    figures: dict[str, Path]


def analyse(trained: TrainedRun, out: Path) -> Analysis:
    """Read the run's event files and draw the paper's figures with the report's functions."""
    sections = read_logdir(trained.log_dir, progress=False).learnscope_runs
    run = next(section for name, section in sections.items() if not name.endswith(f"[{HELD_OUT}]"))
    held_out = next((section for name, section in sections.items() if name.endswith(f"[{HELD_OUT}]")), None)
    summary = summarise_run(run, SyncSettings())
    tensors = read_tensor_lca(run)
    directory, title = out / trained.model, trained.model
    drawn = {
        "helped_fraction": figures.plot_helped_fraction(run, directory / "helped_fraction.png"),
        "param_helped_fraction": figures.plot_param_helped_fraction(run, directory / "param_helped_fraction.png"),
        "tensor_lca": figures.plot_tensor_lca(tensors, directory / "tensor_lca.png", title),
        "synchronisation": figures.plot_synchronisation(summary.sync, directory / "synchronisation.png", title),
        "synchronisation_driver_removed": figures.plot_synchronisation(
            summary.sync_driver_removed, directory / "synchronisation_driver_removed.png", title
        ),
        "lca_overlay": figures.plot_lca_overlay([run, held_out] if held_out else [run], directory / "lca_overlay.png"),
        "lca_distribution": figures.plot_lca_distribution(run, summary, directory / "lca_distribution.png"),
        "nfa_alignment": figures.plot_nfa_alignment(run, directory / "nfa_alignment.png"),
        "lca_nfa_steps": figures.plot_lca_nfa_steps(run, directory / "lca_nfa_steps.png"),
    }
    if not tensors:
        drawn["lca_per_layer"] = figures.plot_layer_lca_bars(summary, directory / "lca_per_layer.png")
    written = {name: path for name, path in drawn.items() if path is not None}
    return Analysis(trained.model, run, held_out, summary, tensor_totals(tensors), written)


# ---------------------------------------------------------------------------- claims


@dataclass(frozen=True)
class Claim:
    claim: str
    paper: str
    measured: str
    reproduced: str  # "yes", "no" or "partly", with the reason after a colon


def _verdict(holds: bool, why_not: str = "") -> str:
    return "yes" if holds else "no" + (f": {why_not}" if why_not else "")


def helped_claims(analysis: Analysis) -> list[Claim]:
    summary = analysis.summary
    per_step = summary.mean_helped_fraction
    per_parameter = summary.param_helped_fraction
    claims = [
        Claim(
            "parameters that help on a step",
            "barely above half (≈ 50 %)",
            "n/a" if per_step is None else f"{100 * per_step:.1f} % (mean over steps)",
            "n/a" if per_step is None else _verdict(0.5 < per_step < 0.56, "well above half"),
        )
    ]
    histogram = last_histogram(analysis.run.lca.param_helped_fraction) if analysis.run.lca else None
    if per_parameter is not None and histogram is not None:
        low, median, high = (histogram_quantile(histogram, q) for q in (0.25, 0.5, 0.75))
        claims.append(
            Claim(
                "per-parameter helped fraction",
                "histogram centred near 50 %",
                f"mean {100 * per_parameter:.1f} % over parameters (= the per-step mean, by construction); "
                f"median {100 * median:.0f} %, half of them in {100 * low:.0f}–{100 * high:.0f} %",
                _verdict(0.45 <= median <= 0.55, "centred well above 50 %"),
            )
        )
    return claims


def shape_claims(analysis: Analysis) -> list[Claim]:
    summary = analysis.summary
    kurtosis, skewness = summary.pooled_excess_kurtosis, summary.pooled_skewness
    if kurtosis is None or skewness is None:
        return []
    per_step = summary.mean_skewness
    return [
        Claim(
            "allocations heavy-tailed",
            "high kurtosis",
            f"excess kurtosis {kurtosis:.3g} pooled, {summary.mean_excess_kurtosis or math.nan:.3g} mean per step",
            _verdict(kurtosis > 3, "tails close to normal"),
        ),
        Claim(
            "allocations roughly symmetric",
            "fairly symmetric",
            f"skewness {skewness:+.3g} pooled, {per_step or math.nan:+.3g} mean per step",
            _verdict(abs(skewness) < 1 and abs(per_step or 0.0) < 1, "clearly skewed (a long helping tail)"),
        ),
    ]


def _hurting(analysis: Analysis) -> tuple[list[str], str]:
    """The parameter tensors (or layers, without the per-tensor split) with positive total LCA."""
    if analysis.tensor_totals:
        hurt = [f"{module}.{tensor}" for (module, tensor), value in analysis.tensor_totals.items() if value > 0]
        return hurt, "tensors"
    assert analysis.run.lca is not None
    totals = {name: cumulative_layer_lca(layer) for name, layer in analysis.run.lca.layers.items()}
    return [name for name, value in totals.items() if value is not None and value > 0], "layers"


def hurting_claim(analysis: Analysis) -> Claim:
    hurt, unit = _hurting(analysis)
    measured = f"{len(hurt)} {unit} hurt" + (f": {', '.join(hurt)}" if hurt else "")
    why = "every tensor helped overall" if unit == "tensors" else "every layer helped (no per-tensor split logged)"
    return Claim("some layers hurt overall", "the last layer; biases", measured, _verdict(bool(hurt), why))


def sync_claim(analysis: Analysis) -> Claim:
    raw, removed = analysis.summary.sync, analysis.summary.sync_driver_removed
    if raw is None:
        return Claim("layers' LCA minima synchronised", "p < 1e-6", "not tested", "n/a")
    measured = f"raw {raw.observed:g} pairs vs {raw.null_mean:.1f} by chance, {_short_p(raw)}"
    if removed is not None:
        measured += f"; driver removed {removed.observed:g} vs {removed.null_mean:.1f}, {_short_p(removed)}"
    if raw.fine_p_value >= 0.01:
        verdict = "no: not above chance"
    elif removed is not None and removed.fine_p_value >= 0.01:
        verdict = "partly: the coincidences come from the driver all layers share"
    else:
        verdict = "yes"
    return Claim("layers' LCA minima synchronised", "p < 1e-6", measured, verdict)


def _short_p(sync) -> str:
    return format_p_value(sync).split(";")[0]


_PEARSON, _EXCESS = contract.family("nfa_pearson"), contract.family("nfa_excess")
_NULL_SE = contract.family("nfa_null_se")


def nfa_claim(analysis: Analysis) -> Claim | None:
    """Pearson(WᵀW, AGOP^½) and its excess over the rotation null at the last measurement,
    per layer; above the null when the excess exceeds 1.96 standard errors."""
    nfa = analysis.run.nfa
    if nfa is None:
        return None
    parts, above, high = [], [], []
    for name, layer in nfa.layers.items():
        pearson = layer.metrics.get(_PEARSON.leaf(alpha=0.5))
        excess = layer.metrics.get(_EXCESS.leaf(alpha=0.5))
        error = layer.metrics.get(_NULL_SE.leaf(alpha=0.5))
        if pearson is None or excess is None or not len(pearson):
            continue
        se = error.last() if error is not None and len(error) else 0.0
        parts.append(f"{name} {pearson.last():.2f} ({excess.last():+.2f} ± {1.96 * se:.2f})")
        above.append(excess.last() > 1.96 * se)
        high.append(pearson.last() > 0.8)
    if not parts:
        return None
    verdict = "yes" if all(above) and all(high) else ("partly" if any(above) else "no")
    return Claim(
        "NFA: Pearson(WᵀW, AGOP^½) high, above the null",
        "≈ 0.9, far above chance",
        "; ".join(parts),
        verdict + ("" if verdict == "yes" else ": not in every layer"),
    )


def claims_of(analysis: Analysis) -> list[Claim]:
    """The table's rows for one model."""
    rows = helped_claims(analysis) + shape_claims(analysis) + [hurting_claim(analysis), sync_claim(analysis)]
    nfa = nfa_claim(analysis)
    return rows + ([nfa] if nfa is not None else [])


def claims_table(by_model: dict[str, list[Claim]]) -> str:
    """Markdown table: claim | paper | measured here (one column per model) | reproduced?"""
    models = list(by_model)
    header = "| claim | paper | " + " | ".join(f"measured here ({m})" for m in models) + " | reproduced? |"
    lines = [header, "|" + "---|" * (3 + len(models))]
    first = by_model[models[0]]
    for index, claim in enumerate(first):
        cells = [by_model[m][index] if index < len(by_model[m]) else None for m in models]
        measured = [c.measured if c is not None and c.claim == claim.claim else "n/a" for c in cells]
        verdicts = "; ".join(f"{m}: {c.reproduced}" for m, c in zip(models, cells) if c is not None)
        lines.append(f"| {claim.claim} | {claim.paper} | " + " | ".join(measured) + f" | {verdicts} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- main


@dataclass
class Reproduction:
    trained: dict[str, TrainedRun]
    analyses: dict[str, Analysis]
    claims: dict[str, list[Claim]]
    table: str


def reproduce(
    out: Path, models: list[str] | tuple[str, ...] = MODELS, settings: Settings | None = None
) -> Reproduction:
    """Train each model, draw its figures into ``out/<model>/`` and build the claim table."""
    settings = settings or Settings()
    threads = torch.get_num_threads()
    # These models are tiny: one thread is faster than several, by 10× on a busy 2-core machine.
    torch.set_num_threads(1)
    try:
        trained = {model: train(model, out, settings) for model in models}
    finally:
        torch.set_num_threads(threads)
    analyses = {model: analyse(run, out) for model, run in trained.items()}
    claims = {model: claims_of(analysis) for model, analysis in analyses.items()}
    return Reproduction(trained, analyses, claims, claims_table(claims))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    settings = Settings(steps=61 if args.quick else 401)
    started = time.perf_counter()
    result = reproduce(args.out, args.models, settings)
    seconds = time.perf_counter() - started
    for model, analysis in result.analyses.items():
        trained = result.trained[model]
        print(f"{model}: {settings.steps} steps trained in {trained.seconds:.1f} s; figures in {args.out / model}:")
        for path in analysis.figures.values():
            print(f"  {path}")
    print()
    print(result.table)
    (args.out / "claims.md").write_text(result.table + "\n", encoding="utf-8")
    print(
        f"\nclaim table: {args.out / 'claims.md'}; event files: {args.out / 'logs'} (learnscope report works on them)"
    )
    print(f"wall time: {seconds:.0f} s")
    _say_where_digits_differs(result)


def _say_where_digits_differs(result: Reproduction) -> None:
    """One line per claim that digits does not reproduce, in plain words."""
    misses = [
        f"- {model}: {claim.claim}: {claim.reproduced}"
        for model, rows in result.claims.items()
        for claim in rows
        if not claim.reproduced.startswith("yes")
    ]
    if misses:
        print("\nWhere digits does not reproduce the paper:")
        print("\n".join(misses))


if __name__ == "__main__":
    main()
