"""A real image's DDIM inversion as the reference of VSP and StyleAligned."""

import pytest
import torch

from helpers import encode, inversion_reference, invert, sample, style_aligned, vsp


@pytest.fixture(scope="module")
def inverted_reference(sd15):
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(11))
    positive, negative = encode(sd15.clip, "a painting"), encode(sd15.clip, "")
    _, trajectory = invert(sd15.model, latent, positive, negative, steps=4)
    return inversion_reference(sd15, trajectory), trajectory


@pytest.mark.parametrize("node", ["vsp", "style_aligned"])
def test_the_reference_pass_sees_the_inversion_trajectory_at_every_step(sd15, inverted_reference, node):
    reference, trajectory = inverted_reference
    styled = vsp(sd15.model, reference=reference) if node == "vsp" else style_aligned(sd15.model, reference=reference)
    unet = styled.get_model_object("diffusion_model")
    reference_inputs = []
    handle = unet.register_forward_pre_hook(
        lambda m, args: reference_inputs.append(args[0].detach().clone()) if args[0].shape[0] == 1 else None)
    try:
        styled_out = sample(styled, encode(sd15.clip, "a dog"), encode(sd15.clip, ""), batch=2, steps=4)
    finally:
        handle.remove()
    model_sampling = sd15.model.get_model_object("model_sampling")
    sigmas = trajectory.sigmas.flip(0)[:-1]  # the sampler's sigmas, descending, without the final 0
    assert len(reference_inputs) == len(sigmas)
    for seen, sigma in zip(reference_inputs, sigmas):
        expected = model_sampling.calculate_input(sigma.reshape(1), trajectory.latent_at(float(sigma)))
        torch.testing.assert_close(seen, expected, rtol=1e-5, atol=1e-5)
    plain = sample(sd15.model, encode(sd15.clip, "a dog"), encode(sd15.clip, ""), batch=2, steps=4)
    assert not torch.allclose(styled_out, plain, atol=1e-3)


def test_sampling_with_another_schedule_is_a_clear_error(sd15, inverted_reference):
    reference, _ = inverted_reference
    with pytest.raises(ValueError, match="is not in the inversion's schedule .4 steps.*sample with the steps and "
                                         "scheduler the inversion used"):
        sample(vsp(sd15.model, reference=reference), encode(sd15.clip, "a dog"), encode(sd15.clip, ""), batch=2,
               steps=6)


def test_an_inversion_of_several_images_is_refused(sd15):
    positive, negative = encode(sd15.clip, ""), encode(sd15.clip, "")
    _, trajectory = invert(sd15.model, torch.randn(2, 4, 8, 8), positive, negative, steps=2)
    with pytest.raises(ValueError, match="inversion: holds 2 images; a reference is one image"):
        inversion_reference(sd15, trajectory, prompt="")
