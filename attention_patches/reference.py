"""Where a target's reference features come from, at one self-attention layer and one step.

Two sources:
- in the batch: item 0 of every cond/uncond chunk is the reference of the rest of that chunk;
- external: a separate forward pass of the reference records its features per layer
  (ReferenceFeatureStore), and the targets' pass replays them.
"""

from dataclasses import dataclass, field

import torch

from .feature_store import register_feature_type


class StyleReferenceError(ValueError):
    """A batch layout or a recording a reference cannot work with."""


@register_feature_type
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
        raise StyleReferenceError(f"a batch of {batch_size} cannot hold {chunks} equal cond/uncond chunks")
    size = batch_size // chunks
    return [slice(i * size, (i + 1) * size) for i in range(chunks)]


def in_batch_references(batch_size: int, cond_or_uncond: list[int]) -> list[tuple[slice, slice]]:
    """(reference, targets) per chunk: item 0 of each cond/uncond chunk is the reference of the rest."""
    pairs = []
    for chunk in batch_chunks(batch_size, cond_or_uncond):
        if chunk.stop - chunk.start < 2:
            raise StyleReferenceError(
                "in-batch reference needs a latent batch of at least 2 (item 0 is the reference, the rest "
                "are targets); got 1. Raise batch_size, or connect a reference"
            )
        pairs.append((slice(chunk.start, chunk.start + 1), slice(chunk.start + 1, chunk.stop)))
    return pairs


@dataclass
class ReferenceFeatureStore:
    """What an external reference's pass leaves for the targets' pass at one step.

    Keys name the place: a SelfAttentionLayer for attention features, a module path for a norm's input.
    """

    recording: bool = True
    features: dict = field(default_factory=dict)

    def record(self, key, value) -> None:
        self.features[key] = value

    def replay(self) -> "ReferenceFeatureStore":
        return ReferenceFeatureStore(recording=False, features=self.features)

    def get(self, key):
        try:
            return self.features[key]
        except KeyError:
            raise StyleReferenceError(f"the reference pass recorded nothing at {key}") from None
