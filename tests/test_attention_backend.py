"""The attention back-end a user chose still runs in the layers this pack patches.

ComfyUI's kernels honour `transformer_options["optimized_attention_override"]` (set by attention
back-end nodes and packs: a function called as override(kernel, q, k, v, heads, **kwargs) instead of
the kernel). The pack hands each call's transformer_options to the kernel, so the override sees the
styled self-attention calls as it sees every other layer's.
"""

import pytest
import torch

from helpers import batch_prompts, encode, latent_reference, run_node, sample, selected_layers, style_aligned, vsp


class RecordingOverride:
    """An override that runs the kernel it was given and notes which self-attention layer called."""

    def __init__(self):
        self.self_attention_layers = set()

    def __call__(self, kernel, q, k, v, heads, *args, **kwargs):
        options = kwargs["transformer_options"]
        if k.shape[1] != 77:  # not cross-attention (the prompt has 77 tokens)
            block, number = options["block"]
            self.self_attention_layers.add((block, number, options["block_index"]))
        return kernel(q, k, v, heads, *args, **kwargs)


def with_override(model, override):
    patched = model.clone()
    patched.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = override
    return patched


STYLES = {
    "vsp_in_batch": lambda models: vsp(models.model),
    "vsp_reference_latent": lambda models: vsp(models.model, reference=latent_reference(models, cache_megabytes=0)),
    "style_aligned_in_batch": lambda models: style_aligned(models.model),
}


@pytest.mark.parametrize("style", list(STYLES))
def test_an_attention_override_runs_in_the_styled_layers(models, style):
    styled = STYLES[style](models)
    positive, negative = batch_prompts(models)
    override = RecordingOverride()
    through_override = sample(with_override(styled, override), positive, negative, steps=2)
    assert set(selected_layers(styled)) <= override.self_attention_layers
    assert torch.equal(through_override, sample(styled, positive, negative, steps=2)), "a pass-through override changed the image"


def test_an_override_that_changes_attention_in_a_styled_layer_changes_the_image(sd15):
    styled = vsp(sd15.model)
    layer = selected_layers(styled)[0]
    positive, negative = batch_prompts(sd15)

    def halve_that_layer(kernel, q, k, v, heads, *args, **kwargs):
        options = kwargs["transformer_options"]
        here = (*options["block"], options["block_index"]) == layer and k.shape[1] != 77
        return kernel(q, k, v, heads, *args, **kwargs) * (0.5 if here else 1.0)

    halved = sample(with_override(styled, halve_that_layer), positive, negative, steps=2)
    assert not torch.allclose(halved, sample(styled, positive, negative, steps=2), atol=1e-4)


def test_captured_layers_pass_the_override_too(sd15):
    (captured, _) = run_node("CaptureAttentionMaps", model=sd15.model, attention="self_attention", layers="late_self_attention",
                             custom_layers="", start_percent=0.0, end_percent=1.0, max_megabytes=64)
    override = RecordingOverride()
    sample(with_override(captured, override), encode(sd15.clip, "a cat"), encode(sd15.clip, ""), batch=1, steps=1)
    assert set(selected_layers(captured)) <= override.self_attention_layers
