"""Which factor makes parameters hurt? The three-factor ablation on the digits MLP.

With (1) the minibatch loss, (2) the first-order estimate and (3) plain SGD, every
allocation is −lr·g² ≤ 0: no parameter can hurt. This script trains the same model
with plain SGD and with SGD-momentum, with ``ablation=True``, and plots the helped
fraction of the four corners {minibatch, probe} × {first order, Simpson} and the
momentum / gradient parts, so each factor's share of "hurting" is visible.

    python examples/ablation.py [--out docs/figures/ablation.png] [--steps 300]
"""

from __future__ import annotations

import argparse
import statistics

import lightning.pytorch as pl
from lightning.pytorch.loggers import Logger
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

import learnscope
from digits import DigitsClassifier, digits_loaders

CORNERS = ("batch_first_order", "batch_simpson", "probe_first_order", "probe_simpson")


class Collect(Logger):
    def __init__(self):
        super().__init__()
        self.series = {}

    name = "collect"
    version = 0

    def log_hyperparams(self, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        for tag, value in metrics.items():
            self.series.setdefault(tag, {})[step] = value


def run(momentum: float, steps: int) -> dict[str, dict[int, float]]:
    pl.seed_everything(0, verbose=False)
    train, _ = digits_loaders()
    logger = Collect()
    trainer = pl.Trainer(
        max_steps=steps,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        callbacks=[learnscope.LossChangeAllocation(probe_size=1024, ablation=True, histograms=False)],
    )
    trainer.fit(DigitsClassifier(lr=0.1, momentum=momentum), train)
    return logger.series


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="docs/figures/ablation.png")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    runs = {"plain SGD": run(0.0, args.steps), "SGD, momentum 0.9": run(0.9, args.steps)}

    figure = Figure(figsize=(11, 4), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 3)
    print(f"{'run':20s} " + " ".join(f"{c:>18s}" for c in CORNERS))
    for column, (title, series) in enumerate(runs.items()):
        means = []
        for corner in CORNERS:
            values = series[f"lca/ablation/{corner}/helped_fraction"]
            steps = sorted(values)
            axes[column].plot(steps, [values[s] for s in steps], label=corner.replace("_", " ", 1), lw=1)
            means.append(statistics.mean(values.values()))
        print(f"{title:20s} " + " ".join(f"{m:18.3f}" for m in means))
        axes[column].set_title(f"{title}: helped fraction")
        axes[column].set_xlabel("step")
        axes[column].axhline(0.5, color="grey", lw=0.5)
        axes[column].set_ylim(0.3, 1.02)
    axes[0].legend(fontsize=8)
    series = runs["SGD, momentum 0.9"]
    for part in ("gradient", "momentum", "weight_decay", "residual"):
        values = series[f"lca/part_cumulative/{part}"]
        steps = sorted(values)
        axes[2].plot(steps, [values[s] for s in steps], label=part)
    axes[2].set_title("momentum 0.9: cumulative LCA by part")
    axes[2].set_xlabel("step")
    axes[2].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
