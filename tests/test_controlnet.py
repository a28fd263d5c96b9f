"""A styled MODEL goes through ComfyUI's Apply ControlNet like any other MODEL."""

import pytest
import torch

import nodes
import random_models
from helpers import assert_relative_close, encode, latent_reference, run_node, sample, style_aligned, vsp


@pytest.fixture(scope="module")
def controlnet(sd15):
    return random_models.tiny_controlnet(sd15.model.model.model_config.unet_config, seed=0)


def controlled(positive, negative, controlnet, batch):
    hint = torch.rand(batch, 64, 64, 3, generator=torch.Generator().manual_seed(4))  # covers the reference too
    return nodes.ControlNetApplyAdvanced().apply_controlnet(positive, negative, controlnet, hint, 1.0, 0.0, 1.0)


@pytest.mark.parametrize("style", ["style_aligned", "vsp"])
def test_in_batch_style_with_controlnet(sd15, controlnet, style):
    (positive, _) = run_node("ReferenceTargetPrompts", clip=sd15.clip, reference_prompt="a house",
                             target_prompts="a car\na boat", style_description="")
    negative = encode(sd15.clip, "")
    styled_model = style_aligned(sd15.model) if style == "style_aligned" else vsp(sd15.model)
    cn_positive, cn_negative = controlled(positive, negative, controlnet, 3)

    styled_controlled = sample(styled_model, cn_positive, cn_negative)
    plain_controlled = sample(sd15.model, cn_positive, cn_negative)
    styled_uncontrolled = sample(styled_model, positive, negative)

    assert torch.isfinite(styled_controlled).all()
    assert not torch.allclose(styled_controlled, styled_uncontrolled, atol=1e-3)  # the ControlNet acts
    assert_relative_close(styled_controlled[:1], plain_controlled[:1])  # the reference is not restyled
    assert not torch.allclose(styled_controlled[1:], plain_controlled[1:], atol=1e-3)  # the targets are


def test_external_reference_with_controlnet(sd15, controlnet):
    positive, negative = controlled(encode(sd15.clip, "a car"), encode(sd15.clip, ""), controlnet, 2)
    styled = sample(style_aligned(sd15.model, reference=latent_reference(sd15)), positive, negative, batch=2)
    plain = sample(sd15.model, positive, negative, batch=2)
    assert torch.isfinite(styled).all() and not torch.allclose(styled, plain, atol=1e-3)
