"""The segmentation preview: every segment tinted and numbered (largest first, from 0: the numbers
segment_indices takes), the picked region at full brightness, the rest dimmed."""

import colorsys

import numpy as np
import torch
from PIL import Image, ImageDraw

LABELLED = 64  # segments numbered in the preview, largest first


def palette(count: int) -> torch.Tensor:
    return torch.tensor([colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.75, 1.0) for i in range(count)])


def preview(image: torch.Tensor, segments: torch.Tensor, picked: torch.Tensor) -> torch.Tensor:
    """image (H, W, 3) in [0, 1]; segments (N, H, W) largest first; picked (H, W) -> (H, W, 3)."""
    tint = torch.zeros_like(image)
    colours = palette(len(segments)).to(image)
    for index in range(len(segments)):  # largest first, so each smaller segment is painted over it
        tint[segments[index]] = colours[index]
    covered = segments.any(0)[..., None] if len(segments) else torch.zeros_like(picked)[..., None]
    shown = torch.where(covered, image * 0.65 + tint * 0.35, image)
    out = torch.where(picked[..., None], shown, shown * 0.35)
    canvas = Image.fromarray((out.clamp(0, 1) * 255).byte().numpy())
    draw = ImageDraw.Draw(canvas)
    smaller = torch.zeros_like(picked)
    visible = []
    for index in range(len(segments) - 1, -1, -1):  # each number where no smaller segment covers it
        visible.append(segments[index] & ~smaller if (segments[index] & ~smaller).any() else segments[index])
        smaller = smaller | segments[index]
    visible.reverse()
    for index in range(min(len(segments), LABELLED)):
        rows, columns = torch.nonzero(visible[index], as_tuple=True)
        if len(rows):
            x, y = int(columns.float().median()), int(rows.float().median())
            draw.text((x, y), str(index), fill=(255, 255, 255), stroke_width=1, stroke_fill=(0, 0, 0))
    return torch.from_numpy(np.asarray(canvas).copy()).float() / 255
