"""How accurate is LCA on a BatchNorm ResNet, and why (issue 15, part 2)?

Trains torchvision's resnet18 architecture (tests/zoo/resnet.py, written out) on
sklearn's digits with SGD(lr=0.1, momentum=0.9, weight_decay=5e-4) and a fixed
64-sample probe set, three times with bitwise-identical training: with
``rule="simpson"``, with ``rule="adaptive"`` (tolerance 1e-3, ``max_intervals``
32), and with a recorder that keeps θ_t of every step. For chosen steps it then
integrates the same step densely with a separately written reference:

* the probe loss in float64 on a copy of the network in eval mode whose
  BatchNorm layers have no running statistics (so they always normalise with the
  probe chunk's own statistics: the library's definition, without any buffer);
* dL/ds = ∇L(θ_t + sΔ)·Δ at 257 equally spaced s, composite Simpson over them
  (the "dense" integral), and L(θ_t + sΔ) itself at the same points;
* composite Simpson over 2, 4, ..., 256 intervals from the same points (how fast
  the quadrature converges: 16× per doubling on a smooth path, ≈ 2–4× on a rough one).

Run::

    PYTHONPATH=src python benchmarks/lca_rough_path.py            # width 64, 32×32 (≈ 10 min on 2 cores)
    PYTHONPATH=src python benchmarks/lca_rough_path.py --width 16 --size 8 --stem-stride 1 --steps 12

Prints one table per configuration; docs/accuracy.md quotes the figures.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import Logger
from sklearn.datasets import load_digits
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from learnscope import LossChangeAllocation
from zoo.resnet import resnet18

DENSE = 256  # intervals of the dense reference (257 points)


# --------------------------------------------------------------------------- data, model, training


def digit_images(size: int) -> tuple[Tensor, Tensor]:
    """Standardised digits as 1×size×size images (bilinear upsampling from 8×8)."""
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    x = ((x - x.mean()) / x.std()).reshape(-1, 1, 8, 8)
    if size != 8:
        x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x, torch.tensor(data.target, dtype=torch.long)


class Classifier(pl.LightningModule):
    def __init__(self, net: nn.Module, lr: float) -> None:
        super().__init__()
        self.net, self.lr = net, lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)


class Series(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.series: dict[str, dict[int, float]] = {}

    name, version = "series", 0

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        for tag, value in metrics.items():
            self.series.setdefault(tag, {})[int(step)] = float(value)


class Recorder(pl.Callback):
    """θ_t of every step (at batch start, before the optimizer moves it) and the last θ."""

    def __init__(self) -> None:
        self.thetas: list[dict[str, Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.thetas.append({n: p.detach().clone() for n, p in pl_module.net.named_parameters()})

    def on_train_end(self, trainer, pl_module):
        self.thetas.append({n: p.detach().clone() for n, p in pl_module.net.named_parameters()})


class StepTimer(pl.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, *args):
        self._t = time.perf_counter()

    def on_train_batch_end(self, *args):
        self.times.append(time.perf_counter() - self._t)


def train(args, callbacks, logger=None) -> Classifier:
    x, y = digit_images(args.size)
    torch.manual_seed(0)
    net = resnet18(10, 1, args.width, args.stem_stride)
    if args.smooth:
        smooth(net)
    model = Classifier(net, args.lr)
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    pl.Trainer(
        max_steps=args.steps,
        accelerator="cpu",
        devices=1,
        logger=logger or False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        deterministic=True,
        log_every_n_steps=1,
    ).fit(model, loader)
    return model


def smooth(net: nn.Module) -> None:
    """The same network without kinks: SiLU for every ReLU, average for max pooling."""
    for module in list(net.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.ReLU):
                setattr(module, name, nn.SiLU())
            elif isinstance(child, nn.MaxPool2d):
                setattr(module, name, nn.AvgPool2d(child.kernel_size, child.stride, child.padding))


def probe_data(args) -> tuple[Tensor, Tensor]:
    x, y = digit_images(args.size)
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(7))[: args.probe]
    return x[idx], y[idx]


# --------------------------------------------------------------------------- the reference


def reference_net(net: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy in ``dtype`` in eval mode whose BatchNorms keep no running statistics, so they
    normalise with the batch's own statistics in any mode and read or write no buffer."""
    ref = copy.deepcopy(net).to(dtype).eval()
    for m in ref.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
            m.running_mean = m.running_var = m.num_batches_tracked = None
    return ref


def path_derivative(ref: nn.Module, x: Tensor, y: Tensor, theta: dict, delta: dict, s: float) -> tuple[float, float]:
    """L(θ + sΔ) and dL/ds = ∇L(θ + sΔ)·Δ (the point in float64, rounded to the net's dtype;
    the dot product in float64)."""
    dtype = x.dtype
    point = {n: (theta[n] + s * delta[n]).to(dtype).requires_grad_(True) for n in theta}
    loss = nn.functional.cross_entropy(torch.func.functional_call(ref, point, (x,)), y)
    grads = torch.autograd.grad(loss, list(point.values()))
    slope = sum(float((g.double() * delta[n]).sum()) for g, n in zip(grads, point))
    return float(loss.detach()), slope


def composite_simpson(values: list[float], intervals: int) -> float:
    """Composite Simpson over ``intervals`` (even) panels of [0, 1], from DENSE + 1 samples."""
    stride = DENSE // intervals
    f = values[::stride]
    h = 1.0 / intervals
    return h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))


def dense_step(ref, x, y, start, end) -> dict:
    theta = {n: t.double() for n, t in start.items()}
    delta = {n: end[n].double() - theta[n] for n in start}  # Δ formed in float64 from the float32 iterates
    losses, slopes = zip(*(path_derivative(ref, x, y, theta, delta, j / DENSE) for j in range(DENSE + 1)))
    return {
        "delta_loss": losses[-1] - losses[0],
        "losses": list(losses),
        "slopes": list(slopes),
        "simpson": {n: composite_simpson(list(slopes), n) for n in (2, 4, 8, 16, 32, 64, 128, 256)},
        "step_norm": math.sqrt(sum(float((d**2).sum()) for d in delta.values())),
    }


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--size", type=int, default=32, help="image side (digits upsampled from 8)")
    parser.add_argument("--stem-stride", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--probe", type=int, default=64, help="probe samples (one chunk)")
    parser.add_argument("--dense-steps", type=str, default="0,1,2,5,11")
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64", help="of the reference")
    parser.add_argument("--smooth", action="store_true", help="SiLU for ReLU and average for max pooling (no kinks)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # one thread: OpenMP's spinning makes shared cores far slower
    px, py = probe_data(args)
    probe = DataLoader(TensorDataset(px, py), batch_size=args.probe)

    runs = {}
    for rule in ("simpson", "adaptive"):
        logger, timer = Series(), StepTimer()
        callback = LossChangeAllocation(
            probe=probe, probe_batch_size=args.probe, rule=rule, histograms=False, decompose=False
        )
        model = train(args, [callback, timer], logger)
        state = {n: p.detach().clone() for n, p in model.named_parameters()}
        state.update({f"buffer/{n}": b.clone() for n, b in model.named_buffers()})
        runs[rule] = (logger.series, callback, timer.times, state)
    recorder = Recorder()
    plain = train(args, [recorder])
    final = {n: p.detach() for n, p in plain.named_parameters()}
    final.update({f"buffer/{n}": b for n, b in plain.named_buffers()})
    identical = all(torch.equal(final[n], runs[r][3][n]) for r in runs for n in final)

    params = sum(p.numel() for p in plain.parameters())
    print(
        f"{'smooth (SiLU, average pooling) ' if args.smooth else ''}resnet18 width {args.width}, {args.size}×{args.size} digits, stem stride {args.stem_stride}: {params:,} parameters; "
        f"SGD lr {args.lr}, momentum 0.9, weight decay 5e-4; probe {args.probe} samples; {args.steps} steps"
    )
    print(f"training bitwise identical with each callback: {identical}")
    for rule, (series, callback, times, _) in runs.items():
        # Σ_t |ΣA − ΔL| / Σ_t |ΔL|: unlike the cumulative relative error, no cancellation between steps
        errors = sum(series["lca/abs_error"].values()) / sum(abs(v) for v in series["lca/delta_loss"].values())
        print(
            f"{rule:>8}: cumulative relative error {callback.cumulative_relative_error:.4f}, "
            f"Σ|ΣA − ΔL| / Σ|ΔL| {errors:.4f}, Σ ΔL {sum(series['lca/delta_loss'].values()):+.4f}, "
            f"median step {sorted(times)[len(times) // 2]:.2f} s; capped steps {callback.capped_steps}"
        )

    dtype = getattr(torch, args.dtype)
    ref = reference_net(plain.net, dtype)
    x, y = px.to(dtype), py
    dense_steps = [int(s) for s in args.dense_steps.split(",") if int(s) < args.steps]
    s, a = runs["simpson"][0], runs["adaptive"][0]
    print("\nevery step, library: ΔL, Simpson ΣA and error, adaptive ΣA, error and sub-intervals")
    for t in range(args.steps):
        print(
            f"{t:>4} ΔL {s['lca/delta_loss'][t]:+.4f}  simpson {s['lca/total'][t]:+.4f} ({s['lca/abs_error'][t]:.1e})  "
            f"adaptive {a['lca/total'][t]:+.4f} ({a['lca/abs_error'][t]:.1e}, {a['lca/splits'][t]:.0f})"
        )
    print(
        f"\nper step, the library (float32) against the {args.dtype} dense reference along the same step "
        "(ref S_n: composite Simpson with n intervals on the reference's samples):"
    )
    print(
        f"{'step':>4} {'|Δθ|':>7} {'ΔL lib':>9} {'ΔL ref':>9} {'ΣA simpson':>11} {'ref S2':>9} {'ΣA adapt':>9} {'splits':>6} "
        f"{'ref S_n':>9} {'ref S256':>9} {'S256 err':>9} {'L min on path':>13} {'max|dL/ds|':>10}"
    )
    rows = []
    for t in dense_steps:
        d = dense_step(ref, x, y, recorder.thetas[t], recorder.thetas[t + 1])
        rows.append((t, d))
        n = int(a["lca/splits"][t])
        print(
            f"{t:>4} {d['step_norm']:7.3f} {s['lca/delta_loss'][t]:+9.4f} {d['delta_loss']:+9.4f} {s['lca/total'][t]:+11.4f} "
            f"{d['simpson'][2]:+9.4f} {a['lca/total'][t]:+9.4f} {n:6d} {d['simpson'].get(n, math.nan):+9.4f} {d['simpson'][256]:+9.4f} "
            f"{d['simpson'][256] - d['delta_loss']:+9.1e} {min(d['losses']) - d['losses'][0]:+13.4f} "
            f"{max(abs(v) for v in d['slopes']):10.3f}"
        )
    print("\nconvergence of composite Simpson on the reference samples: |S_n − ΔL| for n intervals")
    print(f"{'step':>4} " + " ".join(f"{n:>9}" for n in (2, 4, 8, 16, 32, 64, 128, 256)))
    for t, d in rows:
        print(
            f"{t:>4} "
            + " ".join(f"{abs(d['simpson'][n] - d['delta_loss']):9.2e}" for n in (2, 4, 8, 16, 32, 64, 128, 256))
        )
    print("\nL(θ_t + sΔ) − L(θ_t) at s = 0, 1/16, ..., 1 (the loss along the step):")
    for t, d in rows:
        print(f"{t:>4} " + " ".join(f"{v - d['losses'][0]:+.2f}" for v in d["losses"][:: DENSE // 16]))
    print("\ndL/ds at s = 0, 1/16, ..., 1:")
    for t, d in rows:
        print(f"{t:>4} " + " ".join(f"{v:+.2f}" for v in d["slopes"][:: DENSE // 16]))


if __name__ == "__main__":
    main()
