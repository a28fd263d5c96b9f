"""Fidelity: the ComfyUI nodes give the numbers of an independent diffusers implementation of each paper,
on the same random weights (tests/oracles/)."""

import pytest
import torch

import comfy.samplers
from helpers import assert_relative_close, invert, relative_error, style_aligned, vsp
from oracles import style_aligned as reference_style_aligned
from oracles import vsp as reference_vsp
from oracles.attention import PlainProcessor, late_up_blocks, self_attention_processor_names
from oracles.sampling import ddim_invert, denoise, sd_scheduler, sigma_of_timestep
from support.parity import (SIZE, TOLERANCE, ExternalReferenceCase, all_self_attention, comfy_denoise, comfy_sample,
                            random_prompts, reference_sample, scale_factor, start_noise)
from support.parity import twins  # noqa: F401 (a fixture)


@pytest.fixture(autouse=True)
def plain_diffusers_processors(twins):
    twins.diffusers_unet.set_attn_processor(PlainProcessor())


def test_comfy_sigmas_map_to_diffusers_timesteps(twins):
    model_sampling = twins.comfy_model.get_model_object("model_sampling")
    scheduler = sd_scheduler()
    for timestep in (1, 251, 500, 999):
        sigma = sigma_of_timestep(scheduler, timestep)
        assert float(model_sampling.sigma(torch.tensor(timestep))) == pytest.approx(sigma, rel=1e-5)
        assert float(model_sampling.timestep(torch.tensor(sigma))) == pytest.approx(timestep, abs=1e-3)
    scheduler.set_timesteps(4)
    comfy_sigmas = comfy.samplers.calculate_sigmas(model_sampling, "ddim_uniform", 4)
    expected = [sigma_of_timestep(scheduler, int(t)) for t in scheduler.timesteps] + [0.0]
    assert comfy_sigmas.tolist() == pytest.approx(expected, rel=1e-5)


def test_plain_unet_forward_and_sampling_agree(twins):
    prompts = random_prompts(twins, batch=2)
    noise = start_noise(2)
    comfy_x0, sigma = comfy_denoise(twins.comfy_model, prompts, 501, 4.0, noise)
    expected = denoise(twins.diffusers_unet, sd_scheduler(), noise * sigma, 501, prompts, 4.0)
    assert_relative_close(comfy_x0 * scale_factor(twins), expected, 1e-5)


def vsp_in_batch_reference(twins):
    unet = twins.diffusers_unet
    reference_vsp.install(unet, self_attention_processor_names(unet, late_up_blocks(unet)))


def test_vsp_in_batch_denoiser_parity(twins):
    prompts = random_prompts(twins, batch=3)
    noise = start_noise(3)
    comfy_x0, sigma = comfy_denoise(vsp(twins.comfy_model), prompts, 501, 4.0, noise)
    vsp_in_batch_reference(twins)
    expected = denoise(twins.diffusers_unet, sd_scheduler(), noise * sigma, 501, prompts, 4.0)
    assert_relative_close(comfy_x0 * scale_factor(twins), expected, TOLERANCE)
    twins.diffusers_unet.set_attn_processor(PlainProcessor())
    unstyled = denoise(twins.diffusers_unet, sd_scheduler(), noise * sigma, 501, prompts, 4.0)
    assert relative_error(expected, unstyled) > 100 * TOLERANCE  # the test can tell styled from plain


def test_vsp_in_batch_sampling_parity(twins):
    prompts = random_prompts(twins, batch=3)
    noise = start_noise(3)
    comfy_out = comfy_sample(vsp(twins.comfy_model), prompts, 4, 4.0, noise)
    vsp_in_batch_reference(twins)
    expected = reference_sample(twins, prompts, noise)
    assert_relative_close(comfy_out * scale_factor(twins), expected, TOLERANCE)


def test_vsp_external_reference_sampling_parity(twins):
    prompts, noise = random_prompts(twins, batch=2), start_noise(2)
    case = ExternalReferenceCase(twins)
    styled = vsp(twins.comfy_model, reference=case.node_output)
    recorded, replayed = (comfy_sample(styled, prompts, 4, 4.0, noise) for _ in range(2))  # the cache replays run 2

    unet = twins.diffusers_unet
    external = reference_vsp.ExternalReference()
    reference_vsp.install(unet, self_attention_processor_names(unet, late_up_blocks(unet)), external=external)
    expected = reference_sample(twins, prompts, noise, lambda s: case.run_alone_before_each_call(s, external))
    assert_relative_close(recorded * scale_factor(twins), expected, TOLERANCE)
    assert_relative_close(replayed * scale_factor(twins), expected, TOLERANCE)


SA_OPTIONS = {"adain_values": True, "score_scale": 0.9, "score_shift": 0.693}


def style_aligned_node(model, reference=None):
    return style_aligned(model, reference=reference, adain_values=True, shared_score_scale=0.9,
                         shared_score_shift=0.693, shared_group_norm="on")


def test_style_aligned_in_batch_denoiser_and_sampling_parity(twins):
    prompts, noise = random_prompts(twins, batch=3), start_noise(3)
    styled = style_aligned_node(twins.comfy_model)
    comfy_x0, sigma = comfy_denoise(styled, prompts, 501, 4.0, noise)
    comfy_out = comfy_sample(styled, prompts, 4, 4.0, noise)

    unet = twins.diffusers_unet
    reference_style_aligned.install(unet, all_self_attention(unet), **SA_OPTIONS)
    with reference_style_aligned.shared_group_norms(unet):
        expected_x0 = denoise(unet, sd_scheduler(), noise * sigma, 501, prompts, 4.0)
        expected_out = reference_sample(twins, prompts, noise)
    assert_relative_close(comfy_x0 * scale_factor(twins), expected_x0, TOLERANCE)
    assert_relative_close(comfy_out * scale_factor(twins), expected_out, TOLERANCE)


def test_style_aligned_external_reference_sampling_parity(twins):
    prompts, noise = random_prompts(twins, batch=2), start_noise(2)
    case = ExternalReferenceCase(twins)
    styled = style_aligned_node(twins.comfy_model, case.node_output)
    recorded, replayed = (comfy_sample(styled, prompts, 4, 4.0, noise) for _ in range(2))  # the cache replays run 2

    unet = twins.diffusers_unet
    external = reference_style_aligned.ExternalReference()
    reference_style_aligned.install(unet, all_self_attention(unet), external=external, **SA_OPTIONS)
    with reference_style_aligned.shared_group_norms(unet, external=external):
        expected = reference_sample(twins, prompts, noise, lambda s: case.run_alone_before_each_call(s, external))
    assert_relative_close(recorded * scale_factor(twins), expected, TOLERANCE)
    assert_relative_close(replayed * scale_factor(twins), expected, TOLERANCE)


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_ddim_inversion_parity_with_diffusers_inverse_scheduler(twins, cfg):
    prompts = random_prompts(twins, batch=2)
    latent = torch.randn(2, 4, SIZE, SIZE, generator=torch.Generator().manual_seed(12))
    positive, negative = prompts.comfy_conditioning()
    inverted, trajectory = invert(twins.comfy_model, latent, positive, negative, steps=4, cfg=cfg,
                                  scheduler="ddim_uniform")
    expected, last_timestep = ddim_invert(twins.diffusers_unet, latent * scale_factor(twins), 4, prompts, cfg)
    sigma = sigma_of_timestep(sd_scheduler(), last_timestep)
    assert float(trajectory.sigmas[-1]) == pytest.approx(sigma, rel=1e-5)
    comfy_top = inverted["samples"] * scale_factor(twins) / (1 + sigma**2) ** 0.5  # ComfyUI's x at sigma -> diffusers' x_t
    assert_relative_close(comfy_top, expected, TOLERANCE)
