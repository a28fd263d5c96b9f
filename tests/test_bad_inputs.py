"""Bad input gets an error that names the input, and leaves the model untouched."""

import pytest
import torch

from helpers import encode, latent_reference, run_node, sample, vsp


def test_reference_latent_with_the_wrong_channel_count(sd15):
    latent = {"samples": torch.zeros(1, 16, 8, 8)}
    (reference,) = run_node("StyleReferenceLatent", latent=latent, clip=sd15.clip, prompt="", reference_seed=0, cache_megabytes=2048, cache_on_cpu=False)
    with pytest.raises(ValueError, match="reference: the reference latent has 16 channels but this model's latents have 4"):
        vsp(sd15.model, reference=reference)


def test_reference_latent_of_a_size_the_unet_cannot_take(sd15):
    reference = latent_reference(sd15, size=6)
    with pytest.raises(ValueError, match="reference: the reference latent is 6x6; this UNet needs sides divisible by 4"):
        vsp(sd15.model, reference=reference)


def test_reference_latent_holding_several_images(sd15):
    with pytest.raises(ValueError, match=r"latent: expected one image latent of shape \(1, C, H, W\) \(or \(1, C, 1, H, W\), "
                                         r"Qwen-Image's\), got \(2, 4, 8, 8\)"):
        run_node("StyleReferenceLatent", latent={"samples": torch.zeros(2, 4, 8, 8)}, clip=sd15.clip, prompt="",
                 reference_seed=0, cache_megabytes=2048, cache_on_cpu=False)


def test_start_after_end(sd15):
    with pytest.raises(ValueError, match=r"start_percent \(0.8\) must not be greater than end_percent \(0.2\)"):
        vsp(sd15.model, start_percent=0.8, end_percent=0.2)


def test_empty_custom_list(sd15):
    with pytest.raises(ValueError, match="custom_layers: empty"):
        vsp(sd15.model, layers="custom", custom_layers="  ")


@pytest.mark.parametrize("text,message", [
    ("output.40", "custom_layers: this model has no self-attention at output.40"),
    ("output.4.3", "custom_layers: this model has no self-attention at output.4.3"),
    ("up_blocks.1", "custom_layers: cannot read 'up_blocks.1'"),
])
def test_custom_layers_that_are_not_in_the_model(sd15, text, message):
    with pytest.raises(ValueError, match=message):
        vsp(sd15.model, layers="custom", custom_layers=text)


def test_in_batch_mode_with_a_batch_of_one_fails_clearly_and_leaves_the_model_clean(sd15):
    positive, negative = encode(sd15.clip, "a cat"), encode(sd15.clip, "")
    fresh = sample(sd15.model, positive, negative, batch=1)
    with pytest.raises(ValueError, match="in-batch reference needs a latent batch of at least 2"):
        sample(vsp(sd15.model), positive, negative, batch=1)
    assert torch.equal(sample(sd15.model, positive, negative, batch=1), fresh)


def test_empty_target_prompts(sd15):
    with pytest.raises(ValueError, match="target_prompts: expected at least one non-empty line"):
        run_node("ReferenceTargetPrompts", clip=sd15.clip, reference_prompt="a cat", target_prompts="\n \n",
                 style_description="")


def test_non_unet_models_are_refused(sd15):
    class NotAUNet(torch.nn.Module):
        pass

    model = sd15.model.clone()
    model.add_object_patch("diffusion_model", NotAUNet())
    with pytest.raises(ValueError, match="VisualStylePrompting works on UNet models"):
        vsp(model)
