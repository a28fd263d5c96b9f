"""Visual Style Prompting (Jeong et al. 2024) as a diffusers attention processor.

In the activated self-attention layers, every image of a guidance chunk takes the keys and values of
the chunk's first image (the reference), which therefore attends to itself unchanged. With an
external reference, the reference runs alone first and its keys and values serve every image.
cond_only (StyleKeeper, Jeong et al. 2025): the unconditional half of the batch (diffusers pipelines
batch [uncond; cond]) keeps its own self-attention.
"""

import torch

from .attention import attend, projections


class ExternalReference:
    """Keys and values of a reference's own pass, per processor."""

    def __init__(self):
        self.recording = False
        self.keys_values = {}


class VisualStylePromptingProcessor:
    def __init__(self, name, chunks=2, external: ExternalReference | None = None, cond_only=False):
        self.name = name
        self.chunks = chunks
        self.external = external
        self.cond_only = cond_only

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        query, key, value = projections(attn, hidden_states, encoder_hidden_states)
        if self.external is not None and self.external.recording:
            self.external.keys_values[self.name] = (key, value)
            return attend(attn, query, key, value)
        batch = query.shape[0]
        if self.external is not None:
            ref_key, ref_value = self.external.keys_values[self.name]
            swapped_key, swapped_value = ref_key.expand(batch, -1, -1), ref_value.expand(batch, -1, -1)
        else:
            per_chunk = batch // self.chunks
            first_of_chunk = [c * per_chunk for c in range(self.chunks) for _ in range(per_chunk)]
            swapped_key, swapped_value = key[first_of_chunk], value[first_of_chunk]
        if self.cond_only:  # the uncond half keeps its own keys and values
            half = batch // 2
            swapped_key = torch.cat([key[:half], swapped_key[half:]])
            swapped_value = torch.cat([value[:half], swapped_value[half:]])
        return attend(attn, query, swapped_key, swapped_value)


def install(unet, processor_names, chunks=2, external=None, cond_only=False):
    from .attention import PlainProcessor

    processors = {
        name: VisualStylePromptingProcessor(name, chunks, external, cond_only) if name in processor_names
        else PlainProcessor()
        for name in unet.attn_processors
    }
    unet.set_attn_processor(processors)
