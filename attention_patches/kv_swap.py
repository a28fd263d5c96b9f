"""Visual Style Prompting: the target keeps its queries and attends to the reference's keys and values."""

from dataclasses import dataclass

import torch

from .attention import AttentionFunction
from .reference import ReferenceFeatures


@dataclass(frozen=True)
class KeyValueSwap:
    """strength 1 is the paper; below 1 the output moves linearly back toward plain self-attention."""

    strength: float = 1.0
    key_sources = ("reference",)  # the swapped attention's keys; the plain call at strength < 1 comes second

    def __call__(
        self, query, key, value, reference: ReferenceFeatures, heads: int, attention: AttentionFunction, attn_precision=None,
        timestep: float | None = None,
    ) -> torch.Tensor:
        batch = query.shape[0]
        styled = attention(
            query, reference.key.expand(batch, -1, -1), reference.value.expand(batch, -1, -1), heads, attn_precision=attn_precision
        )
        if self.strength == 1.0:
            return styled
        plain = attention(query, key, value, heads, attn_precision=attn_precision)
        return torch.lerp(plain, styled, self.strength)
