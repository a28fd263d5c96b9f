"""Visual Style Prompting and StyleAligned on Lumina 2 / Z-Image as diffusers attention processors on the twins
(tests/support/lumina_twin.py), written independently of the pack; and ComfyUI's euler sampling on their flow
schedule written out with the twin as the model. layers are indices into the twin's main layers.

In-batch: within each of `chunks` equal chunks of the batch (cond, then uncond), the first row is the reference
and runs plain attention. External: record_reference runs a reference (batch 1, its own latent and prompt) and keeps
its image rows per layer; with reference=... every row of every chunk is a target. Caption rows and padding rows are
never styled: they keep their own q, k, v.
"""

import torch

from .lumina_attention import (LuminaReference, RecordingProcessor, attend, checked_rotary, chunk_firsts, installed,
                               joint_qkv, projected, rotate)
from support.lumina_twin import twin_denoise


def _reference_rows(processor, q, k, v, names):
    """(the reference's image rows of each name, per batch row; which rows are references)."""
    batch, text, end = q.shape[0], processor.layout.text, processor.layout.text + processor.layout.image
    if processor.reference is not None:
        saved = processor.reference.layers[processor.layer]
        return [saved[n].expand(batch, -1, -1, -1) for n in names], torch.zeros(batch, dtype=torch.bool)
    first = chunk_firsts(batch, processor.chunks)
    own = {"q": q, "k": k, "v": v}
    return [own[n][first, :, text:end] for n in names], first == torch.arange(batch)


class VisualStylePromptingLumina:
    """VSP as Stable Flow's swap: each target's image rows' keys (after RoPE) and values are the reference's image
    rows' (after RoPE, at the reference's own positions); its caption and padding rows' keys and values and all its
    queries stay its own. Output lerp(plain, swapped, strength) over all rows."""

    def __init__(self, layout, strength=1.0, chunks=1, reference=None, layer=None):
        self.layout, self.strength, self.chunks, self.reference, self.layer = layout, strength, chunks, reference, layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 base_sequence_length=None):
        q, k, v = joint_qkv(attn, hidden_states)
        freqs = checked_rotary(self.layout, image_rotary_emb, q.shape[2])
        q, k = rotate(q, freqs), rotate(k, freqs)
        text, end = self.layout.text, self.layout.text + self.layout.image
        if self.reference is None:
            (ref_k, ref_v), is_reference = _reference_rows(self, q, k, v, ("k", "v"))
        else:
            (ref_k, ref_v), is_reference = _reference_rows(self, q, k, v, ("k_rope", "v"))
        swapped = attend(q, torch.cat([k[:, :, :text], ref_k, k[:, :, end:]], 2),
                         torch.cat([v[:, :, :text], ref_v, v[:, :, end:]], 2))
        weight = torch.where(is_reference, 0.0, float(self.strength)).view(-1, 1, 1)
        return projected(attn, torch.lerp(attend(q, k, v), swapped, weight))


def _stats(x):
    """Per head and channel over rows (dim -2): mean and sqrt(unbiased variance + 1e-5)."""
    return x.mean(-2, keepdim=True), (x.var(-2, keepdim=True) + 1e-5).sqrt()


def _adain(x, toward):
    mean, std = _stats(x)
    ref_mean, ref_std = _stats(toward)
    return (x - mean) / std * ref_std + ref_mean


class StyleAlignedLumina:
    """StyleAligned as AlignedGen: each target's image rows' queries and keys (after the QK norm, before RoPE)
    AdaIN'd toward the reference's image rows' (per head and channel); RoPE as usual; keys [own joint keys;
    style_factor * the reference's pre-RoPE image keys turned by RoPE at the reference's image positions shifted by
    the target's width in tokens on the width axis (shift=False: unshifted)], values [own; the reference's image
    values], one softmax. The reference row runs plain attention."""

    def __init__(self, layout, style_factor=1.0, shift=True, chunks=1, reference=None, layer=None):
        self.layout, self.style_factor, self.shift = layout, style_factor, shift
        self.chunks, self.reference, self.layer = chunks, reference, layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 base_sequence_length=None):
        q, k, v = joint_qkv(attn, hidden_states)
        freqs = checked_rotary(self.layout, image_rotary_emb, q.shape[2])
        batch, text, end = q.shape[0], self.layout.text, self.layout.text + self.layout.image
        (ref_q, ref_k, ref_v), is_reference = _reference_rows(self, q, k, v, ("q", "k", "v"))
        ref_ids = self.layout.image_ids() if self.reference is None else self.reference.image_ids
        keep = is_reference.view(batch, 1, 1, 1)
        image_q = torch.where(keep, q[:, :, text:end], _adain(q[:, :, text:end], ref_q))
        image_k = torch.where(keep, k[:, :, text:end], _adain(k[:, :, text:end], ref_k))
        q = rotate(torch.cat([q[:, :, :text], image_q, q[:, :, end:]], 2), freqs)
        k = rotate(torch.cat([k[:, :, :text], image_k, k[:, :, end:]], 2), freqs)
        ids = ref_ids.clone()
        if self.shift:
            ids[:, 2] += self.layout.cols
        ref_k = rotate(ref_k, self.layout.positions.freqs(ids))
        scale = torch.where(is_reference, 1.0, float(self.style_factor)).view(batch, 1, 1, 1)
        keys, values = torch.cat([k, scale * ref_k], 2), torch.cat([v, ref_v], 2)
        mask = torch.zeros(batch, keys.shape[2])
        mask[is_reference, k.shape[2]:] = float("-inf")
        return projected(attn, attend(q, keys, values, mask))


def _resolve(twin, layers):
    layers, known = set(layers), set(range(len(twin.layers)))
    if not layers <= known:
        raise ValueError(f"no such layers: {sorted(layers - known)}")
    return layers


def with_vsp(twin, layers, strength=1.0, chunks=1, reference: LuminaReference | None = None):
    """Context manager: VisualStylePromptingLumina on the given main layers of the twin (the others plain)."""
    chosen = _resolve(twin, layers)
    return installed(twin, lambda layer, layout: VisualStylePromptingLumina(
        layout, strength, chunks, reference, layer) if layer in chosen else None)


def with_style_aligned(twin, layers, style_factor=1.0, shift=True, chunks=1, reference: LuminaReference | None = None):
    """Context manager: StyleAlignedLumina on the given main layers of the twin (the others plain)."""
    chosen = _resolve(twin, layers)
    return installed(twin, lambda layer, layout: StyleAlignedLumina(
        layout, style_factor, shift, chunks, reference, layer) if layer in chosen else None)


def record_reference(twin, layers, run) -> LuminaReference:
    """The reference's image rows at the given layers from one plain pass: run() calls the twin once with a batch
    of 1 (e.g. lambda: twin_denoise(twin, ref_x, sigma, ref_context))."""
    chosen = _resolve(twin, layers)
    reference = LuminaReference()
    with installed(twin, lambda layer, layout: RecordingProcessor(layer, reference, layout) if layer in chosen
                   else None):
        run()
    return reference


def flow_sigmas(steps: int, shift: float) -> torch.Tensor:
    """The simple schedule on ModelSamplingDiscreteFlow (multiplier 1; shift 6 on Lumina 2, 3 on Z-Image): the
    table sigma(t) = shift t / (1 + (shift - 1) t) at t = i / 1000, i = 1..1000, read from the top every
    1000 / steps entries, then 0. sigma_max is exactly 1."""
    t = torch.arange(1, 1001) / 1000
    table = shift * t / (1 + (shift - 1) * t)
    stride = len(table) / steps
    return torch.tensor([float(table[-(1 + int(i * stride))]) for i in range(steps)] + [0.0])


def twin_sample(twin, noise, steps, cfg, positive, negative, install, shift, reference=None, references=None):
    """ComfyUI's euler on the simple schedule (an empty latent: sigma_max 1, so x starts as the noise), written out
    with the twin as the model; -> the final latent in the model's space, (B, 16, H, W)
    (model.model.process_latent_out gives what comfy.sample.sample returns).

    noise: (B, 16, H, W). positive, negative: [[context (1, T, D), {}]]; cfg 1 runs the cond branch alone, else
    [cond rows; uncond rows] in one batch of 2 chunks and uncond + cfg (cond - uncond) on x0. install(**kwargs) -> a
    context manager (e.g. lambda **kw: with_vsp(twin, [0, 1], **kw)); it gets chunks= (in-batch) or reference=
    (external). reference: None (in-batch) or (clean latent in the model's space (1, 16, h, w), its noise, its
    conditioning): each step records that latent at sigma (sigma noise + (1 - sigma) clean) alone with that
    conditioning, then every chunk of the targets replays it. references: a list of such triples instead, each
    recorded by its own pass in order; install then gets references= (their recordings, a list)."""
    branches = [positive[0]] + ([negative[0]] if cfg != 1.0 else [])
    if len({c.shape[1] for c, _ in branches}) > 1:  # ComfyUI would repeat one to the lcm, or run them apart
        raise ValueError("give cond and uncond prompts of one length: they are batched as they are")
    batch = noise.shape[0]
    context = torch.cat([c.expand(batch, -1, -1) for c, _ in branches])
    sigmas = flow_sigmas(steps, shift)
    x = noise.clone()
    for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        kwargs = {"chunks": len(branches)}
        if reference is not None:
            clean, ref_noise, ((ref_context, _),) = reference
            ref_x = sigma * ref_noise + (1 - sigma) * clean
            kwargs = {"reference": record_reference(twin, range(len(twin.layers)),
                                                    lambda: twin_denoise(twin, ref_x, sigma, ref_context))}
        elif references is not None:
            kwargs = {"references": [record_reference(twin, range(len(twin.layers)), lambda: twin_denoise(
                twin, sigma * ref_noise + (1 - sigma) * clean, sigma, ref_context))
                for clean, ref_noise, ((ref_context, _),) in references]}
        rows = x.repeat(len(branches), *[1] * (x.ndim - 1))
        with install(**kwargs):
            velocity = twin_denoise(twin, rows, sigma, context)
        denoised = (rows - sigma * velocity).chunk(len(branches))
        guided = denoised[0] if cfg == 1.0 else denoised[1] + cfg * (denoised[0] - denoised[1])
        x = x + (sigma_next - sigma) * (x - guided) / sigma
    return x
