"""StyleKeeper's negative visual query guidance (Jeong et al. 2025), at one self-attention layer: the
negative branch simulates content leakage by giving the targets the reference's queries while they
keep their own keys and values (the opposite of Visual Style Prompting's swap)."""

from dataclasses import dataclass

import torch

from .attention import AttentionFunction
from .reference import ReferenceFeatures, StyleReferenceError
from .token_layout import UNET_LAYOUT, TokenLayout


@dataclass(frozen=True)
class QuerySwap:
    """softmax(Q_ref K^T / sqrt(d)) V: the reference's layout read out of each target's own features."""

    key_sources = ("self",)

    def __call__(
        self, query, key, value, reference: ReferenceFeatures, heads: int, attention: AttentionFunction, attn_precision=None,
        timestep: float | None = None, layout: TokenLayout = UNET_LAYOUT,
    ) -> torch.Tensor:
        image = layout.image_rows(query.shape[1])
        if reference.query.shape[1:] != query[:, image].shape[1:]:
            raise StyleReferenceError(
                f"nvqg_weight: the reference has {reference.query.shape[1]} tokens at this layer and the targets "
                f"{image.stop - image.start}; swapping queries needs a reference latent of the generated latent's size and "
                "a negative prompt over the whole image (no area or mask bounds)")
        return attention(layout.with_image(query, reference.query), key, value, heads, attn_precision=attn_precision)
