"""Image-resolution masks at the latent's resolution: one rule for every consumer.

A MASK from a segmenter has the image's size; VAE Encode crops an image to a multiple of 8 around
its centre before encoding, so the mask is cropped the same way, then each latent pixel takes the
mean of the 8x8 image pixels it covers (a hard mask's edge pixels get the fraction covered). The
authors' code resizes its masks with bilinear interpolation and keeps every pixel above zero; the
"any" edge rule does that.
"""

import torch

LATENT_FACTOR = 8  # SD1.x, SD2.x and SDXL VAEs
EDGE_RULES = ("coverage", "any")


class MaskSizeError(ValueError):
    pass


def crop_like_vae_encode(mask: torch.Tensor, height: int, width: int, factor: int = LATENT_FACTOR) -> torch.Tensor:
    """mask (batch, H, W) cropped around its centre to (height * factor, width * factor), as VAE Encode
    crops the image; any other size is an error."""
    target_h, target_w = height * factor, width * factor
    top, left = (mask.shape[-2] - target_h), (mask.shape[-1] - target_w)
    if not (0 <= top < factor and 0 <= left < factor):
        raise MaskSizeError(
            f"is {mask.shape[-2]}x{mask.shape[-1]} pixels; the latent is {height}x{width}, an image of "
            f"{target_h}x{target_w} (up to {target_h + factor - 1}x{target_w + factor - 1} before VAE Encode's crop): "
            "segment the image that was encoded")
    top, left = top // 2, left // 2
    return mask[..., top:top + target_h, left:left + target_w]


def latent_mask(mask: torch.Tensor, height: int, width: int, edges: str = "coverage",
                factor: int = LATENT_FACTOR) -> torch.Tensor:
    """(batch, 1, height, width) float mask in [0, 1] for a latent of that size, from a MASK
    (batch, H, W) or (H, W) of the encoded image's size."""
    if edges not in EDGE_RULES:
        raise ValueError(f"edges must be one of {EDGE_RULES}, not {edges!r}")
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3:
        raise MaskSizeError(f"has shape {tuple(mask.shape)}; a MASK is (batch, height, width)")
    cropped = crop_like_vae_encode(mask.float().clamp(0, 1), height, width, factor)
    pooled = torch.nn.functional.avg_pool2d(cropped[:, None], factor)
    if edges == "any":
        pooled = (pooled > 0).to(pooled)
    return pooled


def per_image(mask: torch.Tensor, batch: int, chunks: int) -> torch.Tensor:
    """A latent mask (1 or batch images) laid out for a model call of `chunks` cond/uncond chunks of
    `batch` images each."""
    if mask.shape[0] not in (1, batch):
        raise MaskSizeError(f"holds {mask.shape[0]} masks for a batch of {batch} latents: give one mask, or one per latent")
    return mask.expand(batch, -1, -1, -1).repeat(chunks, 1, 1, 1)
