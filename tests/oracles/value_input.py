"""StyleDiffusion's value input written out as a diffusers attention processor: in cross-attention
the keys take the prompt embedding and the values take context * scale + shift, in the cond rows
only (diffusers pipelines batch [uncond; cond])."""

from .attention import attend


class ValueInputProcessor:
    def __init__(self, scale, shift):
        self.scale, self.shift = scale, shift

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        value_input = encoder_hidden_states.clone()
        half = value_input.shape[0] // 2
        value_input[half:] = value_input[half:] * self.scale + self.shift
        return attend(attn, attn.to_q(hidden_states), attn.to_k(encoder_hidden_states), attn.to_v(value_input))


def install(unet, scale, shift):
    processors = {name: ValueInputProcessor(scale, shift) if name.endswith("attn2.processor") else processor
                  for name, processor in unet.attn_processors.items()}
    unet.set_attn_processor(processors)
