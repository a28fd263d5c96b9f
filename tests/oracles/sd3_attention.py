"""The attentions of a diffusers SD3Transformer2DModel written out by hand, for the SD3 style oracles
(sd3_style.py): the pieces a processor needs, which attentions a styled block has, and a recording of a
reference's own pass.

A site is (block, "joint") (transformer_blocks[block].attn: the text stream's and the image stream's q/k/v
joined, text rows first here) or (block, "image") (transformer_blocks[block].attn2, SD3.5 Medium's second,
image-only self-attention of its dual blocks). q and k are taken after the QK norm (norm_q / norm_k and
norm_added_q / norm_added_k: RMSNorm on SD3.5, none on SD3.0). No RoPE: positions were added at the input.
"""

import contextlib
import math
from dataclasses import dataclass, field

import torch

JOINT, IMAGE = "joint", "image"


def attention_module(twin, site):
    block, kind = site
    return twin.transformer_blocks[block].attn if kind == JOINT else twin.transformer_blocks[block].attn2


def sites_of(twin, blocks, attentions=(JOINT, IMAGE)) -> list:
    """The sites of the given block indices: the joint attention of each, and its attn2 where it has one."""
    count = len(twin.transformer_blocks)
    blocks = sorted({int(b) for b in blocks})
    if any(not 0 <= b < count for b in blocks):
        raise ValueError(f"no such blocks: {blocks} (the twin has {count})")
    sites = [(b, JOINT) for b in blocks if JOINT in attentions]
    return sites + [(b, IMAGE) for b in blocks if IMAGE in attentions and twin.transformer_blocks[b].attn2 is not None]


def qkv(attn, hidden_states, encoder_hidden_states=None):
    """q, k, v (B, heads, text + image rows, head dim), q and k after the QK norm; and the number of text rows
    (0 for the image-only attn2)."""
    def heads(t):
        return t.unflatten(-1, (attn.heads, -1)).transpose(1, 2)

    def norm(module, t):
        return t if module is None else module(t)

    q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
    q, k = norm(attn.norm_q, q), norm(attn.norm_k, k)
    if encoder_hidden_states is None:
        return q, k, v, 0
    tq, tk, tv = (heads(p(encoder_hidden_states)) for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
    tq, tk = norm(attn.norm_added_q, tq), norm(attn.norm_added_k, tk)
    return torch.cat([tq, q], 2), torch.cat([tk, k], 2), torch.cat([tv, v], 2), encoder_hidden_states.shape[1]


def attend(q, k, v, key_mask=None):
    """softmax(q k^T / sqrt(d) + mask) v per head; key_mask (B, keys) additive. -> (B, rows, heads * d)."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if key_mask is not None:
        scores = scores + key_mask[:, None, None, :]
    out = torch.softmax(scores, -1) @ v
    return out.transpose(1, 2).flatten(2)


def block_output(attn, out, encoder_hidden_states, text_tokens):
    """What the diffusers block expects back: (image, text) for the joint attention, the image projected by
    to_out, the text by to_add_out (left as it is on the last block, whose text side is pre-only); the image
    projected for attn2."""
    image = attn.to_out[1](attn.to_out[0](out[:, text_tokens:]))
    if encoder_hidden_states is None:
        return image
    text = out[:, :text_tokens]
    return image, text if attn.context_pre_only else attn.to_add_out(text)


def chunk_firsts(batch: int, chunks: int) -> torch.Tensor:
    """Per row, the index of its chunk's first row (the reference of that chunk)."""
    if batch % chunks:
        raise ValueError(f"a batch of {batch} does not split into {chunks} chunks")
    per_chunk = batch // chunks
    return torch.arange(batch) // per_chunk * per_chunk


@dataclass
class SD3Reference:
    """A reference's own pass (batch 1): per site, its image rows' q, k (after the QK norm) and v,
    each (1, heads, image rows, head dim)."""

    features: dict = field(default_factory=dict)


class RecordingProcessor:
    """Plain attention that keeps the reference's image rows."""

    def __init__(self, site, reference: SD3Reference):
        self.site, self.reference = site, reference

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        q, k, v, text = qkv(attn, hidden_states, encoder_hidden_states)
        if q.shape[0] != 1:
            raise ValueError("a reference pass runs one image")
        self.reference.features[self.site] = {"q": q[:, :, text:], "k": k[:, :, text:], "v": v[:, :, text:]}
        return block_output(attn, attend(q, k, v), encoder_hidden_states, text)


@contextlib.contextmanager
def installed(twin, processors: dict):
    """Install {site: processor} on the twin (the other attentions keep diffusers' own processor); everything
    restored on exit."""
    original = twin.attn_processors
    try:
        for site, processor in processors.items():
            attention_module(twin, site).set_processor(processor)
        yield
    finally:
        twin.set_attn_processor(original)
