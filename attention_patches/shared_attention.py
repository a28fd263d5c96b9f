"""StyleAligned (Hertz et al. 2024): each target attends to [itself ; reference], with AdaIN of its
queries and keys (optionally values) toward the reference's statistics."""

from dataclasses import dataclass

import torch

from .attention import AttentionFunction
from .precision import at_least_float32
from .reference import ReferenceFeatures
from .token_layout import UNET_LAYOUT, TokenLayout, rotate, unpositioned_reference

ADAIN_EPS = 1e-5


def mean_std(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel, over tokens: (batch, tokens, channels) -> (batch, 1, channels) each, in float32
    (float64 for float64 input).

    The unbiased variance plus 1e-5 under the root, as the original code computes it. Two passes
    (mean, then squared deviations): torch.var_mean is about ten times slower on the CPU. In at
    least float32 (precision.py; a no-op for float32): in float16 the sum of squared deviations
    overflows (65504) once a channel's std exceeds about 4 at 4096 tokens, and 1e-5 is subnormal.
    """
    features = at_least_float32(features)
    mean = features.mean(dim=1, keepdim=True)
    variance = (features - mean).square().sum(dim=1, keepdim=True) / (features.shape[1] - 1)
    return mean, (variance + ADAIN_EPS).sqrt()


def adain(features: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Give each channel of features the reference's mean and standard deviation over tokens.

    Computed in at least float32 and cast back to features' dtype: the statistics overflow in
    float16, and the scale (reference std / own std) can pass 65504 for a near-constant channel."""
    upcast = at_least_float32(features)  # once: mean_std's own upcast is then a no-op
    mean, std = mean_std(upcast)
    reference_mean, reference_std = mean_std(reference)
    scale = reference_std / std
    return torch.addcmul(reference_mean - mean * scale, upcast, scale).to(features.dtype)


@dataclass(frozen=True)
class SharedAttention:
    """StyleAligned's self-attention for the targets.

    share_attention: keys and values are [the target's ; the reference's]; otherwise only AdaIN acts.
    score_scale multiplies the reference's keys (its attention scores); score_shift is added to the
    scores of the reference part (the original uses log 2 for transfer from a real image).

    On a DiT's joint attention (AlignedGen's StyleAligned on Flux) AdaIN acts on the image rows alone,
    on the features without their rotary positions (AlignedGen: after QK-norm, before RoPE), and the
    reference's image keys and values are appended to every row's; reference_beside puts the appended
    keys one image width to the right of the target (AlignedGen), off they keep the reference's own
    positions, on top of the target's. AlignedGen's style factor (1.1) is score_scale.
    """

    share_attention: bool = True
    adain_queries: bool = True
    adain_keys: bool = True
    adain_values: bool = False
    score_scale: float = 1.0
    score_shift: float = 0.0
    reference_beside: bool = True

    def __call__(
        self, query, key, value, reference: ReferenceFeatures, heads: int, attention: AttentionFunction, attn_precision=None,
        timestep: float | None = None, layout: TokenLayout = UNET_LAYOUT,
    ) -> torch.Tensor:
        if self.adain_queries or self.adain_keys:
            reference_query, reference_key = unpositioned_reference(reference)
        if self.adain_queries:
            query = layout.positioned(query, adain(layout.unpositioned(query), reference_query))
        if self.adain_keys:
            key = layout.positioned(key, adain(layout.unpositioned(key), reference_key))
        if self.adain_values:
            value = layout.with_image(value, adain(value[:, layout.image_rows(value.shape[1])], reference.value))
        if not self.share_attention:
            return attention(query, key, value, heads, attn_precision=attn_precision)
        batch = query.shape[0]
        shared_key = reference.key
        if self.reference_beside and layout.beside is not None:
            shared_key = rotate(shared_key, layout.beside)
        key = torch.cat([key, self.score_scale * shared_key.expand(batch, -1, -1)], dim=1)
        value = torch.cat([value, reference.value.expand(batch, -1, -1)], dim=1)
        if self.score_shift == 0.0:
            return attention(query, key, value, heads, attn_precision=attn_precision)
        # float32, so log 2 is not rounded to 0.6929 before a kernel upcast to float32 (attn_precision);
        # the kernel casts it to the dtype it computes in
        bias = torch.zeros(key.shape[1], dtype=torch.float32, device=query.device)
        bias[key.shape[1] - reference.key.shape[1]:] = self.score_shift
        return attention(query, key, value, heads, attn_precision=attn_precision, bias=bias)

    @property
    def key_sources(self) -> tuple[str, ...]:
        return ("self", "reference") if self.share_attention else ("self",)
