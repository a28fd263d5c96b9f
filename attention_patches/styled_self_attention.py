"""The self-attention replacement installed at each selected layer: picks the reference, calls the method."""

from dataclasses import dataclass
from typing import Protocol

import torch

from .attention import AttentionFunction
from .layers import SelfAttentionLayer
from .reference import REFERENCE_STORE_OPTION, ReferenceFeatures, in_batch_references


class StyleMethod(Protocol):
    """What a style method does to the targets' self-attention, given the reference's features."""

    def __call__(
        self, query, key, value, reference: ReferenceFeatures, heads: int, attention: AttentionFunction, attn_precision=None
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class SigmaRange:
    """Active for sigma_end < sigma <= sigma_start; empty when the two are equal."""

    sigma_start: float
    sigma_end: float

    def contains(self, sigma: float) -> bool:
        return self.sigma_end < sigma <= self.sigma_start


@dataclass(frozen=True)
class StyledSelfAttention:
    """Replaces one self-attention layer (a ComfyUI attn1 replace patch).

    in_batch: item 0 of each cond/uncond chunk is the reference of the others. Otherwise the
    reference comes from the store an external reference pass put in transformer_options.
    """

    layer: SelfAttentionLayer
    method: StyleMethod
    active_range: SigmaRange
    attention: AttentionFunction
    in_batch: bool

    def __call__(self, query, key, value, extra_options: dict) -> torch.Tensor:
        heads = extra_options["n_heads"]
        precision = extra_options.get("attn_precision")
        store = extra_options.get(REFERENCE_STORE_OPTION)
        if not self.active_range.contains(float(extra_options["sigmas"][0])) or (store is None and not self.in_batch):
            return self.attention(query, key, value, heads, attn_precision=precision)
        if store is not None:
            if store.recording:
                store.record(self.layer, ReferenceFeatures(query, key, value))
                return self.attention(query, key, value, heads, attn_precision=precision)
            return self.method(query, key, value, store.get(self.layer), heads, self.attention, precision)

        outputs = []
        for ref, targets in in_batch_references(query.shape[0], extra_options["cond_or_uncond"]):
            reference = ReferenceFeatures(query[ref], key[ref], value[ref])
            outputs.append(self.attention(query[ref], key[ref], value[ref], heads, attn_precision=precision))
            outputs.append(
                self.method(query[targets], key[targets], value[targets], reference, heads, self.attention, precision)
            )
        return torch.cat(outputs)
