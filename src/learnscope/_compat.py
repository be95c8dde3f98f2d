"""Every private API of torch, Lightning and TensorBoard that learnscope uses, in one
place, each with why it is needed and the public alternative it waits for.

tests/test_compat.py exercises each one, so that a library release that renames or
changes one fails there, loudly, rather than somewhere inside a probe pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

from torch import Tensor, nn

__all__ = [
    "logger_prefix",
    "reparametrized",
    "summary_file_writer",
    "tensor_version",
    "validation_data_source",
]


@contextlib.contextmanager
def reparametrized(module: nn.Module, tensors: Mapping[str, Tensor], *, tie_weights: bool = False) -> Iterator[None]:
    """Bind ``tensors`` (qualified names) in place of ``module``'s parameters or buffers
    for the duration of the block.

    Private: ``torch.nn.utils.stateless._reparametrize_module``. The public
    ``torch.func.functional_call`` binds and unbinds around one call; a probe
    evaluation binds the parameters once and re-binds only the cloned buffers for each
    chunk, and calls ``training_step`` (not ``forward``) under the binding. Waits for a
    public context-manager form of ``functional_call``."""
    from torch.nn.utils.stateless import _reparametrize_module

    with _reparametrize_module(module, dict(tensors), tie_weights=tie_weights):
        yield


def tensor_version(tensor: Tensor) -> int:
    """The in-place modification counter of ``tensor`` (bumped by every in-place op).

    Private: ``Tensor._version``. LCA uses it to know that no parameter changed between
    the end of one measured step and the start of the next, so the end point's probe
    gradient can be reused. No public alternative exists; without it every step would
    pay one more probe gradient (or compare whole parameter copies)."""
    return int(tensor._version)


def summary_file_writer(writer: Any) -> Any:
    """The event-file writer behind a ``torch.utils.tensorboard.SummaryWriter``.

    Private: ``SummaryWriter._get_file_writer()``. Used to write one ``Summary`` proto
    holding every scalar of a step (one event instead of one event per tag, which is
    what makes per-step logging of hundreds of tags affordable). The public
    alternative, ``add_scalar`` per tag, is the fallback when this is absent."""
    get = getattr(writer, "_get_file_writer", None)
    return get() if callable(get) else None


def logger_prefix(logger: Any) -> str:
    """The tag prefix a Lightning ``TensorBoardLogger`` adds to every metric ("" when none).

    Private: ``TensorBoardLogger._prefix`` (set by its ``prefix=`` argument, with no
    public getter). learnscope writes its tags past ``log_metrics`` only when there is
    no prefix to honour. Waits for a public ``prefix`` property."""
    return str(getattr(logger, "_prefix", "") or "")


def validation_data_source(trainer: Any) -> Any:
    """The fit loop's record of where validation data comes from (a datamodule, the
    module's ``val_dataloader`` or ``fit(val_dataloaders=...)``), or None.

    Private: ``trainer.fit_loop.epoch_loop.val_loop._data_source``. ``probe="val"``
    must fail in ``setup`` when there is no validation data, and build its probe set
    before the first validation run, when ``trainer.val_dataloaders`` is still None.
    Waits for a public "is validation data defined" query on the Trainer."""
    return getattr(trainer.fit_loop.epoch_loop.val_loop, "_data_source", None)
