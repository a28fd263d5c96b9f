"""StyleDiffusion's value input (Li et al. 2023; the authors' stylediffusion.py): the keys of every
cross-attention layer keep the prompt's embedding, so its maps stay the prompt's, while the value
projection takes context * scale + shift, a per-token, per-channel modulation learned for each step
to reconstruct a real image. Only the conditional rows are modulated; the unconditional rows keep the
plain embedding.

In ComfyUI terms an attn2_patch, the point where a transformer block may change the value input of
its cross-attention before to_v; the step's scale and shift reach it through its node's StyleCall
(a recorded feature store, one ValueInput per sigma), so it never reads the sigma itself.
"""

from dataclasses import dataclass

import torch

from .feature_store import register_feature_type
from .reference import StyleReferenceError
from .style_call import StyleOwner, style_call

SITE = "value_input"  # the one feature name: every cross-attention layer takes the same modulation


@register_feature_type
@dataclass(frozen=True)
class ValueInput:
    """One step's modulation of the prompt embedding: scale and shift of shape (tokens, channels), or
    (rows, tokens, channels) for each row of a chunk apart (a prompt-to-prompt edit's source and target)."""

    scale: torch.Tensor
    shift: torch.Tensor


def modulated(context: torch.Tensor, value: ValueInput) -> torch.Tensor:
    """context (batch, tokens, channels) * scale + shift, the step's value input."""
    scale, shift = value.scale.to(context), value.shift.to(context)
    if scale.ndim == 3 and scale.shape[0] != context.shape[0]:
        raise StyleReferenceError(f"the value input is for chunks of {scale.shape[0]} rows; this call has "
                                  f"{context.shape[0]}")
    if scale.shape[-2:] != context.shape[1:]:
        raise StyleReferenceError(
            f"the learned value input is for {scale.shape[-2]} tokens of {scale.shape[-1]} channels, and this prompt "
            f"has {context.shape[1]} tokens of {context.shape[2]}: edit with prompts of the inverted prompt's length "
            "(one 77-token chunk) and the inverted model")
    return context * scale + shift


def cond_rows_modulated(context: torch.Tensor, value: ValueInput, cond_or_uncond: tuple[int, ...]) -> torch.Tensor:
    """The value input of a model call: the cond chunks' rows modulated, the uncond chunks' plain."""
    rows = context.shape[0] // len(cond_or_uncond)
    parts = []
    for chunk, kind in enumerate(cond_or_uncond):
        part = context[chunk * rows:(chunk + 1) * rows]
        parts.append(modulated(part, value) if kind == 0 else part)
    return torch.cat(parts)


@dataclass(frozen=True)
class ValueInputPatch:
    """An attn2_patch: the value input of every cross-attention layer, in the calls where its node's
    StyleCall carries a ValueInput."""

    owner: StyleOwner

    def __call__(self, n, context, value, extra_options):
        call = style_call(extra_options, self.owner)
        if call is None or call.store is None:
            return n, context, value
        source = context if value is None else value
        return n, context, cond_rows_modulated(source, call.store.get(SITE), call.cond_or_uncond)
