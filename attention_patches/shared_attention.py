"""StyleAligned (Hertz et al. 2024): each target attends to [itself ; reference], with AdaIN of its
queries and keys (optionally values) toward the reference's statistics."""

from dataclasses import dataclass

import torch

from .attention import AttentionFunction
from .precision import at_least_float32
from .reference import ReferenceFeatures
from .reference_set import WeightedReferences, as_weighted, mixture, moments
from .token_layout import UNET_LAYOUT, TokenLayout, rotate, unpositioned_reference

ADAIN_EPS = 1e-5


def mean_std(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel, over tokens: (batch, tokens, channels) -> (batch, 1, channels) each, in float32
    (float64 for float64 input).

    The unbiased variance plus 1e-5 under the root, as the original code computes it. Two passes
    (mean, then squared deviations; reference_set.moments): torch.var_mean is about ten times slower on
    the CPU. In at least float32 (precision.py; a no-op for float32): in float16 the sum of squared
    deviations overflows (65504) once a channel's std exceeds about 4 at 4096 tokens, and 1e-5 is subnormal.
    """
    mean, variance = moments(features)
    return mean, (variance + ADAIN_EPS).sqrt()


def mixture_mean_std(members: list[torch.Tensor], proportions: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """mean_std of the references' mixture (reference_set.mixture; one reference: its own, exactly)."""
    if len(members) == 1:
        return mean_std(members[0])
    mean, variance = mixture([moments(m) for m in members], proportions)
    return mean, (variance + ADAIN_EPS).sqrt()


def adain(features: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Give each channel of features the reference's mean and standard deviation over tokens."""
    return adain_to(features, *mean_std(reference))


def adain_to(features: torch.Tensor, reference_mean: torch.Tensor, reference_std: torch.Tensor) -> torch.Tensor:
    """Give each channel of features this mean and standard deviation over tokens.

    Computed in at least float32 and cast back to features' dtype: the statistics overflow in
    float16, and the scale (reference std / own std) can pass 65504 for a near-constant channel."""
    upcast = at_least_float32(features)  # once: mean_std's own upcast is then a no-op
    mean, std = mean_std(upcast)
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

    Several references (reference_set.WeightedReferences): every reference's keys and values are appended,
    reference i's scores shifted by score_shift + log w_i, and AdaIN moves toward the references' mixture
    moments (proportions w_i / sum w).
    """

    share_attention: bool = True
    adain_queries: bool = True
    adain_keys: bool = True
    adain_values: bool = False
    score_scale: float = 1.0
    score_shift: float = 0.0
    reference_beside: bool = True

    def __call__(
        self, query, key, value, reference: ReferenceFeatures | WeightedReferences, heads: int,
        attention: AttentionFunction, attn_precision=None, timestep: float | None = None, layout: TokenLayout = UNET_LAYOUT,
    ) -> torch.Tensor:
        references = as_weighted(reference)
        members, proportions = references.members, references.proportions
        if self.adain_queries or self.adain_keys:
            unpositioned = [unpositioned_reference(member) for member in members]
        if self.adain_queries:
            toward = mixture_mean_std([q for q, _ in unpositioned], proportions)
            query = layout.positioned(query, adain_to(layout.unpositioned(query), *toward))
        if self.adain_keys:
            toward = mixture_mean_std([k for _, k in unpositioned], proportions)
            key = layout.positioned(key, adain_to(layout.unpositioned(key), *toward))
        if self.adain_values:
            toward = mixture_mean_std([member.value for member in members], proportions)
            value = layout.with_image(value, adain_to(value[:, layout.image_rows(value.shape[1])], *toward))
        if not self.share_attention:
            return attention(query, key, value, heads, attn_precision=attn_precision)
        batch = query.shape[0]
        shared_key = references.key
        if self.reference_beside and layout.beside is not None:
            shared_key = rotate(shared_key, layout.beside)
        # float32, so log 2 is not rounded to 0.6929 before a kernel upcast to float32 (attn_precision);
        # the kernel casts it to the dtype it computes in
        bias = references.score_bias(before=key.shape[1], shift=self.score_shift, device=query.device)
        key = torch.cat([key, self.score_scale * shared_key.expand(batch, -1, -1)], dim=1)
        value = torch.cat([value, references.value.expand(batch, -1, -1)], dim=1)
        return attention(query, key, value, heads, attn_precision=attn_precision, bias=bias)

    @property
    def key_sources(self) -> tuple[str, ...]:
        return ("self", "reference") if self.share_attention else ("self",)
