"""Measurements drawn as images (pure torch, no Lightning): what a sink writes.

The callbacks hand matrices to the sink (:mod:`learnscope._logging`); they are drawn
here, when they are written.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["TITLE_HEIGHT", "heatmap_panels", "labelled_panels", "matrix_title"]

#: pixels of the title band above the panels and of the colour-scale band below them
TITLE_HEIGHT = 16


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
    factor = _enlargement(values.shape, min_panel_pixels)
    return rgb.repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2)


def _enlargement(shape: Sequence[int], min_panel_pixels: int) -> int:
    """The integer factor that enlarges a matrix to at least ``min_panel_pixels`` per side."""
    return max(1, math.ceil(min_panel_pixels / max(shape)))


def matrix_title(key: str) -> str:
    """A panel's title for a :func:`~learnscope.functional.nfa.feature_matrices` key, in
    ASCII (TensorBoard's image viewer and the bitmap font have no superscripts)."""
    if key == "nfm":
        return "W^T W"
    if key.startswith("agop_a"):
        return f"AGOP^{key.removeprefix('agop_a')}"
    return key


def labelled_panels(matrices: Mapping[str, Tensor], *, min_panel_pixels: int = 128, gap: int = 4) -> Tensor:
    """:func:`heatmap_panels` with a title band above each panel (its name and the largest
    |entry| its colours are scaled to) and a colour-scale band below: blue −max, white 0,
    red +max. The panels' pixels are those of :func:`heatmap_panels`, offset by
    :data:`TITLE_HEIGHT` rows. Without Pillow (which TensorBoard's image summaries need
    anyway) the panels are returned bare."""
    panels = heatmap_panels(list(matrices.values()), min_panel_pixels=min_panel_pixels, gap=gap)
    try:
        import numpy as np
        from PIL import Image, ImageDraw, ImageFont
    except ImportError:  # pragma: no cover - torch.utils.tensorboard's add_image needs Pillow too
        return panels
    _, height, width = panels.shape
    canvas = torch.ones(3, height + 2 * TITLE_HEIGHT, width)
    canvas[:, TITLE_HEIGHT : TITLE_HEIGHT + height] = panels
    bar = min(96, width // 3)  # the colour bar's length, from x = 4
    _colour_bar(canvas, top=TITLE_HEIGHT + height + 3, left=4, length=bar, height=TITLE_HEIGHT - 6)
    # to bytes as TensorBoard's image summary does (× 255, truncated), so the panels keep their pixels
    image = Image.fromarray((canvas.permute(1, 2, 0).numpy() * 255).clip(0, 255).astype("uint8"))
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    left = 0
    for key, matrix in matrices.items():
        side = max(matrix.shape) * _enlargement(matrix.shape, min_panel_pixels)
        scale = float(matrix.detach().abs().max())
        draw.text((left + 2, 2), f"{matrix_title(key)}  max|x| {scale:.2g}", fill=(0, 0, 0), font=font)
        left += side + gap
    draw.text((4 + bar + 4, TITLE_HEIGHT + height + 2), "-max .. 0 .. +max (each panel)", fill=(0, 0, 0), font=font)
    # + ½: the summary's × 255 and truncation give back exactly these bytes
    return (torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).to(torch.float32) + 0.5) / 255


def _colour_bar(canvas: Tensor, *, top: int, left: int, length: int, height: int) -> None:
    """The panels' diverging map from −1 (blue) through 0 (white) to +1 (red), drawn into ``canvas``."""
    values = torch.linspace(-1, 1, length)
    positive, negative = values.clamp(min=0), (-values).clamp(min=0)
    rgb = torch.stack([1 - negative, 1 - positive - negative, 1 - positive]).clamp(0, 1)
    canvas[:, top : top + height, left : left + length] = rgb[:, None, :]
