"""The self-attention replacement installed at each selected layer: picks the reference, calls the method."""

from dataclasses import dataclass, replace
from typing import Protocol

import torch

from .attention import AttentionFunction, for_call
from .attention_maps import with_capture
from .layers import SelfAttentionLayer
from .reference import ReferenceFeatures, batch_chunks, in_batch_references
from .style_call import StyleCall, StyleOwner, style_call


class StyleMethod(Protocol):
    """What a style method does to the targets' self-attention, given the reference's features.

    key_sources names the blocks of keys its (first) attention call attends to, for attention maps.
    timestep is the call's model timestep (StyleCall.timestep), for methods that follow the schedule.
    """

    key_sources: tuple[str, ...]

    def __call__(
        self, query, key, value, reference: ReferenceFeatures, heads: int, attention: AttentionFunction, attn_precision=None,
        timestep: float | None = None,
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class StyledSelfAttention:
    """Replaces one self-attention layer (a ComfyUI attn1 replace patch).

    Its node's wrapper says per model call whether the style is on (style_call): with an external
    reference its recorded features come in the call's store; without one, item 0 of each
    cond/uncond chunk is the reference of the others. In the style's negative branch (an uncond call
    of its own) negative_method takes over; a layer without one acts as in any uncond chunk.
    """

    layer: SelfAttentionLayer
    method: StyleMethod | None  # None: plain attention outside the negative branch (a layer for it alone)
    owner: StyleOwner
    attention: AttentionFunction
    replaces: str = "attn1"  # or "attn2": the layer's cross-attention (plug-and-play's option)
    cond_only: bool = False  # StyleKeeper: the uncond branch keeps plain attention
    negative_method: StyleMethod | None = None  # StyleKeeper's NVQG: what the negative branch does here

    @property
    def site(self) -> tuple:
        """Where its reference's features are kept: a layer's self- and cross-attention apart."""
        return self.layer if self.replaces == "attn1" else (*self.layer, "cross")

    def __call__(self, query, key, value, extra_options: dict) -> torch.Tensor:
        heads = extra_options["n_heads"]
        precision = extra_options.get("attn_precision")
        cond_or_uncond = extra_options["cond_or_uncond"]
        kernel = for_call(self.attention, extra_options)
        call = style_call(extra_options, self.owner)
        if call is not None and call.negative and self.negative_method is not None:
            return self._styled(query, key, value, extra_options, call, kernel, heads, precision, self.negative_method)
        if call is None or (self.method is None and not (call.store is not None and call.store.recording)):
            plain_keys = ("self",) if self.replaces == "attn1" else ("text",)
            attention = with_capture(kernel, self.layer, extra_options, plain_keys, query.shape[0], cond_or_uncond)
            return attention(query, key, value, heads, attn_precision=precision)
        if self.cond_only and 1 in call.cond_or_uncond:
            return self._cond_styled(query, key, value, extra_options, call, kernel, heads, precision)
        return self._styled(query, key, value, extra_options, call, kernel, heads, precision, self.method)

    def _cond_styled(self, query, key, value, extra_options, call: StyleCall, kernel, heads, precision):
        """The cond chunks styled as one call of their own, the uncond chunks plain, in the call's order."""
        chunks = batch_chunks(query.shape[0], call.cond_or_uncond)
        cond = [chunk for chunk, kind in zip(chunks, call.cond_or_uncond) if kind == 0]
        pieces = {}
        if cond:
            rows = torch.cat([torch.arange(c.start, c.stop) for c in cond]).to(query.device)
            styled = self._styled(query[rows], key[rows], value[rows], extra_options,
                                  replace(call, cond_or_uncond=(0,) * len(cond)), kernel, heads, precision, self.method)
            pieces.update({c.start: styled[i * (c.stop - c.start):(i + 1) * (c.stop - c.start)]
                           for i, c in enumerate(cond)})
        for chunk, kind in zip(chunks, call.cond_or_uncond):
            if kind != 0:
                pieces[chunk.start] = kernel(query[chunk], key[chunk], value[chunk], heads, attn_precision=precision)
        return torch.cat([pieces[chunk.start] for chunk in chunks])

    def _styled(self, query, key, value, extra_options, call: StyleCall, kernel, heads, precision, method: StyleMethod):
        cond_or_uncond = call.cond_or_uncond
        store = call.store
        if store is not None:
            if store.recording:
                store.record(self.site, ReferenceFeatures(query, key, value))
                return kernel(query, key, value, heads, attn_precision=precision)
            attention = with_capture(kernel, self.layer, extra_options, method.key_sources, query.shape[0],
                                     cond_or_uncond)
            return method(query, key, value, store.get(self.site), heads, attention, precision, call.timestep)

        outputs = []
        for (ref, targets), kind in zip(in_batch_references(query.shape[0], call.cond_or_uncond), call.cond_or_uncond):
            reference = ReferenceFeatures(query[ref], key[ref], value[ref])
            # the reference's own attention is not captured: maps start at batch item 1
            attention = with_capture(kernel, self.layer, extra_options, method.key_sources,
                                     targets.stop - targets.start, [kind], first_image=1)
            outputs.append(kernel(query[ref], key[ref], value[ref], heads, attn_precision=precision))
            outputs.append(method(query[targets], key[targets], value[targets], reference, heads, attention, precision))
        return torch.cat(outputs)
