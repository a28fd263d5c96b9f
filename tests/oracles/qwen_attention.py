"""Joint text+image attention of a diffusers QwenImageTransformer2DModel (the twin of tests/support/qwen_twin.py)
written out by hand, for the Qwen-Image style oracles (qwen_style.py): the pieces a processor needs, the layout of
the rows it sees, which blocks a processor sits on, and a recording of a reference's own pass.

A block is an index into transformer_blocks. Its attention sees the joint sequence [text rows | image rows
(rows x cols tokens, row-major) | extra rows (the edit model's reference latents, if any)]: q and k get the
QK RMSNorm (norm_added_q/k on the text, norm_q/k on the rest), then RoPE at (frame, row, column) positions.
"""

import contextlib
import math
from dataclasses import dataclass, field

import torch

from support.qwen_twin import image_ids


@dataclass
class Layout:
    """What one call of the twin runs on, read from its inputs by a forward pre-hook."""

    positions: torch.nn.Module = None  # the twin's pos_embed: .freqs(ids) -> complex (tokens, head dim / 2)
    text: int = 0  # text rows
    rows: int = 0  # the image's token grid (the extra rows are not counted)
    cols: int = 0

    @property
    def image(self) -> int:
        return self.rows * self.cols

    def image_ids(self, w_offset: int = 0) -> torch.Tensor:
        """The image rows' (frame, row, column): ComfyUI's grid centred on 0, frame 0."""
        return image_ids(self.rows, self.cols, w_offset=w_offset)


def joint_qkv(attn, hidden_states, encoder_hidden_states):
    """q, k, v (B, heads, text + image + extra rows, head dim), q and k after the QK norm, before RoPE."""
    def heads(t):
        return t.unflatten(-1, (attn.heads, -1)).transpose(1, 2)

    q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
    tq, tk, tv = (heads(p(encoder_hidden_states)) for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
    q = torch.cat([attn.norm_added_q(tq), attn.norm_q(q)], 2)
    k = torch.cat([attn.norm_added_k(tk), attn.norm_k(k)], 2)
    return q, k, torch.cat([tv, v], 2)


def rotary(image_rotary_emb):
    """The joint sequence's RoPE (complex, (rows, head dim / 2)) from diffusers' (image freqs, text freqs)."""
    image, text = image_rotary_emb
    return torch.cat([text, image])


def rotate(x, freqs):
    """RoPE on (B, heads, rows, head dim): each pair (x[2i], x[2i+1]), taken as x[2i] + j x[2i+1], times
    freqs[row, i] = exp(j angle)."""
    pairs = x.unflatten(-1, (-1, 2))
    cos, sin = freqs.real, freqs.imag
    turned = torch.stack([pairs[..., 0] * cos - pairs[..., 1] * sin, pairs[..., 0] * sin + pairs[..., 1] * cos], -1)
    return turned.flatten(-2)


def attend(q, k, v, key_mask=None):
    """softmax(q k^T / sqrt(d) + mask) v per head; key_mask (B, keys) additive. -> (B, rows, heads * d)."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if key_mask is not None:
        scores = scores + key_mask[:, None, None, :]
    return (torch.softmax(scores, -1) @ v).transpose(1, 2).flatten(2)


def block_output(attn, out, text):
    """What the diffusers block expects back: (image + extra rows, text rows), each projected."""
    return attn.to_out[1](attn.to_out[0](out[:, text:])), attn.to_add_out(out[:, :text])


def chunk_firsts(batch: int, chunks: int) -> torch.Tensor:
    """Per row, the index of its chunk's first row (the reference of that chunk)."""
    if batch % chunks:
        raise ValueError(f"a batch of {batch} does not split into {chunks} chunks")
    per_chunk = batch // chunks
    return torch.arange(batch) // per_chunk * per_chunk


def checked_rotary(layout, image_rotary_emb):
    """The joint RoPE, after checking that its image rows are layout.image_ids()'s (the oracle's positions)."""
    freqs = rotary(image_rotary_emb)
    expected = layout.positions.freqs(layout.image_ids())
    if not torch.equal(freqs[layout.text:layout.text + layout.image], expected):
        raise AssertionError("the twin's image positions are not ComfyUI's centred grid")
    return freqs


@dataclass
class QwenReference:
    """A reference's own pass (batch 1), per block: its image rows' q, k, v after the QK norm, before RoPE
    ("q", "k", "v"), k after RoPE at its own positions ("k_rope"); and its image rows' positions."""

    blocks: dict = field(default_factory=dict)
    image_ids: torch.Tensor = None
    cols: int = 0


class RecordingProcessor:
    """Plain attention that keeps the reference's image rows (not its text, nor any extra rows)."""

    def __init__(self, block, reference: QwenReference, layout: Layout):
        self.block, self.reference, self.layout = block, reference, layout

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None):
        q, k, v = joint_qkv(attn, hidden_states, encoder_hidden_states)
        if q.shape[0] != 1:
            raise ValueError("a reference pass runs one image")
        freqs = checked_rotary(self.layout, image_rotary_emb)
        rq, rk = rotate(q, freqs), rotate(k, freqs)
        image = slice(self.layout.text, self.layout.text + self.layout.image)
        self.reference.blocks[self.block] = {"q": q[:, :, image], "k": k[:, :, image], "v": v[:, :, image],
                                             "k_rope": rk[:, :, image]}
        self.reference.image_ids, self.reference.cols = self.layout.image_ids(), self.layout.cols
        return block_output(attn, attend(rq, rk, v), self.layout.text)


@contextlib.contextmanager
def installed(twin, make_processor):
    """Install make_processor(block, layout) on every block's attention for which it returns one (the others keep
    diffusers' own processor); a pre-hook fills the layout at each call; everything restored on exit."""
    layout = Layout(positions=twin.pos_embed)
    if not hasattr(layout.positions, "freqs"):
        raise ValueError("the oracles run on a twin with ComfyUI's positions (twin_from_comfy's default)")

    def read_layout(module, args, kwargs):
        layout.text = kwargs["encoder_hidden_states"].shape[1]
        _, layout.rows, layout.cols = kwargs["img_shapes"][0][0]

    original = [block.attn.processor for block in twin.transformer_blocks]
    hook = twin.register_forward_pre_hook(read_layout, with_kwargs=True)
    try:
        for block in range(len(twin.transformer_blocks)):
            processor = make_processor(block, layout)
            if processor is not None:
                twin.transformer_blocks[block].attn.set_processor(processor)
        yield layout
    finally:
        hook.remove()
        for block, processor in zip(twin.transformer_blocks, original):
            block.attn.set_processor(processor)
