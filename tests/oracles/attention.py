"""Plain diffusers-style attention pieces that the method processors build on."""

import torch


def projections(attn, hidden_states, encoder_hidden_states=None):
    context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    return attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)


def attend(attn, query, key, value):
    """softmax(q k^T * scale) v per head, then the output projection (as diffusers' AttnProcessor)."""
    query, key, value = (attn.head_to_batch_dim(t) for t in (query, key, value))
    probabilities = attn.get_attention_scores(query, key, None)
    hidden_states = attn.batch_to_head_dim(torch.bmm(probabilities, value))
    return attn.to_out[1](attn.to_out[0](hidden_states))


class PlainProcessor:
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        return attend(attn, *projections(attn, hidden_states, encoder_hidden_states))


def self_attention_processor_names(unet, up_block_indices):
    """Names of the self-attention processors (attn1) inside the given up_blocks."""
    return [
        name
        for name in unet.attn_processors
        if name.endswith("attn1.processor") and any(name.startswith(f"up_blocks.{i}.") for i in up_block_indices)
    ]


def late_up_blocks(unet):
    """The up_blocks with attention, minus the coarsest one: SDXL's up_blocks.1 in the VSP paper."""
    with_attention = [i for i, block in enumerate(unet.up_blocks) if hasattr(block, "attentions")]
    return with_attention[1:]
