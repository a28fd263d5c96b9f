"""Visual Style Prompting and StyleAligned with several external style references, each with a weight, as
diffusers attention processors (and GroupNorm stand-ins) on the UNet twin and on the Flux twin, written
independently of the pack.

What a weight means (the README's "Several style references"): a reference of weight w acts as w copies of
its keys. Softmax over a key present n times equals softmax over it once with log n added to its score, so
the oracle adds log w_i to the scores of reference i's keys (an explicit additive bias, not a kernel's).

Statistics are those of the mixture of the references' per-channel distributions in proportions
p_i = w_i / sum w. Written here by the raw moments (law of total variance): mean = sum p_i mu_i,
variance = sum p_i (sigma_i^2 + mu_i^2) - mean^2, in float64, each sigma_i^2 the reference's own unbiased
variance over tokens (StyleAligned's calc_mean_std).

StyleAligned's shared GroupNorm with one reference normalises [target; reference] jointly. With a set it
pools the target with the references' mixture: written here as one weighted sample per group, each target
element of weight 1 and each element of reference i of weight C p_i / n_i (n_i its elements in the group,
C = sum w_i n_i the count the set stands for: w_i copies of each reference, as in attention), so that the
references weigh C in all and reference i p_i of that; the weighted mean and (biased) variance of that sample
normalise the target.

Each reference is recorded by its own pass: set ReferenceSet.recording to its index while the model runs
that reference alone (batch 1, its own latent, size and prompt) before each call of the targets.
"""

import contextlib
import math

import torch

from .attention import attend, projections
from .flux_attention import (FluxReference, attend as flux_attend, block_output, installed, joint_qkv, rotate)
from .flux_style import _resolve


class ReferenceSet:
    """The references' recordings (one dict per reference, by processor or norm name) and their weights."""

    def __init__(self, weights):
        if not all(w > 0 for w in weights):
            raise ValueError("weights above 0 (a weight of 0 leaves its reference out of the set)")
        self.weights = tuple(float(w) for w in weights)
        self.recordings = [{} for _ in self.weights]
        self.recording: int | None = None  # the reference whose own pass is running

    @property
    def proportions(self):
        total = sum(self.weights)
        return tuple(w / total for w in self.weights)

    def record(self, name, value):
        self.recordings[self.recording][name] = value

    def recorded(self, name):
        return [recording[name] for recording in self.recordings]


def log_weight_bias(lengths, weights, before=0, shift=0.0):
    """Per key: 0 for `before` keys (the target's own), then shift + log w_i for each of reference i's keys."""
    pieces = [torch.zeros(before)] + [torch.full((n,), shift + math.log(w)) for n, w in zip(lengths, weights)]
    return torch.cat(pieces)


def mixture_stats(references, proportions, dim):
    """(mean, std) over dim of the mixture of the references' distributions (raw-moment form, float64):
    std = sqrt(sum p_i (var_i + mu_i^2) - mean^2 + 1e-5), var_i unbiased."""
    means = [r.double().mean(dim, keepdim=True) for r in references]
    second = [r.double().var(dim, keepdim=True) + m.square() for r, m in zip(references, means)]
    mean = sum(p * m for p, m in zip(proportions, means))
    variance = sum(p * s for p, s in zip(proportions, second)) - mean.square()
    return mean, (variance + 1e-5).sqrt()


def adain_toward(x, stats, dim):
    """x's channels given the target (mean, std), over dim; x's own std from its unbiased variance + 1e-5."""
    mean, std = stats
    x64 = x.double()
    own = (x64 - x64.mean(dim, keepdim=True)) / (x64.var(dim, keepdim=True) + 1e-5).sqrt()
    return (own * std + mean).to(x.dtype)


# --------------------------------------------------------------------------------------------- UNet twin


def biased_attend(attn, query, key, value, bias):
    """softmax(q k^T * scale + bias) v per head (bias one value per key), then the output projection."""
    def heads(t):
        return t.unflatten(-1, (attn.heads, -1)).transpose(1, 2)

    scores = heads(query) @ heads(key).transpose(-1, -2) * attn.scale + bias
    out = (torch.softmax(scores, -1) @ heads(value)).transpose(1, 2).flatten(2)
    return attn.to_out[1](attn.to_out[0](out))


class VisualStylePromptingSet:
    """VSP (Jeong et al. 2024) from several references: every target attends to the references' keys and
    values, reference i's scores raised by log w_i. A reference's own pass records and attends to itself."""

    def __init__(self, name, references: ReferenceSet):
        self.name, self.references = name, references

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        query, key, value = projections(attn, hidden_states, encoder_hidden_states)
        if self.references.recording is not None:
            self.references.record(self.name, (key, value))
            return attend(attn, query, key, value)
        recorded = self.references.recorded(self.name)
        batch = query.shape[0]
        keys = torch.cat([k for k, _ in recorded], 1).expand(batch, -1, -1)
        values = torch.cat([v for _, v in recorded], 1).expand(batch, -1, -1)
        bias = log_weight_bias([k.shape[1] for k, _ in recorded], self.references.weights)
        return biased_attend(attn, query, keys, values, bias)


class StyleAlignedSet:
    """StyleAligned (Hertz et al. 2024) from several references: the target's queries and keys (values with
    adain_values) AdaIN'd toward the references' mixture over tokens; it attends to [its own keys; every
    reference's keys times score_scale], reference i's scores raised by score_shift + log w_i. A reference's
    keys and values join as its own pass made them (AdaIN toward itself changes nothing)."""

    def __init__(self, name, references: ReferenceSet, adain_values=False, score_scale=1.0, score_shift=0.0):
        self.name, self.references = name, references
        self.adain_values, self.score_scale, self.score_shift = adain_values, score_scale, score_shift

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        query, key, value = projections(attn, hidden_states, encoder_hidden_states)
        if self.references.recording is not None:
            self.references.record(self.name, (query, key, value))
            return attend(attn, query, key, value)
        recorded = self.references.recorded(self.name)
        p = self.references.proportions
        query = adain_toward(query, mixture_stats([q for q, _, _ in recorded], p, 1), 1)
        key = adain_toward(key, mixture_stats([k for _, k, _ in recorded], p, 1), 1)
        if self.adain_values:
            value = adain_toward(value, mixture_stats([v for _, _, v in recorded], p, 1), 1)
        batch = query.shape[0]
        shared_keys = torch.cat([k for _, k, _ in recorded], 1).expand(batch, -1, -1)
        shared_values = torch.cat([v for _, _, v in recorded], 1).expand(batch, -1, -1)
        keys = torch.cat([key, self.score_scale * shared_keys], 1)
        values = torch.cat([value, shared_values], 1)
        bias = log_weight_bias([k.shape[1] for _, k, _ in recorded], self.references.weights,
                               before=key.shape[1], shift=self.score_shift)
        return biased_attend(attn, query, keys, values, bias)


class SharedGroupNormSet(torch.nn.Module):
    """A GroupNorm whose targets are normalised with the references' elements pooled in (the weighted
    sample of the module docstring); a reference's own pass records its input and is normalised alone."""

    def __init__(self, norm: torch.nn.GroupNorm, name, references: ReferenceSet):
        super().__init__()
        self.norm, self.name, self.references = norm, name, references

    def forward(self, x):
        if self.references.recording is not None:
            self.references.record(self.name, x)
            return self.norm(x)
        batch, groups = x.shape[0], self.norm.num_groups
        members = [r.double().reshape(groups, -1) for r in self.references.recorded(self.name)]
        p = self.references.proportions
        counts = [m.shape[1] for m in members]
        stands_for = sum(w * n for w, n in zip(self.references.weights, counts))
        target = x.double().reshape(batch, groups, -1)
        sample = torch.cat([target, *(m.expand(batch, -1, -1) for m in members)], -1)
        weights = torch.cat([torch.ones(target.shape[-1], dtype=torch.float64)]
                            + [torch.full((n,), stands_for * pi / n, dtype=torch.float64) for pi, n in zip(p, counts)])
        total = weights.sum()
        mean = (sample * weights).sum(-1, keepdim=True) / total
        variance = ((sample - mean).square() * weights).sum(-1, keepdim=True) / total
        normalised = ((target - mean) / (variance + self.norm.eps).sqrt()).reshape(x.shape)
        if self.norm.affine:
            shape = (1, -1) + (1,) * (x.ndim - 2)
            normalised = normalised * self.norm.weight.double().view(shape) + self.norm.bias.double().view(shape)
        return normalised.to(x.dtype)


def install_vsp(unet, processor_names, references: ReferenceSet):
    from .attention import PlainProcessor

    unet.set_attn_processor({name: VisualStylePromptingSet(name, references) if name in processor_names
                             else PlainProcessor() for name in unet.attn_processors})


def install_style_aligned(unet, processor_names, references: ReferenceSet, **options):
    from .attention import PlainProcessor

    unet.set_attn_processor({name: StyleAlignedSet(name, references, **options) if name in processor_names
                             else PlainProcessor() for name in unet.attn_processors})


@contextlib.contextmanager
def shared_group_norms(unet, references: ReferenceSet):
    """Every GroupNorm of the UNet shared with the set for the duration of the block."""
    replaced = []
    for parent_name, parent in list(unet.named_modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is torch.nn.GroupNorm:
                setattr(parent, child_name, SharedGroupNormSet(child, f"{parent_name}.{child_name}", references))
                replaced.append((parent, child_name, child))
    try:
        yield
    finally:
        for parent, child_name, child in replaced:
            setattr(parent, child_name, child)


# --------------------------------------------------------------------------------------------- Flux twin
# A Flux reference is a FluxReference from flux_style.record_reference (its own pass, batch 1): per block its
# image rows' q/k/v after QK-norm before RoPE, k after RoPE at its own positions, and its image ids.


class VisualStylePromptingFluxSet:
    """Stable Flow's swap from several references: each row's image keys and values (after QK-norm and RoPE)
    are every reference's image keys (at the reference's own positions) and values, one reference after
    another, reference i's scores raised by log w_i; the text keys/values and every query stay the row's."""

    def __init__(self, layout, references, weights, block):
        self.layout, self.references, self.weights, self.block = layout, references, weights, block

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        q, k, v, text = joint_qkv(attn, hidden_states, encoder_hidden_states, self.layout.text_tokens)
        q, k = rotate(q, image_rotary_emb), rotate(k, image_rotary_emb)
        batch = q.shape[0]
        saved = [r.blocks[self.block] for r in self.references]
        keys = torch.cat([k[:, :, :text], *(s["k_rope"].expand(batch, -1, -1, -1) for s in saved)], 2)
        values = torch.cat([v[:, :, :text], *(s["v"].expand(batch, -1, -1, -1) for s in saved)], 2)
        bias = log_weight_bias([s["v"].shape[2] for s in saved], self.weights, before=text)
        return block_output(attn, flux_attend(q, keys, values, bias.expand(batch, -1)), encoder_hidden_states, text)


class AlignedGenFluxSet:
    """AlignedGen's StyleAligned on Flux from several references: the image queries and keys (after QK-norm,
    before RoPE) AdaIN'd per head and channel toward the references' mixture; RoPE at the row's positions;
    every reference's image keys appended, each turned by RoPE at its own grid moved right by the target's
    token columns (AlignedGen's reference_image_ids[:, 2] += width), times style_factor, and its image values
    appended to the row's values; reference i's scores raised by score_shift + log w_i."""

    def __init__(self, layout, references, weights, block, style_factor=1.1, score_shift=0.0):
        self.layout, self.references, self.weights, self.block = layout, references, weights, block
        self.style_factor, self.score_shift = style_factor, score_shift

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        q, k, v, text = joint_qkv(attn, hidden_states, encoder_hidden_states, self.layout.text_tokens)
        batch = q.shape[0]
        saved = [r.blocks[self.block] for r in self.references]
        total = sum(self.weights)
        p = [w / total for w in self.weights]
        image_q = adain_toward(q[:, :, text:], mixture_stats([s["q"] for s in saved], p, -2), -2)
        image_k = adain_toward(k[:, :, text:], mixture_stats([s["k"] for s in saved], p, -2), -2)
        q = rotate(torch.cat([q[:, :, :text], image_q], 2), image_rotary_emb)
        k = rotate(torch.cat([k[:, :, :text], image_k], 2), image_rotary_emb)
        shared = []
        for reference, s in zip(self.references, saved):
            ids = reference.image_ids.clone()
            ids[:, 2] += self.layout.columns
            shared.append(rotate(s["k"], self.layout.pos_embed(ids)).expand(batch, -1, -1, -1))
        keys = torch.cat([k, self.style_factor * torch.cat(shared, 2)], 2)
        values = torch.cat([v, *(s["v"].expand(batch, -1, -1, -1) for s in saved)], 2)
        bias = log_weight_bias([s["k"].shape[2] for s in saved], self.weights, before=k.shape[2],
                               shift=self.score_shift)
        return block_output(attn, flux_attend(q, keys, values, bias.expand(batch, -1)), encoder_hidden_states, text)


def with_flux_vsp(twin, blocks, references: list[FluxReference], weights):
    """Context manager: VisualStylePromptingFluxSet on the given blocks of the twin (the others plain)."""
    chosen = _resolve(twin, blocks)
    return installed(twin, lambda block, layout: VisualStylePromptingFluxSet(layout, references, weights, block)
                     if block in chosen else None)


def with_flux_aligned_gen(twin, blocks, references: list[FluxReference], weights, style_factor=1.1, score_shift=0.0):
    """Context manager: AlignedGenFluxSet on the given blocks of the twin (the others plain)."""
    chosen = _resolve(twin, blocks)
    return installed(twin, lambda block, layout: AlignedGenFluxSet(layout, references, weights, block, style_factor,
                                                                   score_shift) if block in chosen else None)
