"""Visual Style Prompting and StyleAligned with several weighted external references on the SD3 / SD3.5, Qwen-Image
and Lumina 2 / Z-Image diffusers twins, written independently of the pack, as the Flux ones in reference_sets.py:
each reference is recorded by its own pass (the per-family record_reference; the family's twin_sample with
references=[...] runs one pass per reference before each call of the targets), reference i's keys get log w_i
added to their scores (an explicit additive bias), AdaIN moves toward the mixture of the references' per head and
channel distributions in proportions w_i / sum w (reference_sets.mixture_stats: raw moments, float64), and
AlignedGen's appended keys are each reference's pre-RoPE image keys turned at its own grid moved right by the
target's token columns (the same move for every reference), times the style factor.

VSP: each target row's image keys and values are every reference's image rows (one reference after another; after
RoPE at the reference's own positions on Qwen-Image and Lumina, no RoPE on SD3), its text (and padding / extra)
rows' keys and values and all its queries its own. StyleAligned: the target's image queries and keys AdaIN'd, then
[its own keys; style_factor * every reference's image keys], [its own values; every reference's image values].
"""

import torch

from . import lumina_attention as lumina
from . import qwen_attention as qwen
from . import sd3_attention as sd3
from .reference_sets import adain_toward, log_weight_bias, mixture_stats


def _proportions(weights):
    total = sum(weights)
    return [w / total for w in weights]


def _bias(saved, weights, batch, before, after=0, shift=0.0):
    """(batch, keys): 0 on the row's own `before` keys, shift + log w_i on reference i's, 0 on `after` keys."""
    bias = torch.cat([log_weight_bias([s["v"].shape[2] for s in saved], weights, before=before, shift=shift),
                      torch.zeros(after)])
    return bias.expand(batch, -1)


def _expand(saved, name, batch):
    return [s[name].expand(batch, -1, -1, -1) for s in saved]


def _adain_image(x, start, end, saved, name, weights):
    """x with its rows start:end AdaIN'd per head and channel toward the references' mixture of `name`."""
    toward = mixture_stats([s[name] for s in saved], _proportions(weights), -2)
    return torch.cat([x[:, :, :start], adain_toward(x[:, :, start:end], toward, -2), x[:, :, end:]], 2)


# --------------------------------------------------------------------------------------------- SD3 / SD3.5


class VisualStylePromptingSD3Set:
    def __init__(self, site, references, weights):
        self.site, self.references, self.weights = site, references, weights

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        q, k, v, text = sd3.qkv(attn, hidden_states, encoder_hidden_states)
        batch, saved = q.shape[0], [r.features[self.site] for r in self.references]
        keys = torch.cat([k[:, :, :text], *_expand(saved, "k", batch)], 2)
        values = torch.cat([v[:, :, :text], *_expand(saved, "v", batch)], 2)
        out = sd3.attend(q, keys, values, _bias(saved, self.weights, batch, before=text))
        return sd3.block_output(attn, out, encoder_hidden_states, text)


class StyleAlignedSD3Set:
    def __init__(self, site, references, weights, style_factor=1.0):
        self.site, self.references, self.weights, self.style_factor = site, references, weights, style_factor

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        q, k, v, text = sd3.qkv(attn, hidden_states, encoder_hidden_states)
        batch, saved = q.shape[0], [r.features[self.site] for r in self.references]
        end = q.shape[2]
        q = _adain_image(q, text, end, saved, "q", self.weights)
        k = _adain_image(k, text, end, saved, "k", self.weights)
        keys = torch.cat([k, self.style_factor * torch.cat(_expand(saved, "k", batch), 2)], 2)
        values = torch.cat([v, *_expand(saved, "v", batch)], 2)
        out = sd3.attend(q, keys, values, _bias(saved, self.weights, batch, before=k.shape[2]))
        return sd3.block_output(attn, out, encoder_hidden_states, text)


def with_sd3_vsp(twin, blocks, references, weights):
    """Context manager: VisualStylePromptingSD3Set on every attention of the given blocks (attn2 included)."""
    return sd3.installed(twin, {site: VisualStylePromptingSD3Set(site, references, weights)
                                for site in sd3.sites_of(twin, blocks)})


def with_sd3_style_aligned(twin, blocks, references, weights, style_factor=1.0):
    return sd3.installed(twin, {site: StyleAlignedSD3Set(site, references, weights, style_factor)
                                for site in sd3.sites_of(twin, blocks)})


# --------------------------------------------------------------------------------------------- Qwen-Image


class VisualStylePromptingQwenSet:
    def __init__(self, layout, references, weights, block):
        self.layout, self.references, self.weights, self.block = layout, references, weights, block

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None):
        q, k, v = qwen.joint_qkv(attn, hidden_states, encoder_hidden_states)
        freqs = qwen.checked_rotary(self.layout, image_rotary_emb)
        q, k = qwen.rotate(q, freqs), qwen.rotate(k, freqs)
        batch, text, end = q.shape[0], self.layout.text, self.layout.text + self.layout.image
        saved = [r.blocks[self.block] for r in self.references]
        keys = torch.cat([k[:, :, :text], *_expand(saved, "k_rope", batch), k[:, :, end:]], 2)
        values = torch.cat([v[:, :, :text], *_expand(saved, "v", batch), v[:, :, end:]], 2)
        bias = _bias(saved, self.weights, batch, before=text, after=k.shape[2] - end)
        return qwen.block_output(attn, qwen.attend(q, keys, values, bias), text)


def _beside(references, saved, layout, batch):
    """Each reference's pre-RoPE image keys turned by RoPE at its own grid moved right by the target's columns."""
    shared = []
    for reference, s in zip(references, saved):
        ids = reference.image_ids.clone()
        ids[:, 2] += layout.cols
        shared.append(qwen.rotate(s["k"], layout.positions.freqs(ids)).expand(batch, -1, -1, -1))
    return torch.cat(shared, 2)


class StyleAlignedQwenSet:
    def __init__(self, layout, references, weights, block, style_factor=1.0):
        self.layout, self.references, self.weights, self.block = layout, references, weights, block
        self.style_factor = style_factor

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None):
        q, k, v = qwen.joint_qkv(attn, hidden_states, encoder_hidden_states)
        freqs = qwen.checked_rotary(self.layout, image_rotary_emb)
        batch, text, end = q.shape[0], self.layout.text, self.layout.text + self.layout.image
        saved = [r.blocks[self.block] for r in self.references]
        q = qwen.rotate(_adain_image(q, text, end, saved, "q", self.weights), freqs)
        k = qwen.rotate(_adain_image(k, text, end, saved, "k", self.weights), freqs)
        keys = torch.cat([k, self.style_factor * _beside(self.references, saved, self.layout, batch)], 2)
        values = torch.cat([v, *_expand(saved, "v", batch)], 2)
        bias = _bias(saved, self.weights, batch, before=k.shape[2])
        return qwen.block_output(attn, qwen.attend(q, keys, values, bias), text)


def with_qwen_vsp(twin, blocks, references, weights):
    chosen = set(blocks)
    return qwen.installed(twin, lambda block, layout: VisualStylePromptingQwenSet(layout, references, weights, block)
                          if block in chosen else None)


def with_qwen_style_aligned(twin, blocks, references, weights, style_factor=1.0):
    chosen = set(blocks)
    return qwen.installed(twin, lambda block, layout: StyleAlignedQwenSet(layout, references, weights, block,
                                                                          style_factor) if block in chosen else None)


# --------------------------------------------------------------------------------------------- Lumina 2 / Z-Image


class VisualStylePromptingLuminaSet:
    def __init__(self, layout, references, weights, layer):
        self.layout, self.references, self.weights, self.layer = layout, references, weights, layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 base_sequence_length=None):
        q, k, v = lumina.joint_qkv(attn, hidden_states)
        freqs = lumina.checked_rotary(self.layout, image_rotary_emb, q.shape[2])
        q, k = lumina.rotate(q, freqs), lumina.rotate(k, freqs)
        batch, text, end = q.shape[0], self.layout.text, self.layout.text + self.layout.image
        saved = [r.layers[self.layer] for r in self.references]
        keys = torch.cat([k[:, :, :text], *_expand(saved, "k_rope", batch), k[:, :, end:]], 2)
        values = torch.cat([v[:, :, :text], *_expand(saved, "v", batch), v[:, :, end:]], 2)
        bias = _bias(saved, self.weights, batch, before=text, after=k.shape[2] - end)
        return lumina.projected(attn, lumina.attend(q, keys, values, bias))


class StyleAlignedLuminaSet:
    def __init__(self, layout, references, weights, layer, style_factor=1.0):
        self.layout, self.references, self.weights, self.layer = layout, references, weights, layer
        self.style_factor = style_factor

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 base_sequence_length=None):
        q, k, v = lumina.joint_qkv(attn, hidden_states)
        freqs = lumina.checked_rotary(self.layout, image_rotary_emb, q.shape[2])
        batch, text, end = q.shape[0], self.layout.text, self.layout.text + self.layout.image
        saved = [r.layers[self.layer] for r in self.references]
        q = lumina.rotate(_adain_image(q, text, end, saved, "q", self.weights), freqs)
        k = lumina.rotate(_adain_image(k, text, end, saved, "k", self.weights), freqs)
        shared = []
        for reference, s in zip(self.references, saved):
            ids = reference.image_ids.clone()
            ids[:, 2] += self.layout.cols
            shared.append(lumina.rotate(s["k"], self.layout.positions.freqs(ids)).expand(batch, -1, -1, -1))
        keys = torch.cat([k, self.style_factor * torch.cat(shared, 2)], 2)
        values = torch.cat([v, *_expand(saved, "v", batch)], 2)
        bias = _bias(saved, self.weights, batch, before=k.shape[2])
        return lumina.projected(attn, lumina.attend(q, keys, values, bias))


def with_lumina_vsp(twin, layers, references, weights):
    chosen = set(layers)
    return lumina.installed(twin, lambda layer, layout: VisualStylePromptingLuminaSet(
        layout, references, weights, layer) if layer in chosen else None)


def with_lumina_style_aligned(twin, layers, references, weights, style_factor=1.0):
    chosen = set(layers)
    return lumina.installed(twin, lambda layer, layout: StyleAlignedLuminaSet(
        layout, references, weights, layer, style_factor) if layer in chosen else None)
