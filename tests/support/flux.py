"""Sampling the tiny random Flux and looking inside one of its blocks, through ComfyUI's own code.

A block's joint attention is seen three ways, none through the pack:
- its queries and keys before RoPE: the output of the block's QK-norm (pre_rope);
- its queries, keys and values as the kernel gets them (after RoPE), through a user's
  optimized_attention_override on a clone, as another pack would set one (post_rope);
- its output: the input of the projection after it (single blocks: the first hidden_size channels of
  linear2's input; double blocks: txt_attn.proj's and img_attn.proj's inputs, text first).
Everything is (batch, heads, rows, dim_head) but the output, (batch, rows, heads * dim_head).
"""

import math
from contextlib import contextmanager

import torch

import comfy.sample
import random_dits

HEIGHT = WIDTH = 8  # latent size of the tests: 4 x 4 image tokens
TEXT_TOKENS = 8  # flux_conditioning's default


def conditioning(seed=0, tokens=TEXT_TOKENS):
    return random_dits.flux_conditioning(seed, tokens)


def flux_noise(batch=3, seed=0, height=HEIGHT, width=WIDTH):
    return comfy.sample.prepare_noise(torch.zeros(batch, 16, height, width), seed)


def flux_sample(model, batch=3, cfg=1.0, steps=1, seed=0, noise=None, height=HEIGHT, width=WIDTH, positive=None,
                negative=None):
    """ComfyUI's euler on the simple schedule (Flux's sigma runs from exactly 1)."""
    latent = torch.zeros(batch, 16, height, width)
    noise = flux_noise(batch, seed, height, width) if noise is None else noise
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", positive or conditioning(0),
                               negative or conditioning(1), latent, seed=seed, disable_pbar=True)


def block_of(model, site):
    dit = model.get_model_object("diffusion_model")
    return (dit.double_blocks if site[0] == "double" else dit.single_blocks)[site[1]]


@contextmanager
def pre_rope(model, site):
    """Per call of the block: {"q", "k"} after QK-norm, before RoPE (the joint sequence, text first)."""
    block = block_of(model, site)
    calls = []
    if site[0] == "single":
        handles = [block.norm.register_forward_hook(lambda m, i, o: calls.append({"q": o[0].clone(), "k": o[1].clone()}))]
    else:
        pending = {}

        def image(m, i, o):
            pending.update(q=o[0].clone(), k=o[1].clone())

        def text(m, i, o):
            calls.append({"q": torch.cat([o[0], pending["q"]], 2), "k": torch.cat([o[1], pending["k"]], 2)})
        handles = [block.img_attn.norm.register_forward_hook(image), block.txt_attn.norm.register_forward_hook(text)]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def post_rope(model, site):
    """(a clone whose calls record at site, the list of calls: {"q", "k", "v", "cond_or_uncond"})."""
    calls = []
    block_type, index = site

    def recorder(func, q, k, v, heads, *args, **kwargs):
        options = kwargs.get("transformer_options") or {}
        if options.get("block_type") == block_type and options.get("block_index") == index:
            calls.append({"q": q.clone(), "k": k.clone(), "v": v.clone(),
                          "cond_or_uncond": list(options.get("cond_or_uncond", []))})
        return func(q, k, v, heads, *args, **kwargs)

    clone = model.clone()
    options = clone.model_options.setdefault("transformer_options", {})
    options["optimized_attention_override"] = recorder
    return clone, calls


@contextmanager
def attention_output(model, site):
    """Per call of the block: its joint attention's output (batch, rows, heads * dim_head), text first."""
    block = block_of(model, site)
    calls = []
    if site[0] == "single":
        hidden = block.hidden_size
        handles = [block.linear2.register_forward_pre_hook(lambda m, i: calls.append(i[0][..., :hidden].clone()))]
    else:
        pending = {}
        handles = [block.img_attn.proj.register_forward_pre_hook(lambda m, i: pending.update(img=i[0].clone())),
                   block.txt_attn.proj.register_forward_pre_hook(
                       lambda m, i: calls.append(torch.cat([i[0], pending["img"]], 1)))]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def softmax_attention(q, k, v):
    """softmax(q k^T / sqrt(d)) v per head in float64, (heads, rows, d) -> (rows, heads * d)."""
    weights = torch.softmax(q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    out = weights @ v.double()
    return out.transpose(0, 1).reshape(q.shape[1], -1)


def adain_rows(x, reference, eps=1e-5):
    """Per head and channel over rows (dim -2): x with reference's mean and std (unbiased variance + eps)."""
    mean, std = x.mean(-2, keepdim=True), (x.var(-2, keepdim=True) + eps).sqrt()
    ref_mean, ref_std = reference.mean(-2, keepdim=True), (reference.var(-2, keepdim=True) + eps).sqrt()
    return (x - mean) / std * ref_std + ref_mean


def image_positions(model, height_tokens, width_tokens, width_offset=0.0, text=0):
    """ComfyUI's RoPE matrices for text rows at position 0 then an image grid (width shifted by width_offset)."""
    dit = model.get_model_object("diffusion_model")
    rows = torch.arange(height_tokens, dtype=torch.float32).repeat_interleave(width_tokens)
    cols = torch.arange(width_tokens, dtype=torch.float32).repeat(height_tokens) + width_offset
    image = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1)
    ids = torch.cat([torch.zeros(text, 3), image])[None]
    return dit.pe_embedder(ids)


def with_rope(x, positions):
    """ComfyUI's own rotation (comfy.ldm.flux.math) of (batch, heads, rows, d) features."""
    from comfy.ldm.flux.math import apply_rope1
    return apply_rope1(x, positions)
