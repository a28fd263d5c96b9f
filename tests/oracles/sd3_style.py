"""Visual Style Prompting and StyleAligned on SD3 / SD3.5 as diffusers attention processors on the twin
(tests/support/sd3_twin.py), written independently of the pack; and ComfyUI's euler sampling written out with
the twin as the model. blocks are joint block indices; a styled block styles every attention it has (the joint
one, and attn2 on SD3.5 Medium's dual blocks), each with the reference's features from the same attention.

In-batch: within each of `chunks` equal chunks of the batch (cond, then uncond), the first row is the reference
and runs plain attention. External: record_reference runs a reference (batch 1, its own latent, size and
prompt) and keeps its image rows' q/k/v per attention; with reference=... every row of every chunk is a target.
"""

import torch

from .sd3_attention import (IMAGE, JOINT, SD3Reference, RecordingProcessor, attend, block_output, chunk_firsts,
                            installed, qkv, sites_of)
from support.sd3_twin import twin_denoise


def _references(site, reference, q, k, v, text, chunks):
    """Per row: the reference's image q, k, v (B, heads, rows, d) and whether the row is the reference itself."""
    batch = q.shape[0]
    if reference is not None:
        saved = reference.features[site]
        return (*(saved[n].expand(batch, -1, -1, -1) for n in ("q", "k", "v")),
                torch.zeros(batch, dtype=torch.bool))
    first = chunk_firsts(batch, chunks)
    return q[first, :, text:], k[first, :, text:], v[first, :, text:], first == torch.arange(batch)


class VisualStylePromptingSD3:
    """VSP as Stable Flow swaps: in the joint attention each target's image-row keys and values are the
    reference's image rows' (its text rows keep their own, all queries are its own); in attn2 its keys and
    values are the reference's. Output lerp(plain, swapped, strength) over all rows."""

    def __init__(self, site, strength=1.0, chunks=1, reference=None):
        self.site, self.strength, self.chunks, self.reference = site, strength, chunks, reference

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        q, k, v, text = qkv(attn, hidden_states, encoder_hidden_states)
        _, ref_k, ref_v, is_reference = _references(self.site, self.reference, q, k, v, text, self.chunks)
        plain = attend(q, k, v)
        swapped = attend(q, torch.cat([k[:, :, :text], ref_k], 2), torch.cat([v[:, :, :text], ref_v], 2))
        weight = torch.where(is_reference, 0.0, float(self.strength)).view(-1, 1, 1)
        return block_output(attn, torch.lerp(plain, swapped, weight), encoder_hidden_states, text)


def _stats(x):
    """Per head and channel over rows (dim -2): mean and sqrt(unbiased variance + 1e-5)."""
    return x.mean(-2, keepdim=True), (x.var(-2, keepdim=True) + 1e-5).sqrt()


def _adain(x, toward):
    mean, std = _stats(x)
    target_mean, target_std = _stats(toward)
    return (x - mean) / std * target_std + target_mean


class StyleAlignedSD3:
    """StyleAligned on a DiT without RoPE: the image rows' queries and keys AdaIN'd toward the reference's image
    rows' (text rows untouched); keys [own joint keys; style_factor * reference's image keys], values [own;
    reference's image values], one softmax over all (share=False: no appended keys). The reference row sees no
    appended keys. The appended keys are the reference's own, AdaIN'd toward themselves as the reference row's."""

    def __init__(self, site, style_factor=1.0, share=True, adain_queries=True, adain_keys=True, chunks=1,
                 reference=None):
        self.site, self.style_factor, self.share = site, style_factor, share
        self.adain_queries, self.adain_keys, self.chunks, self.reference = adain_queries, adain_keys, chunks, reference

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        q, k, v, text = qkv(attn, hidden_states, encoder_hidden_states)
        ref_q, ref_k, ref_v, is_reference = _references(self.site, self.reference, q, k, v, text, self.chunks)
        if self.adain_queries:
            q = torch.cat([q[:, :, :text], _adain(q[:, :, text:], ref_q)], 2)
        if self.adain_keys:
            k = torch.cat([k[:, :, :text], _adain(k[:, :, text:], ref_k)], 2)
            ref_k = _adain(ref_k, ref_k)
        if not self.share:
            return block_output(attn, attend(q, k, v), encoder_hidden_states, text)
        scale = torch.where(is_reference, 1.0, float(self.style_factor)).view(-1, 1, 1, 1)
        keys, values = torch.cat([k, scale * ref_k], 2), torch.cat([v, ref_v], 2)
        mask = torch.zeros(q.shape[0], keys.shape[2])
        mask[is_reference, k.shape[2]:] = float("-inf")
        return block_output(attn, attend(q, keys, values, mask), encoder_hidden_states, text)


def with_vsp(twin, blocks, strength=1.0, chunks=1, reference: SD3Reference | None = None,
             attentions=(JOINT, IMAGE)):
    """Context manager: VisualStylePromptingSD3 on every attention of the given blocks (attentions: which
    kinds, for tests that style one of the two only)."""
    return installed(twin, {site: VisualStylePromptingSD3(site, strength, chunks, reference)
                            for site in sites_of(twin, blocks, attentions)})


def with_style_aligned(twin, blocks, style_factor=1.0, share=True, adain_queries=True, adain_keys=True, chunks=1,
                       reference: SD3Reference | None = None, attentions=(JOINT, IMAGE)):
    """Context manager: StyleAlignedSD3 on every attention of the given blocks."""
    return installed(twin, {site: StyleAlignedSD3(site, style_factor, share, adain_queries, adain_keys, chunks,
                                                  reference) for site in sites_of(twin, blocks, attentions)})


def record_reference(twin, blocks, run) -> SD3Reference:
    """The reference's image rows at every attention of the given blocks from one plain pass: run() calls the
    twin once with a batch of 1 (e.g. lambda: twin_denoise(twin, ref_x, 1000 * sigma, ref_context, ref_y))."""
    reference = SD3Reference()
    with installed(twin, {site: RecordingProcessor(site, reference) for site in sites_of(twin, blocks)}):
        run()
    return reference


def sd3_sigmas(steps: int, shift: float = 3.0) -> torch.Tensor:
    """The simple schedule on SD3's flow sampling: ComfyUI's table sigma(t) = shift t / (1 + (shift - 1) t) at
    t = i / 1000, i = 1..1000, read from the top every 1000 / steps entries, then 0."""
    t = torch.arange(1, 1001, dtype=torch.float32) / 1000
    table = shift * t / (1 + (shift - 1) * t)
    stride = len(table) / steps
    return torch.tensor([float(table[-(1 + int(i * stride))]) for i in range(steps)] + [0.0])


def twin_sample(twin, noise, steps, cfg, positive, negative, install, reference=None, shift=3.0, references=None):
    """ComfyUI's euler on the simple schedule (an empty latent: sigma_max 1, so x starts as the noise), written
    out with the twin as the model; -> the final latent in the model's space (model.model.process_latent_out
    gives what comfy.sample.sample returns).

    positive, negative: conditionings [[context (1, T, D), {"pooled_output": (1, P)}]]; cfg 1 runs the cond
    branch alone, else [cond rows; uncond rows] in one batch of 2 chunks and uncond + cfg (cond - uncond) on x0.
    install(**kwargs) -> a context manager (e.g. lambda **kw: with_vsp(twin, [0, 1], **kw)); it gets chunks=
    (in-batch) or reference= (external). reference: None (in-batch) or (clean latent in the model's space,
    its noise, its conditioning): each step records that latent at sigma (sigma noise + (1 - sigma) clean) alone,
    then every chunk of the targets replays it. references: a list of such triples instead, each recorded by its
    own pass in order; install then gets references= (their recordings, a list)."""
    sigmas = sd3_sigmas(steps, shift)
    branches = [positive[0]] + ([negative[0]] if cfg != 1.0 else [])
    if len({c.shape[1] for c, _ in branches}) > 1:  # ComfyUI would repeat one to the lcm, or run them apart
        raise ValueError("give cond and uncond prompts of one length: they are batched as they are")
    batch = noise.shape[0]
    context = torch.cat([c.expand(batch, -1, -1) for c, _ in branches])
    pooled = torch.cat([e["pooled_output"].expand(batch, -1) for _, e in branches])
    x = noise.clone()
    for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        timestep = torch.tensor(sigma, dtype=torch.float32) * 1000
        kwargs = {"chunks": len(branches)}
        if reference is not None:
            clean, ref_noise, ((ref_context, ref_extra),) = reference
            ref_x = sigma * ref_noise + (1 - sigma) * clean
            kwargs = {"reference": record_reference(twin, range(len(twin.transformer_blocks)), lambda: twin_denoise(
                twin, ref_x, timestep, ref_context, ref_extra["pooled_output"]))}
        elif references is not None:
            kwargs = {"references": [record_reference(twin, range(len(twin.transformer_blocks)), lambda: twin_denoise(
                twin, sigma * ref_noise + (1 - sigma) * clean, timestep, ref_context, ref_extra["pooled_output"]))
                for clean, ref_noise, ((ref_context, ref_extra),) in references]}
        rows = x.repeat(len(branches), 1, 1, 1)
        with install(**kwargs):
            velocity = twin_denoise(twin, rows, timestep, context, pooled)
        denoised = (rows - sigma * velocity).chunk(len(branches))
        guided = denoised[0] if cfg == 1.0 else denoised[1] + cfg * (denoised[0] - denoised[1])
        x = x + (sigma_next - sigma) * (x - guided) / sigma
    return x
