"""Joint text+image attention of a diffusers FluxTransformer2DModel written out by hand, for the Flux style
oracles (flux_style.py): the pieces a processor needs, which blocks a processor sits on, and a recording of
a reference's own pass.

A block is ("double", i) (transformer_blocks[i]: text and image streams, joined for attention) or
("single", i) (single_transformer_blocks[i]: one joint stream). Either way the attention sees the joint
sequence [text tokens; image tokens], QK-RMSNorm per head, then RoPE from the (0, row, col) ids.
"""

import contextlib
import math
from dataclasses import dataclass, field

import torch


def attention_module(twin, block):
    kind, index = block
    blocks = {"double": twin.transformer_blocks, "single": twin.single_transformer_blocks}[kind]
    return blocks[index].attn


@dataclass
class Layout:
    """What one call of the twin runs on, read from its inputs by a forward pre-hook (a single block's
    attention sees one joint sequence and cannot tell where the text ends)."""

    pos_embed: torch.nn.Module = None
    text_tokens: int = 0
    image_ids: torch.Tensor = None  # (image tokens, 3)

    @property
    def columns(self) -> int:
        return int(self.image_ids[:, 2].max() - self.image_ids[:, 2].min()) + 1


def joint_qkv(attn, hidden_states, encoder_hidden_states, text_tokens):
    """q, k, v (B, heads, text + image tokens, head dim) after QK-norm, before RoPE; and the text length."""
    def heads(t):
        return t.unflatten(-1, (attn.heads, -1)).transpose(1, 2)

    q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
    q, k = attn.norm_q(q), attn.norm_k(k)
    if encoder_hidden_states is None:  # single block: hidden_states is already [text; image]
        return q, k, v, text_tokens
    tq, tk, tv = (heads(p(encoder_hidden_states)) for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
    tq, tk = attn.norm_added_q(tq), attn.norm_added_k(tk)
    return torch.cat([tq, q], 2), torch.cat([tk, k], 2), torch.cat([tv, v], 2), encoder_hidden_states.shape[1]


def rotate(x, rotary):
    """RoPE on (B, heads, tokens, head dim): each pair (x[2i], x[2i+1]) turned by its angle; rotary is
    (cos, sin), each (tokens, head dim) with every angle repeated for the two members of its pair."""
    cos, sin = rotary
    pairs = x.unflatten(-1, (-1, 2))
    turned = torch.stack([-pairs[..., 1], pairs[..., 0]], -1).flatten(-2)
    return x * cos + turned * sin


def attend(q, k, v, key_mask=None):
    """softmax(q k^T / sqrt(d) + mask) v per head; key_mask (B, keys) additive. -> (B, tokens, heads * d)."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if key_mask is not None:
        scores = scores + key_mask[:, None, None, :]
    out = torch.softmax(scores, -1) @ v
    return out.transpose(1, 2).flatten(2)


def block_output(attn, out, encoder_hidden_states, text_tokens):
    """What the diffusers block expects back: (image, text) projected for a double block, the joint sequence
    unprojected for a single block (its proj_out follows, with the MLP)."""
    if encoder_hidden_states is None:
        return out
    text, image = out[:, :text_tokens], out[:, text_tokens:]
    return attn.to_out[1](attn.to_out[0](image)), attn.to_add_out(text)


def chunk_firsts(batch: int, chunks: int) -> torch.Tensor:
    """Per row, the index of its chunk's first row (the reference of that chunk)."""
    if batch % chunks:
        raise ValueError(f"a batch of {batch} does not split into {chunks} chunks")
    per_chunk = batch // chunks
    return torch.arange(batch) // per_chunk * per_chunk


@dataclass
class FluxReference:
    """A reference's own pass (batch 1), per block: image-token q/k/v after QK-norm before RoPE ("q", "k", "v"),
    k after RoPE at its own positions ("k_rope"), and its image ids."""

    blocks: dict = field(default_factory=dict)
    image_ids: torch.Tensor = None


class RecordingProcessor:
    """Plain attention that keeps the reference's image tokens."""

    def __init__(self, block, reference: FluxReference, layout: Layout):
        self.block, self.reference, self.layout = block, reference, layout

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        q, k, v, text = joint_qkv(attn, hidden_states, encoder_hidden_states, self.layout.text_tokens)
        if q.shape[0] != 1:
            raise ValueError("a reference pass runs one image")
        rq, rk = rotate(q, image_rotary_emb), rotate(k, image_rotary_emb)
        self.reference.blocks[self.block] = {"q": q[:, :, text:], "k": k[:, :, text:], "v": v[:, :, text:],
                                             "k_rope": rk[:, :, text:]}
        self.reference.image_ids = self.layout.image_ids
        return block_output(attn, attend(rq, rk, v), encoder_hidden_states, text)


def all_blocks(twin) -> list:
    return ([("double", i) for i in range(len(twin.transformer_blocks))]
            + [("single", i) for i in range(len(twin.single_transformer_blocks))])


@contextlib.contextmanager
def installed(twin, make_processor):
    """Install make_processor(block, layout) on every attention of twin for which it returns one (the others
    keep diffusers' own processor); a pre-hook fills the layout at each call; everything restored on exit."""
    layout = Layout(pos_embed=twin.pos_embed)

    def read_layout(module, args, kwargs):
        layout.text_tokens = kwargs["encoder_hidden_states"].shape[1]
        ids = kwargs["img_ids"]
        layout.image_ids = ids[0] if ids.ndim == 3 else ids

    original = twin.attn_processors
    hook = twin.register_forward_pre_hook(read_layout, with_kwargs=True)
    try:
        for block in all_blocks(twin):
            processor = make_processor(block, layout)
            if processor is not None:
                attention_module(twin, block).set_processor(processor)
        yield layout
    finally:
        hook.remove()
        twin.set_attn_processor(original)
