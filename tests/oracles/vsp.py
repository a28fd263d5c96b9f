"""Visual Style Prompting (Jeong et al. 2024) as a diffusers attention processor.

In the activated self-attention layers, every image of a guidance chunk takes the keys and values of
the chunk's first image (the reference), which therefore attends to itself unchanged. With an
external reference, the reference runs alone first and its keys and values serve every image.
cond_only (StyleKeeper, Jeong et al. 2025): the unconditional half of the batch (diffusers pipelines
batch [uncond; cond]) keeps its own self-attention.

Negative visual query guidance (StyleKeeper): while NegativeBranch.running, the pipeline runs the
unconditional prompt alone; the layers named for it take the reference's queries (the chunk's first
image, or the external reference's) with their own keys and values, and the others act as they do in
the unconditional half. nvqg_guide combines the three predictions.
"""

import torch

from .attention import attend, projections


class ExternalReference:
    """Keys and values of a reference's own pass, per processor."""

    def __init__(self):
        self.recording = False
        self.keys_values = {}
        self.queries = {}


class NegativeBranch:
    def __init__(self):
        self.running = False


class VisualStylePromptingProcessor:
    def __init__(self, name, chunks=2, external: ExternalReference | None = None, cond_only=False, swap=True,
                 negative: NegativeBranch | None = None, swap_queries=False):
        self.name = name
        self.chunks = chunks
        self.external = external
        self.cond_only = cond_only
        self.swap = swap  # keys and values, in the positive (and, unless cond_only, the unconditional) half
        self.negative = negative
        self.swap_queries = swap_queries  # in the negative branch

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        query, key, value = projections(attn, hidden_states, encoder_hidden_states)
        if self.external is not None and self.external.recording:
            self.external.keys_values[self.name] = (key, value)
            self.external.queries[self.name] = query
            return attend(attn, query, key, value)
        batch = query.shape[0]
        if self.negative is not None and self.negative.running:  # the unconditional prompt alone: one chunk
            if self.swap_queries:  # the first image's queries for every image: itself unchanged
                queries = self.external.queries[self.name].expand(batch, -1, -1) if self.external else query[[0] * batch]
                return attend(attn, queries, key, value)
            if not self.swap or self.cond_only:
                return attend(attn, query, key, value)
            swapped_key, swapped_value = self.swapped(key, value, 1)
            return attend(attn, query, swapped_key, swapped_value)
        if not self.swap:
            return attend(attn, query, key, value)
        swapped_key, swapped_value = self.swapped(key, value, self.chunks)
        if self.cond_only:  # the uncond half keeps its own keys and values
            half = batch // 2
            swapped_key = torch.cat([key[:half], swapped_key[half:]])
            swapped_value = torch.cat([value[:half], swapped_value[half:]])
        return attend(attn, query, swapped_key, swapped_value)

    def swapped(self, key, value, chunks):
        batch = key.shape[0]
        if self.external is not None:
            ref_key, ref_value = self.external.keys_values[self.name]
            return ref_key.expand(batch, -1, -1), ref_value.expand(batch, -1, -1)
        per_chunk = batch // chunks
        first_of_chunk = [c * per_chunk for c in range(chunks) for _ in range(per_chunk)]
        return key[first_of_chunk], value[first_of_chunk]


def install(unet, processor_names, chunks=2, external=None, cond_only=False, query_names=(), negative=None):
    from .attention import PlainProcessor

    processors = {
        name: VisualStylePromptingProcessor(name, chunks, external, cond_only, swap=name in processor_names,
                                            negative=negative, swap_queries=name in query_names)
        if name in processor_names or name in query_names else PlainProcessor()
        for name in unet.attn_processors
    }
    unet.set_attn_processor(processors)


def nvqg_guide(negative: NegativeBranch, weight: float, in_batch: bool):
    """A guided_eps for sampling.ddim_sample: classifier-free guidance minus weight times the negative
    branch's difference from the unconditional one (the in-batch reference image keeps plain guidance)."""
    from .sampling import uncond_cond_eps, unet_eps

    def guide(unet, latents, timestep, prompts, cfg, before_call=None):
        height, width = latents.shape[-2:]
        eps_uncond, eps_cond = uncond_cond_eps(unet, latents, timestep, prompts, before_call)
        negative.running = True
        try:
            eps_negative = unet_eps(unet, latents, timestep, prompts.uncond, prompts.pooled_uncond, height, width)
        finally:
            negative.running = False
        term = weight * (eps_negative - eps_uncond)
        if in_batch:
            term[:1] = 0
        return eps_uncond + cfg * (eps_cond - eps_uncond) - term

    return guide
