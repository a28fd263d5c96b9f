"""The style image as the authors feed it: resized so its short side has a given length, not cropped."""

import torch


def fit_size(height: int, width: int, short_side: int, multiple: int = 8) -> tuple[int, int]:
    """(height, width) with the short side short_side (0: as it is), both rounded to the VAE's multiple."""
    if short_side:
        scale = short_side / min(height, width)
        height, width = height * scale, width * scale
    return max(multiple, round(height / multiple) * multiple), max(multiple, round(width / multiple) * multiple)


def resized(images: torch.Tensor, short_side: int, multiple: int = 8) -> torch.Tensor:
    """ComfyUI IMAGE (batch, height, width, channels) resized (bilinear, antialiased like torchvision's Resize)."""
    size = fit_size(images.shape[1], images.shape[2], short_side, multiple)
    if size == tuple(images.shape[1:3]):
        return images
    out = torch.nn.functional.interpolate(images.movedim(-1, 1).float(), size=size, mode="bilinear",
                                          antialias=True, align_corners=False)
    return out.clamp(0, 1).movedim(1, -1)
