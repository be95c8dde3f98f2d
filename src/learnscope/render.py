"""Measurements drawn as images (pure torch, no Lightning): what a sink writes.

The callbacks hand matrices to the sink (:mod:`learnscope._logging`); they are drawn
here, when they are written.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["heatmap_panels"]


def heatmap_panels(matrices: Sequence[Tensor], *, min_panel_pixels: int = 128, gap: int = 4) -> Tensor:
    """Draw square matrices side by side as one RGB image (3, H, W), values in [0, 1].

    Each panel is scaled by its own largest absolute entry (the NFA compares
    matrices up to scale) and coloured on a diverging map: white 0, red positive,
    blue negative. With v = entry / max |entry|, v⁺ = max(v, 0), v⁻ = max(−v, 0):
    (R, G, B) = (1 − v⁻, 1 − v⁺ − v⁻, 1 − v⁺). Small matrices are enlarged (nearest
    neighbour) to at least ``min_panel_pixels`` pixels per side; panels are separated
    by ``gap`` grey (0.5) columns and padded with white to the tallest.
    """
    panels = [_panel(matrix, min_panel_pixels) for matrix in matrices]
    height = max(panel.shape[1] for panel in panels)
    separator = torch.full((3, height, gap), 0.5)
    row: list[Tensor] = []
    for panel in panels:
        if row:
            row.append(separator)
        padded = torch.ones(3, height, panel.shape[2])
        padded[:, : panel.shape[1]] = panel
        row.append(padded)
    return torch.cat(row, dim=2)


def _panel(matrix: Tensor, min_panel_pixels: int) -> Tensor:
    """One matrix on the diverging map, enlarged by an integer factor (see ``heatmap_panels``)."""
    values = matrix.detach().to(torch.float32).cpu()
    scale = values.abs().max()
    values = values / scale if scale > 0 else values
    positive, negative = values.clamp(min=0), (-values).clamp(min=0)
    rgb = torch.stack([1 - negative, 1 - positive - negative, 1 - positive]).clamp(0, 1)
    factor = max(1, math.ceil(min_panel_pixels / max(values.shape)))
    return rgb.repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2)
