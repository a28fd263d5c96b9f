"""Prompt-to-prompt's local blend (Hertz et al. 2022, as StyleDiffusion's code runs it), pure torch:
after each step from start on, the target's latent keeps the source's outside the region where the
blend words attend. The region: the cond cross-attention maps of the blend layers (the coarsest
level, 16x16 at 512 px on SD1.5), summed over heads, layers and the steps so far, each row's words
summed; 3x3 max-pooled, resized to the latent (nearest), divided by its maximum, above threshold;
the source's words' region and the target's together.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .reference import StyleReferenceError


@dataclass
class BlendMaps:
    """The local blend's maps: the cond rows' cross-attention at the blend layers, summed over heads,
    layers and steps, each row's word positions summed (rows, queries); spatial: (height, width)."""

    words: torch.Tensor  # (rows, keys): 1 at each row's blend words
    sum: torch.Tensor | None = None
    spatial: tuple[int, int] | None = None

    def add(self, maps: torch.Tensor, spatial: tuple[int, int]) -> None:
        """maps: (rows, heads, queries, keys) of one layer."""
        weighted = (maps.float() * self.words.to(maps.device)[:, None, None, :]).sum(-1).sum(1)
        self.sum = weighted if self.sum is None else self.sum + weighted
        self.spatial = spatial


def layer_spatial(queries: int, original_shape) -> tuple[int, int]:
    """The (height, width) of a layer with this many queries in a UNet call on a latent of original_shape."""
    height, width = original_shape[-2], original_shape[-1]
    while height * width > queries:
        height, width = (height + 1) // 2, (width + 1) // 2
    if height * width != queries:
        raise StyleReferenceError(f"a layer of {queries} positions does not fit a {original_shape[-2]}x"
                                  f"{original_shape[-1]} latent")
    return height, width



def blend_mask(maps: BlendMaps, latent_size: tuple[int, int], threshold: float) -> torch.Tensor:
    """(1, 1, height, width) of the latent, 1 where the target keeps its own latent."""
    if maps.sum is None:
        raise StyleReferenceError("the local blend's layers recorded no cross-attention maps")
    rows = maps.sum.reshape(-1, 1, *maps.spatial)
    pooled = F.max_pool2d(rows, 3, stride=1, padding=1)
    resized = F.interpolate(pooled, size=latent_size)
    peak = resized.amax(dim=(2, 3), keepdim=True).clamp_min(torch.finfo(resized.dtype).tiny)
    above = (resized / peak) > threshold
    return above.any(dim=0, keepdim=True).to(rows.dtype)


def blended(source: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The target's latent inside the mask, the source's outside."""
    return source + mask.to(target) * (target - source)
