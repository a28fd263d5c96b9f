"""Visual Style Prompting: the target keeps its queries and attends to the reference's keys and values."""

from dataclasses import dataclass

import torch

from .attention import AttentionFunction
from .reference import ReferenceFeatures
from .reference_set import WeightedReferences, as_weighted
from .token_layout import UNET_LAYOUT, TokenLayout


@dataclass(frozen=True)
class KeyValueSwap:
    """strength 1 is the paper; below 1 the output moves linearly back toward plain self-attention.

    On a DiT's joint attention only the image rows' keys and values are the reference's (Stable Flow's
    swap on Flux): the text rows (and Kontext's extra rows) keep the target's own. The reference's
    keys carry the positions of its own pass; for a reference of the target's size these are the
    target's, which is Stable Flow's swap before RoPE.

    Several references (reference_set.WeightedReferences): the image rows' keys and values are every
    reference's, one after another, reference i's scores shifted by log w_i."""

    strength: float = 1.0
    key_sources = ("reference",)  # the swapped attention's keys; the plain call at strength < 1 comes second

    def __call__(
        self, query, key, value, reference: ReferenceFeatures | WeightedReferences, heads: int,
        attention: AttentionFunction, attn_precision=None, timestep: float | None = None, layout: TokenLayout = UNET_LAYOUT,
    ) -> torch.Tensor:
        references = as_weighted(reference)
        image = layout.image_rows(key.shape[1])
        bias = references.score_bias(before=image.start, after=key.shape[1] - image.stop, device=query.device)
        styled = attention(
            query, layout.with_image(key, references.key), layout.with_image(value, references.value), heads,
            attn_precision=attn_precision, bias=bias,
        )
        if self.strength == 1.0:
            return styled
        plain = attention(query, key, value, heads, attn_precision=attn_precision)
        return torch.lerp(plain, styled, self.strength)
