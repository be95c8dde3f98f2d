"""Reading many small device tensors back to Python with one sync per device."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def to_python(tensors: Sequence[Tensor | None]) -> list[list[float]]:
    """``tensor.tolist()`` (flattened, as float64) of each tensor, ``[]`` for None: the
    tensors of each device are concatenated and read back at once, so a step costs one
    device sync per device rather than one per parameter tensor."""
    by_device: dict[torch.device, list[tuple[int, Tensor]]] = {}
    for i, tensor in enumerate(tensors):
        if tensor is not None:
            by_device.setdefault(tensor.device, []).append((i, tensor))
    out: list[list[float]] = [[] for _ in tensors]
    for present in by_device.values():
        flat = torch.cat([tensor.reshape(-1).to(torch.float64) for _, tensor in present]).tolist()
        offset = 0
        for i, tensor in present:
            width = tensor.numel()
            out[i] = flat[offset : offset + width]
            offset += width
    return out
