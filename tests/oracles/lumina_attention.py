"""Joint attention of the Lumina 2 / Z-Image twins (tests/support/lumina_twin.py: diffusers' Lumina2TransformerBlock)
written out by hand, for the Lumina style oracles (lumina_style.py): the rows a main layer's attention sees, its
q, k, v, RoPE, which layers a processor sits on, and a recording of a reference's own pass.

A layer is an index into the twin's layers (the main ones; the caption and noise refiners are never styled). Its
attention sees [caption rows (padded to pad_tokens_multiple on Z-Image) | image rows (rows x cols tokens, row-major)
| image padding rows (Z-Image)]: q and k (per head; keys and values repeated to every query head where the model
has fewer key/value heads) get the QK RMSNorm, then RoPE at (axis 0, row, column) positions.
"""

import contextlib
import math
from dataclasses import dataclass, field

import torch

from support.lumina_twin import image_ids, padding


@dataclass
class Layout:
    """What one call of the twin runs on, read from its inputs by a forward pre-hook."""

    positions: torch.nn.Module = None  # the twin's ComfyPositions: .freqs(ids) -> complex (tokens, head dim / 2)
    text: int = 0  # caption rows, padding included
    rows: int = 0  # the image's token grid
    cols: int = 0
    pad: int = 0  # image padding rows

    @property
    def image(self) -> int:
        return self.rows * self.cols

    def image_ids(self, w_offset: int = 0) -> torch.Tensor:
        return image_ids(self.rows, self.cols, self.text, w_offset)


def joint_qkv(attn, hidden_states):
    """q, k, v (B, heads, rows, head dim): q and k after the QK norm, before RoPE; k and v repeated to every head."""
    batch, rows, _ = hidden_states.shape
    q = attn.norm_q(attn.to_q(hidden_states).view(batch, rows, attn.heads, -1)).transpose(1, 2)
    k = attn.norm_k(attn.to_k(hidden_states).view(batch, rows, -1, q.shape[-1])).transpose(1, 2)
    v = attn.to_v(hidden_states).view(batch, rows, -1, q.shape[-1]).transpose(1, 2)
    repeat = attn.heads // k.shape[1]
    return q, k.repeat_interleave(repeat, 1), v.repeat_interleave(repeat, 1)


def rotate(x, freqs):
    """RoPE on (B, heads, rows, d): each pair (x[2i], x[2i+1]) as x[2i] + j x[2i+1], times freqs[row, i]
    (complex, (rows, d / 2)); computed in freqs' precision, returned in x's."""
    pairs = x.unflatten(-1, (-1, 2)).to(freqs.real.dtype)
    cos, sin = freqs.real, freqs.imag
    turned = torch.stack([pairs[..., 0] * cos - pairs[..., 1] * sin, pairs[..., 0] * sin + pairs[..., 1] * cos], -1)
    return turned.flatten(-2).to(x.dtype)


def attend(q, k, v, key_mask=None):
    """softmax(q k^T / sqrt(d) + mask) v per head; key_mask (B, keys) additive. -> (B, rows, heads * d)."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if key_mask is not None:
        scores = scores + key_mask[:, None, None, :]
    return (torch.softmax(scores, -1) @ v).transpose(1, 2).flatten(2)


def projected(attn, out):
    return attn.to_out[1](attn.to_out[0](out))


def chunk_firsts(batch: int, chunks: int) -> torch.Tensor:
    """Per row, the index of its chunk's first row (the reference of that chunk)."""
    if batch % chunks:
        raise ValueError(f"a batch of {batch} does not split into {chunks} chunks")
    per_chunk = batch // chunks
    return torch.arange(batch) // per_chunk * per_chunk


def checked_rotary(layout: Layout, image_rotary_emb, rows: int) -> torch.Tensor:
    """The joint RoPE (rows, d / 2), after checking that every batch row has the same and that the layout's rows and
    image positions are the twin's (the oracle's positions)."""
    freqs = image_rotary_emb[0]
    if not (image_rotary_emb == freqs).all() or rows != layout.text + layout.image + layout.pad:
        raise AssertionError("the twin's rows are not the layout's")
    if not torch.equal(freqs[layout.text:layout.text + layout.image], layout.positions.freqs(layout.image_ids())):
        raise AssertionError("the twin's image positions are not ComfyUI's")
    return freqs


@dataclass
class LuminaReference:
    """A reference's own pass (batch 1), per layer: its image rows' q, k, v after the QK norm, before RoPE ("q", "k",
    "v", heads repeated), k after RoPE at its own positions ("k_rope"); and its image rows' positions."""

    layers: dict = field(default_factory=dict)
    image_ids: torch.Tensor = None


class RecordingProcessor:
    """Plain attention that keeps the reference's image rows (not its caption, nor its padding)."""

    def __init__(self, layer, reference: LuminaReference, layout: Layout):
        self.layer, self.reference, self.layout = layer, reference, layout

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 base_sequence_length=None):
        if attention_mask is not None or hidden_states.shape[0] != 1:
            raise ValueError("a reference pass runs one image, unmasked")
        q, k, v = joint_qkv(attn, hidden_states)
        freqs = checked_rotary(self.layout, image_rotary_emb, q.shape[2])
        rq, rk = rotate(q, freqs), rotate(k, freqs)
        image = slice(self.layout.text, self.layout.text + self.layout.image)
        self.reference.layers[self.layer] = {"q": q[:, :, image], "k": k[:, :, image], "v": v[:, :, image],
                                             "k_rope": rk[:, :, image]}
        self.reference.image_ids = self.layout.image_ids()
        return projected(attn, attend(rq, rk, v))


@contextlib.contextmanager
def installed(twin, make_processor):
    """Install make_processor(layer, layout) on every main layer's attention for which it returns one (the others
    keep diffusers' own processor); a pre-hook fills the layout at each call; everything restored on exit."""
    layout = Layout(positions=twin.rope_embedder)
    multiple = getattr(twin, "pad_tokens_multiple", None)

    def read_layout(module, args, kwargs):
        height, width = kwargs["hidden_states"].shape[-2:]
        patch = twin.config.patch_size
        caption = kwargs["encoder_hidden_states"].shape[1]
        layout.rows, layout.cols = height // patch, width // patch
        layout.text = caption + padding(caption, multiple)
        layout.pad = padding(layout.image, multiple)

    original = [layer.attn.processor for layer in twin.layers]
    hook = twin.register_forward_pre_hook(read_layout, with_kwargs=True)
    try:
        for index, layer in enumerate(twin.layers):
            processor = make_processor(index, layout)
            if processor is not None:
                layer.attn.set_processor(processor)
        yield layout
    finally:
        hook.remove()
        for layer, processor in zip(twin.layers, original):
            layer.attn.set_processor(processor)
