"""Where a target's reference features come from, at one self-attention layer and one step.

Two sources:
- in the batch: item 0 of every cond/uncond chunk is the reference of the rest of that chunk;
- external: a separate forward pass of the reference records its features per layer
  (ReferenceFeatureStore), and the targets' pass replays them.
"""

from dataclasses import dataclass, field

import torch

from .layers import SelfAttentionLayer

# The transformer_options entry through which the reference pass and the targets' pass share a store.
REFERENCE_STORE_OPTION = "style_attention_reference_store"


class ReferenceError(ValueError):
    pass


@dataclass(frozen=True)
class ReferenceFeatures:
    """A reference's self-attention inputs at one layer: (1, tokens, heads * dim_head) each."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor


def batch_chunks(batch_size: int, cond_or_uncond: list[int]) -> list[slice]:
    """The batch slices ComfyUI stacked, one per entry of extra_options["cond_or_uncond"]."""
    chunks = len(cond_or_uncond)
    if chunks == 0 or batch_size % chunks:
        raise ReferenceError(f"a batch of {batch_size} cannot hold {chunks} equal cond/uncond chunks")
    size = batch_size // chunks
    return [slice(i * size, (i + 1) * size) for i in range(chunks)]


@dataclass
class ReferenceFeatureStore:
    """Features of an external reference at one step, written by its pass and read by the targets'."""

    recording: bool = True
    features: dict[SelfAttentionLayer, ReferenceFeatures] = field(default_factory=dict)

    def record(self, layer: SelfAttentionLayer, query, key, value) -> None:
        self.features[layer] = ReferenceFeatures(query, key, value)

    def replay(self) -> "ReferenceFeatureStore":
        return ReferenceFeatureStore(recording=False, features=self.features)

    def get(self, layer: SelfAttentionLayer) -> ReferenceFeatures:
        try:
            return self.features[layer]
        except KeyError:
            raise ReferenceError(f"the reference pass recorded nothing at layer {layer}") from None
