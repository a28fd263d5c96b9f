"""Sampling the tiny random SD3 / SD3.5 Medium / Qwen-Image / Lumina 2 / Z-Image and looking inside one of their
blocks, through ComfyUI's own code (none of the pack's).

A block's attention calls are seen through a user's optimized_attention_override on a clone, recording only
while the block's module runs (SD3 puts no block index in transformer_options): q, k, v as the kernel gets
them, (batch, heads, rows, dim_head), text rows first; "index" 0 is the joint attention, 1 SD3.5 Medium's
second, image-only one. Outputs are the inputs of the projections after the attention (image rows, text
rows, the image-only attention's; a Lumina layer's whole joint output), (batch, rows, heads * dim_head).
Qwen-Image's and Lumina's queries and keys before RoPE are their QK norms' outputs (Lumina's keys repeated to
every head as its grouped-query attention does), and their RoPE what the attention module is handed.
"""

from contextlib import contextmanager

import torch

import comfy.sample
import random_dits
from support.flux import adain_rows, softmax_attention, with_rope

HEIGHT = WIDTH = 8  # latent size: 4 x 4 image tokens
TEXT_TOKENS = 8
IMAGE = (HEIGHT // 2) * (WIDTH // 2)
BUILDERS = {"sd3": "tiny_sd3", "sd35_medium": "tiny_sd35_medium", "qwen_image": "tiny_qwen_image",
            "lumina2": "tiny_lumina2", "z_image": "tiny_z_image"}


def tiny(name, **kwargs):
    """The tiny model of that name (scripts/random_dits.py)."""
    return getattr(random_dits, BUILDERS[name])(**kwargs)


def lumina_reachable() -> bool:
    """Whether this ComfyUI's Lumina 2 gives its attention calls a block index (0.8.0 does, 0.3.75 not)."""
    import inspect
    import comfy.ldm.lumina.model
    return "block_index" in inspect.getsource(comfy.ldm.lumina.model.NextDiT._forward)


def family(model) -> str:
    dit = model.get_model_object("diffusion_model")
    return "qwen" if hasattr(dit, "transformer_blocks") else "lumina" if hasattr(dit, "noise_refiner") else "sd3"


def is_qwen(model) -> bool:
    return family(model) == "qwen"


def conditioning(model, seed=0):
    return {"qwen": random_dits.qwen_conditioning, "lumina": random_dits.lumina2_conditioning,
            "sd3": random_dits.sd3_conditioning}[family(model)](seed, TEXT_TOKENS)


def text_rows(model) -> int:
    """The text rows of a call: the prompt's tokens, padded where the model pads them (Z-Image: to 32)."""
    multiple = getattr(model.get_model_object("diffusion_model"), "pad_tokens_multiple", None) or 1
    return TEXT_TOKENS + (-TEXT_TOKENS % multiple)


def latent_shape(model, batch):
    return (batch, 16, 1, HEIGHT, WIDTH) if is_qwen(model) else (batch, 16, HEIGHT, WIDTH)


def dit_noise(model, batch=3, seed=0):
    return comfy.sample.prepare_noise(torch.zeros(latent_shape(model, batch)), seed)


def dit_sample(model, batch=3, cfg=1.0, steps=1, seed=0, noise=None, positive=None, negative=None):
    """ComfyUI's euler on the simple schedule (these flow models' sigma runs from exactly 1)."""
    noise = dit_noise(model, batch, seed) if noise is None else noise
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", positive or conditioning(model, 0),
                               negative or conditioning(model, 1), torch.zeros(latent_shape(model, batch)),
                               seed=seed, disable_pbar=True)


def block_of(model, site):
    dit = model.get_model_object("diffusion_model")
    return {"qwen": lambda: dit.transformer_blocks, "lumina": lambda: dit.layers,
            "sd3": lambda: dit.joint_blocks}[family(model)]()[site[1]]


def _heads_first(t, heads):
    """(batch, rows, heads * d) or (batch, rows, heads, d) -> (batch, heads, rows, d)."""
    return t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)


@contextmanager
def attention_calls(model, site):
    """(a clone whose attention calls in the block record, the list of calls: {q, k, v, cond_or_uncond, index})."""
    block = block_of(model, site)
    state = {"inside": False, "index": 0}
    calls = []

    def recorder(func, q, k, v, heads, *args, **kwargs):
        if state["inside"]:
            options = kwargs.get("transformer_options") or {}
            if kwargs.get("skip_reshape"):
                seen = [t.clone() for t in (q, k, v)]
            else:
                seen = [_heads_first(t, heads).clone() for t in (q, k, v)]
            calls.append({"q": seen[0], "k": seen[1], "v": seen[2], "index": state["index"],
                          "cond_or_uncond": list(options.get("cond_or_uncond", []))})
            state["index"] += 1
        return func(q, k, v, heads, *args, **kwargs)

    handles = [block.register_forward_pre_hook(lambda m, a: state.update(inside=True, index=0)),
               block.register_forward_hook(lambda m, a, o: state.update(inside=False))]
    clone = model.clone()
    clone.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = recorder
    try:
        yield clone, calls
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def attention_outputs(model, site):
    """{"image", "text", "image_only", "joint"}: per block call, the attention's output rows before their
    projections."""
    block = block_of(model, site)
    outputs = {"image": [], "text": [], "image_only": [], "joint": []}
    if family(model) == "lumina":
        modules = {"joint": block.attention.out}
    elif is_qwen(model):
        modules = {"image": block.attn.to_out[0], "text": block.attn.to_add_out}
    else:
        modules = {"image": block.x_block.attn}
        if not block.context_block.pre_only:
            modules["text"] = block.context_block.attn
        if block.x_block.x_block_self_attn:
            modules["image_only"] = block.x_block.attn2
        modules = {kind: attention.proj for kind, attention in modules.items()}
    handles = [module.register_forward_pre_hook(lambda m, i, kind=kind: outputs[kind].append(i[0].clone()))
               for kind, module in modules.items()]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def qwen_pre_rope(model, site):
    """Per block call of a Qwen-Image: {"q", "k"} after the QK norms, before RoPE (text first), and "pe"."""
    attn = block_of(model, site).attn
    calls, pending = [], {}
    hooks = {"q_img": attn.norm_q, "k_img": attn.norm_k, "q_txt": attn.norm_added_q}

    def text_keys(m, i, o):
        calls.append({"q": torch.cat([pending["q_txt"], pending["q_img"]], 2),
                      "k": torch.cat([o, pending["k_img"]], 2), "pe": pending["pe"]})
    handles = [module.register_forward_hook(lambda m, i, o, name=name: pending.update({name: o.clone()}))
               for name, module in hooks.items()]
    handles.append(attn.norm_added_k.register_forward_hook(text_keys))
    handles.append(attn.register_forward_pre_hook(lambda m, a, kw: pending.update(pe=kw["image_rotary_emb"][0]),
                                                  with_kwargs=True))
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def lumina_pre_rope(model, site):
    """Per layer call of a Lumina 2 / Z-Image: {"q", "k"} (batch, heads, rows, d) after the QK norms, before RoPE
    (keys repeated to every head), and "pe" (1, rows, d / 2, 2, 2)."""
    attention = block_of(model, site).attention
    calls, pending = [], {}

    def keys(m, i, o):
        heads = pending["q"].shape[1]
        k = o.transpose(1, 2)
        calls.append({"q": pending["q"], "k": k.repeat_interleave(heads // k.shape[1], dim=1).clone(),
                      "pe": pending["pe"]})
    handles = [attention.q_norm.register_forward_hook(lambda m, i, o: pending.update(q=o.transpose(1, 2).clone())),
               attention.k_norm.register_forward_hook(keys),
               attention.register_forward_pre_hook(lambda m, a: pending.update(pe=a[2][0].movedim(1, 0)))]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def chunks_of(call):
    """(reference row, target rows, kind) per cond/uncond chunk of a recorded call."""
    size = call["q"].shape[0] // len(call["cond_or_uncond"])
    return [(i * size, range(i * size + 1, (i + 1) * size), kind) for i, kind in enumerate(call["cond_or_uncond"])]


def vsp_by_hand(call, text=TEXT_TOKENS, image=IMAGE):
    """Each target's image rows' keys and values are its chunk's reference's (all of them in an image-only call)."""
    swapped = slice(text, text + image) if call["index"] == 0 else slice(None)
    out = []
    for ref, targets, _ in chunks_of(call):
        out.append(softmax_attention(call["q"][ref], call["k"][ref], call["v"][ref]))
        for row in targets:
            k, v = call["k"][row].clone(), call["v"][row].clone()
            k[:, swapped], v[:, swapped] = call["k"][ref][:, swapped], call["v"][ref][:, swapped]
            out.append(softmax_attention(call["q"][row], k, v))
    return torch.stack(out)


def shared_by_hand(call, factor=1.0, pre=None, shared_positions=None, text=TEXT_TOKENS, image=IMAGE):
    """StyleAligned: AdaIN of the image rows' q and k toward the reference's (before RoPE: pre, where the model
    has RoPE, rotated back by the call's own pe), then [own keys ; factor * the reference's image keys]
    (rotated to shared_positions where given) and [own values ; the reference's image values]."""
    rows = slice(text, text + image) if call["index"] == 0 else slice(0, None)
    out = []
    for ref, targets, _ in chunks_of(call):
        out.append(softmax_attention(call["q"][ref], call["k"][ref], call["v"][ref]))
        for row in targets:
            q, k = call["q"][row].clone(), call["k"][row].clone()
            for name, features in (("q", q), ("k", k)):
                if pre is None:
                    features[:, rows] = adain_rows(call[name][row][:, rows], call[name][ref][:, rows]).to(features)
                else:
                    normalised = adain_rows(pre[name][row][:, rows], pre[name][ref][:, rows])
                    features[:, rows] = with_rope(normalised, pre["pe"][..., rows, :, :, :]).to(features)
            shared = call["k"][ref][:, rows] if shared_positions is None else with_rope(pre["k"][ref][:, rows],
                                                                                        shared_positions)
            out.append(softmax_attention(q, torch.cat([k, factor * shared], 1),
                                         torch.cat([call["v"][row], call["v"][ref][:, rows]], 1)))
    return torch.stack(out)
