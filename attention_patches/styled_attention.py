"""The attention replacement installed at each styled site: per branch of the model call it runs a
StyleMethod or plain attention, with the reference taken from the call's recording or from the batch."""

from dataclasses import dataclass, replace
from typing import Protocol

import torch

from .attention import AttentionFunction, for_call
from .attention_maps import with_capture
from .reference import ReferenceFeatures, batch_chunks, in_batch_references
from .reference_set import split_key_sources
from .style_call import StyleCall, StyleOwner, style_call
from .token_layout import LAYOUT_OPTION, UNET_LAYOUT, TokenLayout


class StyleMethod(Protocol):
    """What a style method does to the targets' attention, given the reference's features.

    key_sources names the blocks of keys its (first) attention call attends to, for attention maps.
    timestep is the call's model timestep (StyleCall.timestep), for methods that follow the schedule.
    layout says which rows are image tokens (a DiT's joint attention has text rows first) and their
    positions; the reference holds image rows only.
    """

    key_sources: tuple[str, ...]

    def __call__(
        self, query, key, value, reference: ReferenceFeatures, heads: int, attention: AttentionFunction, attn_precision=None,
        timestep: float | None = None, layout: TokenLayout = UNET_LAYOUT,
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class BranchMethods:
    """What each branch of a model call does at one site: a StyleMethod, or None for plain attention.

    cond and uncond are the chunks of ComfyUI's cond/uncond batch (StyleKeeper's cond-only swap leaves
    uncond None); negative is the style's own negative branch (StyleKeeper's NVQG), an uncond-like call
    of its own, where a site without a negative method acts as its uncond chunks do."""

    cond: StyleMethod | None
    uncond: StyleMethod | None = None
    negative: StyleMethod | None = None

    @classmethod
    def every(cls, method: StyleMethod) -> "BranchMethods":
        return cls(method, method)

    def of(self, kind: int, negative: bool) -> StyleMethod | None:
        if negative:
            return self.negative or self.uncond
        return self.cond if kind == 0 else self.uncond

    @property
    def any(self) -> bool:
        return any(m is not None for m in (self.cond, self.uncond, self.negative))


@dataclass(frozen=True)
class StyledAttention:
    """Replaces one attention call at a site (on a UNet an attn1 or attn2 replace patch).

    Its node's wrapper says per model call whether the style is on (style_call) and where the reference
    comes from; the architecture's site hands it the call's token layout (LAYOUT_OPTION; none: a
    UNet's, every row an image token). During an external reference's own pass the site records what
    it sees; after, the call's store replays it; without one, item 0 of each cond/uncond chunk is the reference of the
    others. Each chunk then runs the method of its branch (methods.of), plain attention where none.
    """

    site: tuple
    methods: BranchMethods
    owner: StyleOwner
    attention: AttentionFunction
    plain_keys: tuple[str, ...] = ("self",)  # what plain attention attends to here, for maps: ("text",) at attn2
    records_attention_maps = True  # an attention-map capture at its site leaves the site to it (it records)

    @property
    def store_key(self) -> tuple:
        """Where its reference's features are kept: a site's self- and cross-attention apart."""
        return self.site if self.plain_keys == ("self",) else (*self.site, "cross")

    @property
    def conflict_note(self) -> str:
        """Said after its node's name when another node claims its site."""
        only_negative = self.methods.cond is None and self.methods.uncond is None
        return " (for its negative visual query guidance: see its nvqg_layers)" if only_negative else ""

    def __call__(self, query, key, value, extra_options: dict) -> torch.Tensor:
        heads = extra_options["n_heads"]
        precision = extra_options.get("attn_precision")
        kernel = for_call(self.attention, extra_options)
        call = style_call(extra_options, self.owner)
        layout = extra_options.get(LAYOUT_OPTION, UNET_LAYOUT)
        if call is not None and call.store is not None and call.store.recording and self.methods.any:
            call.store.record(self.store_key, layout.reference_of(query, key, value, kept=True))
            return kernel(query, key, value, heads, attn_precision=precision)
        methods = [None] if call is None else [self.methods.of(kind, call.negative) for kind in call.cond_or_uncond]
        if all(method is None for method in methods):
            attention = with_capture(kernel, self.site, extra_options, self.plain_keys, query.shape[0],
                                     extra_options["cond_or_uncond"])
            return attention(query, key, value, heads, attn_precision=precision)
        if all(method is methods[0] for method in methods):
            return self._styled(query, key, value, extra_options, call, kernel, heads, precision, methods[0], layout)
        return self._per_branch(query, key, value, extra_options, call, kernel, heads, precision, methods, layout)

    def _per_branch(self, query, key, value, extra_options, call: StyleCall, kernel, heads, precision, methods, layout):
        """Chunks of one method styled together as a call of their own, plain chunks apart, in the call's order."""
        chunks = batch_chunks(query.shape[0], call.cond_or_uncond)
        pieces = {}
        for method in {id(m): m for m in methods if m is not None}.values():
            group = [(chunk, kind) for chunk, kind, m in zip(chunks, call.cond_or_uncond, methods) if m is method]
            rows = torch.cat([torch.arange(chunk.start, chunk.stop) for chunk, _ in group]).to(query.device)
            styled = self._styled(query[rows], key[rows], value[rows], extra_options,
                                  replace(call, cond_or_uncond=tuple(kind for _, kind in group)), kernel, heads,
                                  precision, method, layout)
            size = chunks[0].stop - chunks[0].start
            pieces.update({chunk.start: styled[i * size:(i + 1) * size] for i, (chunk, _) in enumerate(group)})
        for chunk, method in zip(chunks, methods):
            if method is None:
                pieces[chunk.start] = kernel(query[chunk], key[chunk], value[chunk], heads, attn_precision=precision)
        return torch.cat([pieces[chunk.start] for chunk in chunks])

    def _styled(self, query, key, value, extra_options, call: StyleCall, kernel, heads, precision, method: StyleMethod,
                layout: TokenLayout):
        """method on every chunk of the call: the reference from the call's recording, or in-batch."""
        if call.store is not None:
            reference = call.store.get(self.store_key)
            attention = with_capture(kernel, self.site, extra_options, split_key_sources(method.key_sources, reference),
                                     query.shape[0], call.cond_or_uncond)
            return method(query, key, value, reference, heads, attention, precision, call.timestep, layout=layout)
        outputs = []
        for (ref, targets), kind in zip(in_batch_references(query.shape[0], call.cond_or_uncond), call.cond_or_uncond):
            reference = layout.reference_of(query[ref], key[ref], value[ref])
            # the reference's own attention is not captured: maps start at batch item 1
            attention = with_capture(kernel, self.site, extra_options, method.key_sources,
                                     targets.stop - targets.start, [kind], first_image=1)
            outputs.append(kernel(query[ref], key[ref], value[ref], heads, attn_precision=precision))
            outputs.append(method(query[targets], key[targets], value[targets], reference, heads, attention, precision,
                                  layout=layout))
        return torch.cat(outputs)
