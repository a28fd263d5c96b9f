"""Visual Style Prompting and StyleAligned on Qwen-Image as diffusers attention processors on the twin
(tests/support/qwen_twin.py), written independently of the pack; and ComfyUI's euler sampling on Qwen-Image's
flow schedule written out with the twin as the model. blocks are transformer_blocks indices.

In-batch: within each of `chunks` equal chunks of the batch (cond, then uncond), the first row is the reference
and runs plain attention. External: record_reference runs a reference (batch 1, its own latent, size and
prompt) and keeps its image rows per block; with reference=... every row of every chunk is a target.
Text rows and extra rows (the edit model's reference latents) are never styled: they keep their own q, k, v.
"""

import math

import torch

from .qwen_attention import (QwenReference, RecordingProcessor, attend, block_output, checked_rotary, chunk_firsts,
                             installed, joint_qkv, rotate)
from support.qwen_twin import twin_denoise


class VisualStylePromptingQwen:
    """VSP as Stable Flow swaps: each target's image rows' keys (after RoPE) and values are the reference's
    image rows' (after RoPE, at the reference's own positions); its text and extra rows' keys and values and all
    its queries stay its own. Output lerp(plain, swapped, strength) over all rows."""

    def __init__(self, layout, strength=1.0, chunks=1, reference=None, block=None):
        self.layout, self.strength, self.chunks, self.reference, self.block = layout, strength, chunks, reference, block

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None):
        q, k, v = joint_qkv(attn, hidden_states, encoder_hidden_states)
        freqs = checked_rotary(self.layout, image_rotary_emb)
        q, k = rotate(q, freqs), rotate(k, freqs)
        batch, text, end = q.shape[0], self.layout.text, self.layout.text + self.layout.image
        if self.reference is not None:
            saved = self.reference.blocks[self.block]
            ref_k, ref_v = (saved[n].expand(batch, -1, -1, -1) for n in ("k_rope", "v"))
            is_reference = torch.zeros(batch, dtype=torch.bool)
        else:
            first = chunk_firsts(batch, self.chunks)
            ref_k, ref_v, is_reference = k[first, :, text:end], v[first, :, text:end], first == torch.arange(batch)
        swapped = attend(q, torch.cat([k[:, :, :text], ref_k, k[:, :, end:]], 2),
                         torch.cat([v[:, :, :text], ref_v, v[:, :, end:]], 2))
        weight = torch.where(is_reference, 0.0, float(self.strength)).view(batch, 1, 1)
        return block_output(attn, torch.lerp(attend(q, k, v), swapped, weight), text)


def _stats(x):
    """Per head and channel over rows (dim -2): mean and sqrt(unbiased variance + 1e-5)."""
    return x.mean(-2, keepdim=True), (x.var(-2, keepdim=True) + 1e-5).sqrt()


def _adain(x, toward_stats):
    mean, std = _stats(x)
    return (x - mean) / std * toward_stats[1] + toward_stats[0]


class StyleAlignedQwen:
    """StyleAligned as AlignedGen on Qwen-Image: each target's image rows' queries and keys (after the QK norm,
    before RoPE) AdaIN'd toward the reference's image rows' (per head and channel); RoPE as usual; keys
    [own joint keys; style_factor * the reference's pre-RoPE image keys turned by RoPE at the reference's image
    positions, shifted by the target's width in tokens on the width axis (shift=False: unshifted)], values [own;
    the reference's image values], one softmax. The reference row runs plain attention. share=False: AdaIN only."""

    def __init__(self, layout, style_factor=1.0, shift=True, share=True, chunks=1, reference=None, block=None):
        self.layout, self.style_factor, self.shift, self.share = layout, style_factor, shift, share
        self.chunks, self.reference, self.block = chunks, reference, block

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None):
        q, k, v = joint_qkv(attn, hidden_states, encoder_hidden_states)
        freqs = checked_rotary(self.layout, image_rotary_emb)
        batch, text, end = q.shape[0], self.layout.text, self.layout.text + self.layout.image
        if self.reference is not None:
            saved = self.reference.blocks[self.block]
            ref_q, ref_k, ref_v = (saved[n].expand(batch, -1, -1, -1) for n in ("q", "k", "v"))
            ref_ids, is_reference = self.reference.image_ids, torch.zeros(batch, dtype=torch.bool)
        else:
            first = chunk_firsts(batch, self.chunks)
            ref_q, ref_k, ref_v = q[first, :, text:end], k[first, :, text:end], v[first, :, text:end]
            ref_ids, is_reference = self.layout.image_ids(), first == torch.arange(batch)
        keep = is_reference.view(batch, 1, 1, 1)  # the reference row is left as it is
        image_q = torch.where(keep, q[:, :, text:end], _adain(q[:, :, text:end], _stats(ref_q)))
        image_k = torch.where(keep, k[:, :, text:end], _adain(k[:, :, text:end], _stats(ref_k)))
        q = rotate(torch.cat([q[:, :, :text], image_q, q[:, :, end:]], 2), freqs)
        k = rotate(torch.cat([k[:, :, :text], image_k, k[:, :, end:]], 2), freqs)
        if not self.share:
            return block_output(attn, attend(q, k, v), text)
        ids = ref_ids.clone()
        if self.shift:
            ids[:, 2] += self.layout.cols
        ref_k = rotate(ref_k, self.layout.positions.freqs(ids))
        scale = torch.where(is_reference, 1.0, float(self.style_factor)).view(batch, 1, 1, 1)
        keys, values = torch.cat([k, scale * ref_k], 2), torch.cat([v, ref_v], 2)
        mask = torch.zeros(batch, keys.shape[2])
        mask[is_reference, k.shape[2]:] = float("-inf")
        return block_output(attn, attend(q, keys, values, mask), text)


def _resolve(twin, blocks):
    blocks, known = set(blocks), set(range(len(twin.transformer_blocks)))
    if not blocks <= known:
        raise ValueError(f"no such blocks: {sorted(blocks - known)}")
    return blocks


def with_vsp(twin, blocks, strength=1.0, chunks=1, reference: QwenReference | None = None):
    """Context manager: VisualStylePromptingQwen on the given blocks of the twin (the others plain)."""
    chosen = _resolve(twin, blocks)
    return installed(twin, lambda block, layout: VisualStylePromptingQwen(
        layout, strength, chunks, reference, block) if block in chosen else None)


def with_style_aligned(twin, blocks, style_factor=1.0, shift=True, share=True, chunks=1,
                       reference: QwenReference | None = None):
    """Context manager: StyleAlignedQwen on the given blocks of the twin (the others plain)."""
    chosen = _resolve(twin, blocks)
    return installed(twin, lambda block, layout: StyleAlignedQwen(
        layout, style_factor, shift, share, chunks, reference, block) if block in chosen else None)


def record_reference(twin, blocks, run) -> QwenReference:
    """The reference's image rows at the given blocks from one plain pass: run() calls the twin once with a batch
    of 1 (e.g. lambda: twin_denoise(twin, ref_x, sigma, ref_context))."""
    chosen = _resolve(twin, blocks)
    reference = QwenReference()
    with installed(twin, lambda block, layout: RecordingProcessor(block, reference, layout) if block in chosen
                   else None):
        run()
    return reference


def qwen_sigmas(steps: int, shift: float = 1.15) -> torch.Tensor:
    """The simple schedule on Qwen-Image's sampling (ModelSamplingFlux, shift 1.15): ComfyUI's table
    sigma(t) = e^shift / (e^shift + 1 / t - 1) at t = i / 10000, i = 1..10000, read from the top every
    10000 / steps entries, then 0. sigma_max is exactly 1."""
    t = torch.arange(1, 10001) / 10000
    table = math.exp(shift) / (math.exp(shift) + (1 / t - 1))
    stride = len(table) / steps
    return torch.tensor([float(table[-(1 + int(i * stride))]) for i in range(steps)] + [0.0])


def twin_sample(twin, noise, steps, cfg, positive, negative, install, reference=None, shift=1.15, references=None):
    """ComfyUI's euler on the simple schedule (an empty latent: sigma_max 1, so x starts as the noise), written
    out with the twin as the model; -> the final latent in the model's space, (B, 16, 1, H, W)
    (model.model.process_latent_out gives what comfy.sample.sample returns).

    noise: (B, 16, 1, H, W). positive, negative: [[context (1, T, D), {}]]; cfg 1 runs the cond branch alone, else
    [cond rows; uncond rows] in one batch of 2 chunks and uncond + cfg (cond - uncond) on x0. install(**kwargs) ->
    a context manager (e.g. lambda **kw: with_vsp(twin, [0, 1], **kw)); it gets chunks= (in-batch) or reference=
    (external). reference: None (in-batch) or (clean latent in the model's space (1, 16, 1, h, w), its noise, its
    conditioning): each step records that latent at sigma (sigma noise + (1 - sigma) clean) alone with that
    conditioning, then every chunk of the targets replays it. references: a list of such triples instead, each
    recorded by its own pass in order; install then gets references= (their recordings, a list)."""
    branches = [positive[0]] + ([negative[0]] if cfg != 1.0 else [])
    if len({c.shape[1] for c, _ in branches}) > 1:  # ComfyUI would repeat one to the lcm, or run them apart
        raise ValueError("give cond and uncond prompts of one length: they are batched as they are")
    batch = noise.shape[0]
    context = torch.cat([c.expand(batch, -1, -1) for c, _ in branches])
    sigmas = qwen_sigmas(steps, shift)
    x = noise.clone()
    for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        kwargs = {"chunks": len(branches)}
        if reference is not None:
            clean, ref_noise, ((ref_context, _),) = reference
            ref_x = sigma * ref_noise + (1 - sigma) * clean
            kwargs = {"reference": record_reference(twin, range(len(twin.transformer_blocks)),
                                                    lambda: twin_denoise(twin, ref_x, sigma, ref_context))}
        elif references is not None:
            kwargs = {"references": [record_reference(twin, range(len(twin.transformer_blocks)), lambda: twin_denoise(
                twin, sigma * ref_noise + (1 - sigma) * clean, sigma, ref_context))
                for clean, ref_noise, ((ref_context, _),) in references]}
        rows = x.repeat(len(branches), *[1] * (x.ndim - 1))
        with install(**kwargs):
            velocity = twin_denoise(twin, rows, sigma, context)
        denoised = (rows - sigma * velocity).chunk(len(branches))
        guided = denoised[0] if cfg == 1.0 else denoised[1] + cfg * (denoised[0] - denoised[1])
        x = x + (sigma_next - sigma) * (x - guided) / sigma
    return x
