"""The loss curve of a fit as an image (a ComfyUI IMAGE tensor), drawn with PIL."""

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

WIDTH, HEIGHT, MARGIN = 640, 360, 48


def moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def loss_plot(losses: list[float], title: str) -> torch.Tensor:
    """(1, HEIGHT, WIDTH, 3) in [0, 1]: every step's loss in grey, a moving average in blue."""
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    try:
        font = ImageFont.load_default(size=14)  # Pillow >= 10.1 draws its built-in font at any size
    except TypeError:
        font = ImageFont.load_default()
    left, top, right, bottom = MARGIN, MARGIN // 2, WIDTH - MARGIN // 2, HEIGHT - MARGIN
    draw.rectangle((left, top, right, bottom), outline="black")
    low, high = min(losses), max(losses)
    span = (high - low) or 1.0

    def point(i, value):
        x = left + (right - left) * (i / max(1, len(losses) - 1))
        return x, bottom - (bottom - top) * ((value - low) / span)

    smooth = moving_average(losses, max(1, len(losses) // 20))
    for values, colour in ((losses, (170, 170, 170)), (smooth, (30, 90, 200))):
        if len(values) > 1:
            draw.line([point(i, v) for i, v in enumerate(values)], fill=colour, width=2)
    draw.text((left, 4), title, fill="black", font=font)
    draw.text((4, top), f"{high:.4g}", fill="black", font=font)
    draw.text((4, bottom - 14), f"{low:.4g}", fill="black", font=font)
    draw.text((left, bottom + 6), "step 1", fill="black", font=font)
    draw.text((right - 80, bottom + 6), f"step {len(losses)}", fill="black", font=font)
    draw.text((left + 120, bottom + 6), "loss per step (grey), moving average (blue)", fill="black", font=font)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None]
