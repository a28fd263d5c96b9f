"""StyleAligned (Hertz et al. 2024) as diffusers attention processors and GroupNorm stand-ins.

Written from the paper's description of shared attention: in every self-attention layer, within each
guidance chunk, the first image is the reference; every image's queries and keys (optionally values)
are AdaIN-normalised toward the reference's (mean and unbiased std over tokens, + 1e-5), and it
attends to its own keys/values followed by the reference's (keys times score_scale for the other
images, score_shift added to those scores). Shared GroupNorm normalises each image stacked with the
reference along the height axis.
"""

import contextlib
import math

import torch

from .attention import projections


def _adain(x, reference):
    mean, std = x.mean(-2, keepdim=True), (x.var(-2, keepdim=True) + 1e-5).sqrt()
    reference_mean, reference_std = reference.mean(-2, keepdim=True), (reference.var(-2, keepdim=True) + 1e-5).sqrt()
    return (x - mean) / std * reference_std + reference_mean


class ExternalReference:
    def __init__(self):
        self.recording = False
        self.saved = {}


class StyleAlignedProcessor:
    def __init__(self, name, adain_values=False, score_scale=1.0, score_shift=0.0, chunks=2, external=None):
        self.name = name
        self.adain_values = adain_values
        self.score_scale = score_scale
        self.score_shift = score_shift
        self.chunks = chunks
        self.external = external

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        query, key, value = projections(attn, hidden_states, encoder_hidden_states)
        batch, tokens, inner = query.shape
        heads = attn.heads
        to_heads = lambda t: t.view(t.shape[0], -1, heads, inner // heads).transpose(1, 2)  # noqa: E731
        query, key, value = to_heads(query), to_heads(key), to_heads(value)

        if self.external is not None and self.external.recording:
            self.external.saved[self.name] = (query, key, value)
            out = torch.softmax(query @ key.transpose(-1, -2) / math.sqrt(inner // heads), -1) @ value
        else:
            if self.external is not None:
                ref_q, ref_k, ref_v = (t.expand(batch, -1, -1, -1) for t in self.external.saved[self.name])
                is_reference = torch.zeros(batch, dtype=torch.bool)
            else:
                per_chunk = batch // self.chunks
                first = torch.tensor([c * per_chunk for c in range(self.chunks) for _ in range(per_chunk)])
                ref_q, ref_k, ref_v = query[first], key[first], value[first]
                is_reference = first == torch.arange(batch)
            query = _adain(query, ref_q)
            key = _adain(key, ref_k)
            ref_k = _adain(ref_k, ref_k)
            if self.adain_values:
                value = _adain(value, ref_v)
                ref_v = _adain(ref_v, ref_v)
            scale = torch.where(is_reference, 1.0, self.score_scale).view(batch, 1, 1, 1)
            keys = torch.cat([key, scale * ref_k], dim=-2)
            values = torch.cat([value, ref_v], dim=-2)
            logits = query @ keys.transpose(-1, -2) / math.sqrt(inner // heads)
            logits[..., key.shape[-2]:] += self.score_shift
            out = torch.softmax(logits, -1) @ values
        out = out.transpose(1, 2).reshape(batch, tokens, inner)
        return attn.to_out[1](attn.to_out[0](out))


class SharedGroupNorm(torch.nn.Module):
    def __init__(self, norm, name, chunks=2, external=None):
        super().__init__()
        self.norm, self.name, self.chunks, self.external = norm, name, chunks, external
        self.enabled = True

    def forward(self, x):
        if not self.enabled:
            return self.norm(x)
        if self.external is not None:
            if self.external.recording:
                self.external.saved[self.name] = x
                return self.norm(x)
            reference = self.external.saved[self.name].expand(x.shape[0], -1, -1, -1)
        else:
            per_chunk = x.shape[0] // self.chunks
            reference = x[[c * per_chunk for c in range(self.chunks) for _ in range(per_chunk)]]
        height = x.shape[-2]
        return self.norm(torch.cat([x, reference], dim=-2))[..., :height, :]


@contextlib.contextmanager
def shared_group_norms(unet, chunks=2, external=None):
    """Swap every GroupNorm of the UNet for its shared version for the duration of the block."""
    replaced = []
    for parent_name, parent in list(unet.named_modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is torch.nn.GroupNorm:
                name = f"{parent_name}.{child_name}"
                setattr(parent, child_name, SharedGroupNorm(child, name, chunks, external))
                replaced.append((parent, child_name, child))
    try:
        yield
    finally:
        for parent, child_name, child in replaced:
            setattr(parent, child_name, child)


def install(unet, processor_names, external=None, **options):
    from .attention import PlainProcessor

    unet.set_attn_processor({
        name: StyleAlignedProcessor(name, external=external, **options) if name in processor_names else PlainProcessor()
        for name in unet.attn_processors
    })
