"""What the learnscope callbacks share: a tag root and a checkpoint identity."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import Callback


class ProbeCallback(Callback):
    """Base of the learnscope callbacks: ``name`` is the root of every tag the callback
    writes (unique among the learnscope callbacks of a Trainer), and the checkpoint
    identity starts with when and on what data it measures."""

    name: str
    every_n_steps: int
    probe: Any

    @property
    def tag_root(self) -> str:
        """The first field of every tag this callback writes (``name``)."""
        return self.name

    def _probe_identity(self) -> dict[str, Any]:
        """``every_n_steps`` and ``probe`` for ``state_key`` (a DataLoader as ``"dataloader"``)."""
        return {
            "every_n_steps": self.every_n_steps,
            "probe": self.probe if isinstance(self.probe, str) else "dataloader",
        }
