"""Command line: ``learnscope report LOGDIR [--out DIR]``.

Reads every run below LOGDIR, prints a per-layer summary table per run, and
writes PNG figures and a ``report.md`` that links them. Exit codes: 0 done,
2 nothing to report (LOGDIR missing, or no learnscope tags in it) or a usage
error, 1 matplotlib missing.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from learnscope.report.reader import LogdirRecords, RunRecords, read_logdir
from learnscope.report.shape import read_tensor_lca
from learnscope.report.summary import (
    RunSummary,
    SyncSettings,
    format_headline,
    format_table,
    summarise_run,
)

__all__ = ["FIGURE_EXPLANATIONS", "STEP_CONVENTION", "build_parser", "main"]

PROGRAM = "learnscope"

# Title and a short explanation of each figure, in report order.
FIGURE_EXPLANATIONS: dict[str, tuple[str, str]] = {
    "cumulative_lca": (
        "Cumulative LCA per layer",
        (
            "Each layer's loss change allocation summed over the measured steps. Negative means the layer's "
            "parameter updates lowered the loss (helped); a rising curve means the layer was hurting at that time."
        ),
    ),
    "lca_per_layer": (
        "Total LCA per layer",
        (
            "The final cumulative LCA of each layer: green bars helped (negative), red bars hurt (positive). "
            "The bars sum to the total loss change explained by the allocation."
        ),
    ),
    "helped_fraction": (
        "Helped fraction",
        (
            "Fraction of parameters whose allocation was negative on each step (left), and the distribution of "
            "that fraction over the steps (right). The paper finds it barely above 0.5."
        ),
    ),
    "lca_parts": (
        "LCA split by optimizer part",
        (
            "Each layer's cumulative LCA split into the parts of the update (gradient, momentum, weight decay, "
            "residual). Parts sum exactly to the layer total (black marker); momentum and weight decay are where "
            "hurting parameters can come from under plain SGD on the same loss."
        ),
    ),
    "nfa_alignment": (
        "NFA alignment against the rotation null",
        (
            "Pearson correlation between the neural feature matrix WᵀW and AGOP^α (α = 1 blue, α = ½ orange) over "
            "training. The dashed line and shaded band are the same correlation with the pre-activation gradient "
            "Gram matrix randomly rotated: only the excess above it is evidence for the ansatz. Readout layers "
            "omit α = 1, which is identically 1 there."
        ),
    ),
    "nfa_metrics": (
        "Other NFA metrics",
        (
            "Excess alignment (correlation − null), cosine versions, sphericity of the gradient Gram matrix "
            "(1 = isotropic), the α = ½ alignment, stable rank, relative weight change and the centred NFA, "
            "one panel per metric with every layer."
        ),
    ),
    "synchronisation": (
        "Synchronisation of learning across layers",
        (
            "Our own operationalisation of the paper's claim (its test is not public): local minima of each layer's "
            "LCA series (▼), counted as coincident when two layers have a minimum on the same step (within the "
            "tolerance), compared with a null where each layer's minima are shifted circularly by an independent "
            "random offset. The p-value is one-sided: exact over all joint shifts where feasible, else an "
            "approximation named beside it, and a Monte-Carlo p with the +1 correction. The summary also gives the "
            "test with the shared driver removed (each layer's deviation from the layers' mean of the standardised "
            "series): layers that only follow a common driver are not synchronised there."
        ),
    ),
    "unit_lca": (
        "Per-neuron LCA",
        (
            "LCA of each output unit of the small layers over the measured steps (green = helped, red = hurt, "
            "colour scale centred at 0)."
        ),
    ),
    "param_helped_fraction": (
        "Per-parameter helped fraction",
        (
            "For each parameter, the fraction of the measured steps on which it helped (A < 0), at the last "
            "logged lca/param_helped_fraction histogram (parameter_counts=True): all parameters (left) and per "
            "module (right). The LCA paper finds this histogram peaked near 0.5: a parameter helps about as often "
            "as it hurts."
        ),
    ),
    "tensor_lca": (
        "LCA per parameter tensor",
        (
            "Each layer's cumulative LCA split by parameter tensor (weight and bias; BatchNorm γ is weight, β is "
            "bias), from lca/tensor_cumulative/<module>/<tensor> (tensor_series=True). Red bars hurt over the run: "
            "the LCA paper finds the last layer and some biases hurting."
        ),
    ),
    "lca_distribution": (
        "Distribution of the allocations",
        (
            "Left: the density of every parameter's allocation at the last step with lca/hist histograms (all "
            "modules pooled, log scale) against a normal of the same mean and spread: heavy tails lie above it. "
            "Middle and right: skewness m₃/m₂^{3/2} and excess kurtosis m₄/m₂² − 3 over the parameters of each "
            "step (solid), and over every parameter of every measured step pooled (dashed). The LCA paper calls "
            "the distribution heavy-tailed and fairly symmetric."
        ),
    ),
    "synchronisation_driver_removed": (
        "Synchronisation with the shared driver removed",
        (
            "The same test on each layer's deviation from the layers' mean of the standardised series: minima "
            "that coincide only because every layer follows one driver (an easy batch) are not counted here."
        ),
    ),
    "lca_nfa_steps": (
        "LCA and NFA on one step axis",
        (
            "Per layer, NFA Pearson(WᵀW, AGOP^½) at step s (right axis, squares) against the LCA accumulated over "
            "the LCA steps < s (left axis, dots): the updates that produced the weights NFA measured. The "
            "cumulative LCA curve is drawn at s + 1 for LCA step s, for the same reason."
        ),
    ),
}

# Report order: LCA totals, then the distribution, NFA, both, synchronisation.
FIGURE_EXPLANATIONS = {
    name: FIGURE_EXPLANATIONS[name]
    for name in (
        "cumulative_lca",
        "lca_per_layer",
        "tensor_lca",
        "helped_fraction",
        "param_helped_fraction",
        "lca_distribution",
        "lca_parts",
        "nfa_alignment",
        "nfa_metrics",
        "lca_nfa_steps",
        "synchronisation",
        "synchronisation_driver_removed",
        "unit_lca",
    )
}

#: the step convention, stated wherever a run shows both LCA and NFA
STEP_CONVENTION = (
    "Steps: LCA step s is the update θ_s → θ_{s+1} (logged once applied); NFA step s is the weights θ_s after "
    "s updates. The NFA point at step s + 1 shows the weights that LCA step s produced; figures with both on "
    "one axis pair NFA at s with the LCA of the steps < s."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROGRAM, description="learnscope: offline reports of LCA and NFA runs logged to TensorBoard."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    report = commands.add_parser(
        "report",
        help="summary table, figures and report.md from a TensorBoard log directory",
        description="Read the learnscope tags of every run below LOGDIR, print a per-layer summary, "
        "and write PNG figures and report.md.",
    )
    report.add_argument(
        "logdir", metavar="LOGDIR", type=Path, help="log directory (searched recursively for event files)"
    )
    report.add_argument("--out", type=Path, default=None, help="output directory (default: LOGDIR/learnscope_report)")
    sync = report.add_argument_group("synchronisation test")
    defaults = SyncSettings()
    for flag, default, text in (
        ("--smooth", defaults.smooth, "odd moving-average width, 1 = none"),
        ("--window", defaults.window, "a minimum is lower than every point within this many steps"),
        ("--tolerance", defaults.tolerance, "minima at most this many steps apart coincide"),
        ("--draws", defaults.n_draws, "circular-shift draws for the null"),
        ("--seed", defaults.seed, "seed of the null draws"),
    ):
        sync.add_argument(flag, type=int, default=default, help=text + " (default %(default)s)")
    report.add_argument("--no-progress", action="store_true", help="no progress bar while reading")
    report.set_defaults(handler=_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``learnscope`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    return args.handler(args)


def _error(message: str) -> None:
    print(f"{PROGRAM} report: {message}", file=sys.stderr)


def _slug(run_name: str) -> str:
    if run_name in (".", ""):
        return "run"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", run_name).strip("_") or "run"


def _sync_settings(args: argparse.Namespace) -> SyncSettings:
    """The synchronisation flags; ValueError naming the flag when one is out of range."""
    settings = SyncSettings(
        smooth=args.smooth, window=args.window, tolerance=args.tolerance, n_draws=args.draws, seed=args.seed
    )
    if settings.smooth < 1 or settings.smooth % 2 == 0:
        raise ValueError(f"--smooth must be an odd integer >= 1, got {settings.smooth}")
    if settings.window < 1 or settings.tolerance < 0 or settings.n_draws < 1:
        raise ValueError("--window and --draws must be >= 1 and --tolerance >= 0")
    return settings


def _no_data_message(records: LogdirRecords, logdir: Path) -> str:
    found = sum(len(run.event_files) for run in records.runs.values())
    where = f"{found} event file(s) in {len(records.runs)} run(s)" if found else "no event files"
    return f"no learnscope data (lca/... or nfa/... tags) under '{logdir}': {where}"


def _report(args: argparse.Namespace) -> int:
    logdir: Path = args.logdir
    if not logdir.exists():
        _error(f"log directory '{logdir}' does not exist")
        return 2
    try:
        settings = _sync_settings(args)
    except ValueError as error:
        _error(str(error))
        return 2
    try:
        from learnscope.report import figures
    except ImportError as error:  # matplotlib is an optional dependency
        _error(f"the report needs matplotlib ({error}); install it with: pip install 'learnscope[extras]'")
        return 1

    records = read_logdir(logdir, progress=False if args.no_progress else None)
    runs = records.learnscope_runs
    if not runs:
        _error(_no_data_message(records, logdir))
        return 2
    out: Path = args.out if args.out is not None else logdir / "learnscope_report"
    report_path = _write_report(figures, runs, settings, out, logdir)
    print(f"\nreport: {report_path}")
    return 0


def _write_report(figures, runs: dict[str, RunRecords], settings: SyncSettings, out: Path, logdir: Path) -> Path:
    """Print each run's summary, draw its figures and write ``report.md``; returns its path."""
    out.mkdir(parents=True, exist_ok=True)
    several = len(runs) > 1
    sections = []
    for name, run in runs.items():
        summary = summarise_run(run, settings)
        _print_summary(run, summary, several=several)
        written = _write_figures(figures, run, summary, out / _slug(name) if several else out)
        sections.append(_markdown_section(run, summary, written, out, several=several))
    sections += _overlay_sections(figures, runs, out)
    report_path = out / "report.md"
    report_path.write_text(_markdown(logdir, sections), encoding="utf-8")
    return report_path


def _overlay_sections(figures, runs: dict[str, RunRecords], out: Path) -> list[str]:
    """One overlay figure per run directory holding several LCA callbacks (``name=``)."""
    by_path: dict[Path, list[RunRecords]] = {}
    for run in runs.values():
        by_path.setdefault(Path(run.path), []).append(run)
    sections = []
    for group in by_path.values():
        if len(group) < 2:
            continue
        name = group[0].name
        written = figures.plot_lca_overlay(group, out / f"lca_overlay_{_slug(name)}.png")
        if written is None:
            continue
        roots = ", ".join(f"`{run.roots[0]}`" for run in group if run.lca is not None and run.roots)
        lines = [
            f"## LCA of each probe set: `{name}`",
            "",
            f"![LCA of each probe set]({written.relative_to(out).as_posix()})",
            "",
            (
                f"The run's LCA callbacks ({roots}) side by side: cumulative Σ LCA (solid) and the cumulative actual "
                "loss change on the same probe set (dashed). A held-out probe set that helps less than the training "
                "one shows where learning stops generalising."
            ),
        ]
        sections.append("\n".join(lines))
    return sections


def _print_summary(run: RunRecords, summary: RunSummary, several: bool) -> None:
    title = f"run {run.name}" if run.name != "." else f"run {run.path}"
    print(title)
    print("=" * len(title))
    for line in format_headline(summary):
        print(line)
    if summary.layers:
        print()
        print(format_table(summary))
    if run.unrecognised_tags:
        print(f"({len(run.unrecognised_tags)} unrecognised lca/ or nfa/ tags ignored, e.g. {run.unrecognised_tags[0]})")
    print()


def _write_figures(figures, run: RunRecords, summary: RunSummary, directory: Path) -> dict[str, Path]:
    plotters: dict[str, Callable[[Path], Path | None]] = {
        "cumulative_lca": lambda path: figures.plot_cumulative_lca(run, path),
        "lca_per_layer": lambda path: figures.plot_layer_lca_bars(summary, path),
        "helped_fraction": lambda path: figures.plot_helped_fraction(run, path),
        "lca_parts": lambda path: figures.plot_lca_parts(run, path),
        "nfa_alignment": lambda path: figures.plot_nfa_alignment(run, path),
        "nfa_metrics": lambda path: figures.plot_nfa_metrics(run, path),
        "synchronisation": lambda path: figures.plot_synchronisation(summary.sync, path, title=figures._run_title(run)),
        "unit_lca": lambda path: figures.plot_unit_lca(run, path),
        "param_helped_fraction": lambda path: figures.plot_param_helped_fraction(run, path),
        "tensor_lca": lambda path: figures.plot_tensor_lca(read_tensor_lca(run), path, figures._run_title(run)),
        "lca_distribution": lambda path: figures.plot_lca_distribution(run, summary, path),
        "synchronisation_driver_removed": lambda path: figures.plot_synchronisation(
            summary.sync_driver_removed, path, title=figures._run_title(run)
        ),
        "lca_nfa_steps": lambda path: figures.plot_lca_nfa_steps(run, path),
    }
    written = {}
    for name in FIGURE_EXPLANATIONS:
        path = plotters[name](directory / f"{name}.png")
        if path is not None:
            written[name] = path
    return written


def _markdown_section(run: RunRecords, summary: RunSummary, written: dict[str, Path], out: Path, several: bool) -> str:
    lines = [f"## Run `{run.name}`" if several or run.name != "." else "## Run", ""]
    lines += [f"- {line}" for line in format_headline(summary)]
    if run.lca is not None and run.nfa is not None:
        lines += ["", STEP_CONVENTION]
    if summary.layers:
        lines += [
            "",
            (
                "Per layer (cumulative LCA: negative = helped; share: of the summed layer LCA; "
                "helped frac.: mean over steps; NFA: last measured value):"
            ),
            "",
            format_table(summary, markdown=True),
        ]
    for name, path in written.items():
        title, explanation = FIGURE_EXPLANATIONS[name]
        link = path.relative_to(out).as_posix()
        lines += ["", f"### {title}", "", f"![{title}]({link})", "", explanation]
    missing = [FIGURE_EXPLANATIONS[name][0] for name in FIGURE_EXPLANATIONS if name not in written]
    if missing:
        lines += ["", "Not drawn (the run did not log the data): " + ", ".join(missing) + "."]
    return "\n".join(lines)


def _markdown(logdir: Path, sections: list[str]) -> str:
    header = [
        "# learnscope report",
        "",
        f"Log directory: `{logdir}`",
        "",
        (
            "LCA (loss change allocation, Lan et al. 2019): each parameter's share of the loss change on a step; "
            "negative = helped. NFA (neural feature ansatz): does each layer's WᵀW line up with the average "
            "gradient outer product?"
        ),
    ]
    return "\n".join(header + [""] + ["\n\n".join(sections)]) + "\n"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
