"""Where measurements go: scalars to every logger, tensors to TensorBoard writers.

Only plain float scalars reach ``log_metrics`` (a dict value would make
TensorBoardLogger call ``add_scalars`` and create one run directory per key).
Histograms, images and tensor summaries go through ``TensorBoardLogger.experiment`` on
rank zero only (other loggers do not get them); images are drawn here, from the matrices
a record carries, when they are written.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from torch import Tensor

from learnscope import contract
from learnscope._compat import logger_prefix, summary_file_writer
from learnscope.render import labelled_panels


def log_scalars(trainer: pl.Trainer, metrics: Mapping[str, float], step: int) -> None:
    """Write float scalars at ``step`` to every logger the trainer has (rank zero only)."""
    if not trainer.is_global_zero or not trainer.loggers:
        return
    clean = {tag: float(value) for tag, value in metrics.items() if value is not None}
    from lightning.pytorch.loggers import TensorBoardLogger

    for logger in trainer.loggers:
        file_writer = (
            summary_file_writer(logger.experiment)
            if type(logger) is TensorBoardLogger and not logger_prefix(logger)
            else None
        )
        if file_writer is not None:
            # one event holding every value: ~75x cheaper than one add_scalar per tag
            from tensorboard.compat.proto.summary_pb2 import Summary

            values = [Summary.Value(tag=tag, simple_value=value) for tag, value in clean.items()]
            file_writer.add_summary(Summary(value=values), step)
        else:
            logger.log_metrics(clean, step=step)


def tensorboard_writers(trainer: pl.Trainer) -> list[Any]:
    """The SummaryWriters of the trainer's TensorBoard loggers (empty off rank zero)."""
    if not trainer.is_global_zero:
        return []
    from lightning.pytorch.loggers import TensorBoardLogger

    writers = []
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            writers.append(logger.experiment)
    return writers


def log_histograms(trainer: pl.Trainer, values: Mapping[str, Any], step: int) -> None:
    """``add_histogram`` for each tag on every TensorBoard writer; skips empty tensors.
    A value may also be a ``StreamingHistogram`` (built without the values in one tensor)."""
    from learnscope._stats import StreamingHistogram

    for writer in tensorboard_writers(trainer):
        for tag, tensor in values.items():
            if isinstance(tensor, StreamingHistogram):
                tensor.write(writer, tag, step)
                continue
            if tensor.numel() == 0:
                continue
            data = tensor.detach().float().cpu()
            if not bool(data.isfinite().all()):
                data = data[data.isfinite()]
                if data.numel() == 0:
                    continue
            writer.add_histogram(tag, data, global_step=step)


def log_tensors(trainer: pl.Trainer, tensors: Mapping[str, Tensor], step: int) -> None:
    """Write every tag's tensor in one event (:func:`tensor_summary`) on every TensorBoard
    writer (rank zero only)."""
    writers = [w for w in map(summary_file_writer, tensorboard_writers(trainer)) if w is not None]
    if writers and tensors:
        summary = tensor_summary(tensors)
        for file_writer in writers:
            file_writer.add_summary(summary, step)


def tensor_summary(tensors: Mapping[str, Tensor]) -> Any:
    """A ``Summary`` proto holding each tag's tensor as a TensorBoard tensor summary
    (``plugin_name`` :data:`learnscope.contract.TENSOR_PLUGIN`, data class *tensor*): the
    data provider's ``list_tensors`` / ``read_tensors`` and ``EventAccumulator.Tensors``
    return it. Hand it to a writer with ``file_writer.add_summary(summary, step)``."""
    from tensorboard.compat.proto import summary_pb2
    from tensorboard.util import tensor_util

    metadata = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=contract.TENSOR_PLUGIN),
        data_class=summary_pb2.DATA_CLASS_TENSOR,
    )
    values = [
        summary_pb2.Summary.Value(
            tag=tag, metadata=metadata, tensor=tensor_util.make_tensor_proto(value.detach().cpu().numpy())
        )
        for tag, value in tensors.items()
    ]
    return summary_pb2.Summary(value=values)


def log_images(trainer: pl.Trainer, images: Mapping[str, Mapping[str, Tensor]], step: int) -> None:
    """Draw each tag's matrices side by side with their titles and colour scale
    (:func:`learnscope.render.labelled_panels`, in the mapping's order) and ``add_image`` it
    on every TensorBoard writer (rank zero only)."""
    writers = tensorboard_writers(trainer)
    if not writers:
        return
    for tag, matrices in images.items():
        image = labelled_panels(matrices)
        for writer in writers:
            writer.add_image(tag, image, global_step=step, dataformats="CHW")


class DeferredLog:
    """Per-step scalars, histograms and tensors, written in step order a batch at a time.

    Every TensorBoard event wakes the SummaryWriter's background thread, which computes
    TensorBoard's pure-Python CRC32C while holding the GIL: written one per step, that
    costs a fast training loop ≈ 0.3–0.5 ms per step, mostly in hand-offs (measured in
    ``benchmarks/``). Written a batch at a time, the same events (same steps, same
    values) cost about half of that. Nothing waits longer than ``every`` steps or
    ``max_delay`` seconds; ``flush`` writes the rest (end of training, an exception, a
    checkpoint). Off rank zero, or with no logger, nothing is kept.
    """

    def __init__(self, max_delay: float = 2.0) -> None:
        self.max_delay = max_delay
        self._entries: list[tuple[int, Mapping[str, float], Mapping[str, Any] | None, Mapping[str, Tensor] | None]] = []
        self._since = 0.0

    def __len__(self) -> int:
        return len(self._entries)

    def add(
        self,
        trainer: pl.Trainer,
        step: int,
        scalars: Mapping[str, float],
        histograms: Mapping[str, Any] | None = None,
        tensors: Mapping[str, Tensor] | None = None,
    ) -> None:
        if not trainer.is_global_zero or not trainer.loggers:
            return
        if not self._entries:
            self._since = time.monotonic()
        self._entries.append((step, scalars, histograms, tensors))

    def flush_if_due(self, trainer: pl.Trainer, every: int) -> None:
        """Write everything held once the oldest entry is ``every`` steps (``trainer.global_step``)
        or ``max_delay`` seconds old."""
        if self._entries and (
            trainer.global_step - self._entries[0][0] >= every or time.monotonic() - self._since >= self.max_delay
        ):
            self.flush(trainer)

    def flush(self, trainer: pl.Trainer) -> None:
        entries, self._entries = self._entries, []
        for step, scalars, histograms, tensors in entries:
            if scalars:
                log_scalars(trainer, scalars, step=step)
            if histograms:
                log_histograms(trainer, histograms, step=step)
            if tensors:
                log_tensors(trainer, tensors, step=step)


def finite_or_nan(value: float) -> float:
    return value if math.isfinite(value) else math.nan


def write_layout(trainer: pl.Trainer, **layout_options: Any) -> None:
    """Merge this callback's charts into the run's custom-scalar layout (written once per writer)."""
    from learnscope.tensorboard_layout import build_layout, write_layout_once

    for writer in tensorboard_writers(trainer):
        write_layout_once(writer, build_layout(**layout_options))
