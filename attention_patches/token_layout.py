"""Which rows of one attention call are what, and the positions ComfyUI gave them.

A UNet's self-attention sees one image's tokens alone. A DiT's joint attention (Flux, Chroma) sees
[text | image | extra]: the prompt's tokens first, then the image's own, then anything after them
(Kontext's reference-image tokens); its queries and keys arrive with rotary positions (RoPE) already
applied. Methods act on the image rows and leave the others as the model made them; where a method
must see features without their positions (StyleAligned's AdaIN statistics, as AlignedGen takes them
after QK-norm and before RoPE) the layout removes the rotation and puts it back.

Features are (batch, rows, heads * dim_head) here; a rotation is ComfyUI's (1 | batch, 1, rows,
dim_head / 2, 2, 2) matrices, each a 2x2 rotation of one channel pair of every head.
"""

from dataclasses import dataclass

import torch

from .feature_store import register_feature_type
from .reference import ReferenceFeatures


def rotate(features: torch.Tensor, rotation: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Each channel pair of each head turned by its row's matrix, in float32, cast to dtype (default
    features' own)."""
    batch, rows, inner = features.shape
    pairs = rotation.shape[-3]
    heads = inner // (2 * pairs)
    # (1 | batch, 1, 1 | rows, pairs, 2, 2) -> broadcast over heads
    matrices = rotation.reshape(rotation.shape[0], rotation.shape[2], 1, pairs, 2, 2).float()
    x = features.float().reshape(batch, rows, heads, pairs, 1, 2)
    turned = matrices[..., 0] * x[..., 0] + matrices[..., 1] * x[..., 1]
    return turned.reshape(batch, rows, inner).to(dtype or features.dtype)


def unrotate(features: torch.Tensor, rotation: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """rotate's inverse (a rotation's inverse is its transpose)."""
    return rotate(features, rotation.transpose(-1, -2), dtype)


@register_feature_type
@dataclass(frozen=True)
class PositionedFeatures(ReferenceFeatures):
    """A DiT reference's image rows as the attention call saw them (queries and keys rotated), and the
    rotation of those rows: what a method needs to see them without their positions."""

    rotation: torch.Tensor  # (1, 1, rows, dim_head / 2, 2, 2)


@dataclass(frozen=True)
class TokenGrid:
    """A DiT model call's tokens, read once per call from its inputs: text tokens first, then the
    image's height x width tokens (then any extra ones)."""

    text: int
    height: int
    width: int


@dataclass(frozen=True)
class TokenLayout:
    """text rows first, then image rows (None: every row after the text), then extra rows.

    rotation: the RoPE ComfyUI applied to this call's queries and keys (every row), or None (UNet).
    beside: the rotation that moves a position one image width to the right on the width axis
    (StyleAligned on a DiT places the reference's keys there), or None where there is no such axis.
    """

    text: int = 0
    image: int | None = None
    rotation: torch.Tensor | None = None
    beside: torch.Tensor | None = None

    @property
    def whole_image(self) -> bool:
        """Every row is an image token with no position of its own in the features (UNet self-attention)."""
        return self.text == 0 and self.image is None and self.rotation is None

    def image_rows(self, rows: int) -> slice:
        return slice(self.text, rows if self.image is None else self.text + self.image)

    def reference_of(self, query, key, value, kept: bool = False) -> ReferenceFeatures:
        """What a reference item's call leaves for its targets: its image rows (and their rotation).

        kept (a recording that outlives the call): copies of their own, since a DiT's image rows are
        views of larger tensors (a single block's values of its whole fused projection), which a store
        would otherwise hold whole while counting only the rows."""
        if self.whole_image:
            return ReferenceFeatures(query, key, value)
        image = self.image_rows(query.shape[1])
        rows = [t[:, image].clone() if kept else t[:, image] for t in (query, key, value)]
        if self.rotation is None:
            return ReferenceFeatures(*rows)
        rotation = self.rotation[:1, :, image]
        return PositionedFeatures(*rows, rotation.clone() if kept else rotation)

    def with_image(self, features: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """features with their image rows replaced by image (any number of rows, broadcast over the batch)."""
        if self.whole_image:
            return image.expand(features.shape[0], -1, -1)
        rows = self.image_rows(features.shape[1])
        image = image.expand(features.shape[0], -1, -1)
        return torch.cat([features[:, :rows.start], image, features[:, rows.stop:]], dim=1)

    def unpositioned(self, features: torch.Tensor) -> torch.Tensor:
        """The image rows without their rotation (as they were before RoPE), in float32 where rotated (so a
        method and positioned round them once)."""
        image = features[:, self.image_rows(features.shape[1])]
        if self.rotation is None:
            return image
        return unrotate(image, self.rotation[:, :, self.image_rows(features.shape[1])], torch.float32)

    def positioned(self, features: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """features with their image rows replaced by image (unpositioned), rotated back into place, in
        features' dtype."""
        rows = self.image_rows(features.shape[1])
        if self.rotation is not None:
            image = rotate(image, self.rotation[:, :, rows], features.dtype)
        return self.with_image(features, image)


def unpositioned_reference(reference: ReferenceFeatures) -> tuple[torch.Tensor, torch.Tensor]:
    """A reference's (query, key) without their rotation (in float32), where they have one."""
    if isinstance(reference, PositionedFeatures):
        return (unrotate(reference.query, reference.rotation, torch.float32),
                unrotate(reference.key, reference.rotation, torch.float32))
    return reference.query, reference.key


UNET_LAYOUT = TokenLayout()
# The transformer_options entry through which a DiT site hands its StyledAttention the call's layout.
LAYOUT_OPTION = "style_attention_nodes.token_layout"
