"""Visual Style Prompting and StyleAligned on Flux as diffusers attention processors on the twin
(tests/support/flux_twin.py), written independently of the pack. blocks are ("double", i) / ("single", i).

In-batch: within each of `chunks` equal chunks of the batch, the first row is the reference and runs plain
attention. External: record_reference runs a reference (batch 1, its own latent, size and prompt) and keeps
its image tokens per block; with reference=... every row of the target batch is a target.
"""

import torch

from .flux_attention import (FluxReference, RecordingProcessor, all_blocks, attend, block_output, chunk_firsts,
                             installed, joint_qkv, rotate)


class VisualStylePromptingFlux:
    """VSP on Flux as Stable Flow (snap-research/stable-flow) swaps: in the joint attention, each target row's
    image-token keys and values, after QK-norm and RoPE, are the reference's; its text keys/values and all
    queries (text and image) stay its own. Output lerp(plain, swapped, strength) over all tokens."""

    def __init__(self, layout, strength=1.0, chunks=1, reference=None, block=None):
        self.layout, self.strength, self.chunks, self.reference, self.block = layout, strength, chunks, reference, block

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        q, k, v, text = joint_qkv(attn, hidden_states, encoder_hidden_states, self.layout.text_tokens)
        q, k = rotate(q, image_rotary_emb), rotate(k, image_rotary_emb)
        batch = q.shape[0]
        if self.reference is not None:
            saved = self.reference.blocks[self.block]
            ref_k, ref_v = (saved[n].expand(batch, -1, -1, -1) for n in ("k_rope", "v"))
            is_reference = torch.zeros(batch, dtype=torch.bool)
        else:
            first = chunk_firsts(batch, self.chunks)
            ref_k, ref_v = k[first, :, text:], v[first, :, text:]
            is_reference = first == torch.arange(batch)
        plain = attend(q, k, v)
        swapped = attend(q, torch.cat([k[:, :, :text], ref_k], 2), torch.cat([v[:, :, :text], ref_v], 2))
        weight = torch.where(is_reference, 0.0, float(self.strength)).view(batch, 1, 1)
        return block_output(attn, torch.lerp(plain, swapped, weight), encoder_hidden_states, text)


def _stats(x):
    """Per channel per head over tokens (dim -2): mean and sqrt(unbiased variance + 1e-5) (calc_mean_std)."""
    return x.mean(-2, keepdim=True), (x.var(-2, keepdim=True) + 1e-5).sqrt()


def _adain(x, target_stats):
    mean, std = _stats(x)
    target_mean, target_std = target_stats
    return (x - mean) / std * target_std + target_mean


class AlignedGenFlux:
    """StyleAligned on Flux as AlignedGen (Jiexuanz/AlignedGen, ShareAttnFluxAttnProcessor2_0, "fix" lambda mode,
    constrain_first) does it. Image queries and keys, after QK-norm and before RoPE, AdaIN'd toward the
    reference's (its image tokens' statistics; text untouched); RoPE at the own positions; then the reference's
    AdaIN'd image keys are appended to every row's keys, turned by RoPE at the reference's positions shifted
    right by the target's token columns (shift=True, AlignedGen's reference_image_ids[:, 2] += width // 16) or
    at its own (shift=False), times style_factor for target rows; the reference's image values appended to the
    values; the reference row does not see the appended keys (-inf). External: the reference's pre-RoPE image
    q/k give the statistics, its k (turned at its own ids, shifted by the target's columns) the appended keys.
    AlignedGen's own default puts this on the single blocks only (its block=(19, 57) of 19 + 38)."""

    def __init__(self, layout, style_factor=1.1, shift=True, chunks=1, reference=None, block=None):
        self.layout, self.style_factor, self.shift = layout, style_factor, shift
        self.chunks, self.reference, self.block = chunks, reference, block

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        q, k, v, text = joint_qkv(attn, hidden_states, encoder_hidden_states, self.layout.text_tokens)
        batch = q.shape[0]
        image_q, image_k = q[:, :, text:], k[:, :, text:]
        if self.reference is not None:
            saved = self.reference.blocks[self.block]
            q_stats, k_stats = _stats(saved["q"]), _stats(saved["k"])
            image_q, image_k = _adain(image_q, q_stats), _adain(image_k, k_stats)
            ref_k = _adain(saved["k"], k_stats).expand(batch, -1, -1, -1)  # toward itself, as the in-batch reference
            ref_v, ref_ids = saved["v"].expand(batch, -1, -1, -1), self.reference.image_ids
            is_reference = torch.zeros(batch, dtype=torch.bool)
        else:
            first = chunk_firsts(batch, self.chunks)
            image_q = _adain(image_q, tuple(s[first] for s in _stats(image_q)))
            image_k = _adain(image_k, tuple(s[first] for s in _stats(image_k)))
            ref_k, ref_v, ref_ids = image_k[first], v[first, :, text:], self.layout.image_ids
            is_reference = first == torch.arange(batch)
        q = rotate(torch.cat([q[:, :, :text], image_q], 2), image_rotary_emb)
        k = rotate(torch.cat([k[:, :, :text], image_k], 2), image_rotary_emb)
        ids = ref_ids.clone()
        if self.shift:
            ids[:, 2] += self.layout.columns
        ref_k = rotate(ref_k, self.layout.pos_embed(ids))
        scale = torch.where(is_reference, 1.0, float(self.style_factor)).view(batch, 1, 1, 1)
        keys = torch.cat([k, scale * ref_k], 2)
        values = torch.cat([v, ref_v], 2)
        mask = torch.zeros(batch, keys.shape[2])
        mask[is_reference, k.shape[2]:] = float("-inf")
        return block_output(attn, attend(q, keys, values, mask), encoder_hidden_states, text)


def _resolve(twin, blocks):
    blocks, known = {tuple(b) for b in blocks}, set(all_blocks(twin))
    if not blocks <= known:
        raise ValueError(f"no such blocks: {sorted(blocks - known)}")
    return blocks


def with_vsp(twin, blocks, strength=1.0, chunks=1, reference: FluxReference | None = None):
    """Context manager: VisualStylePromptingFlux on the given blocks of the twin (the others plain)."""
    chosen = _resolve(twin, blocks)
    return installed(twin, lambda block, layout: VisualStylePromptingFlux(
        layout, strength, chunks, reference, block) if block in chosen else None)


def with_aligned_gen(twin, blocks, style_factor=1.1, shift=True, chunks=1, reference: FluxReference | None = None):
    """Context manager: AlignedGenFlux on the given blocks of the twin (the others plain)."""
    chosen = _resolve(twin, blocks)
    return installed(twin, lambda block, layout: AlignedGenFlux(
        layout, style_factor, shift, chunks, reference, block) if block in chosen else None)


def record_reference(twin, blocks, run) -> FluxReference:
    """The reference's image tokens at the given blocks from one plain pass: run() calls the twin once
    (e.g. lambda: twin_denoise(twin, ref_x, sigma, ref_context, ref_y, guidance) with a batch of 1)."""
    chosen = _resolve(twin, blocks)
    reference = FluxReference()
    with installed(twin, lambda block, layout: RecordingProcessor(block, reference, layout) if block in chosen
                   else None):
        run()
    return reference

