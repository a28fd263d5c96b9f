"""Tamed tiny models (smooth enough to invert) and Prompt Embedding Inversion runs (StyleDiffusion's
value-input inversion) on them."""

import pytest
import torch

import comfy.model_management
import comfy.samplers
import random_models
from conftest import pack_submodule
from helpers import run_node

value_input = pack_submodule("inversion.value_input")

PROMPT = "a cat on a wall"


def tamed(models):
    """Random UNets predict wildly (eps of std ~100); scaled-down outputs make the ODE as smooth as a real model's."""
    with torch.no_grad():
        out = models.model.model.diffusion_model.out[2]
        out.weight.mul_(0.02)
        out.bias.mul_(0.02)
    return models


@pytest.fixture(scope="module")
def tame():
    return tamed(random_models.tiny_sd15(seed=5))


def image_latent(seed=1, size=8):
    """A VAE-space latent (what VAE Encode gives) of a made-up image."""
    return {"samples": torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(seed)) * 5}


def invert(models, latent=None, steps=6, guidance=7.5, inner_iterations=20, **settings):
    """PromptEmbeddingInversion of PROMPT (helpers.invert is DDIM inversion)."""
    latent = latent or image_latent()
    defaults = dict(learning_rate=0.01, attention_weight=1.0, attention_target=value_input.ATTENTION_TARGETS[0],
                    early_stop=True, max_megabytes=64)
    return run_node("PromptEmbeddingInversion", model=models.model, clip=models.clip, latent=latent,
                    source_prompt=PROMPT, steps=steps, scheduler="ddim_uniform", guidance=guidance,
                    inner_iterations=inner_iterations, **{**defaults, **settings})


def sample_from_top(model, inversion, positive, negative, cfg):
    """KSamplerAdvanced without added noise from the inversion's top latent, on its schedule (euler = DDIM)."""
    top = model.get_model_object("latent_format").process_out(inversion.trajectory.top)
    sigmas = inversion.sampling_sigmas()
    sampler = comfy.samplers.KSampler(model, steps=len(sigmas) - 1, device=comfy.model_management.get_torch_device(),
                                      sampler="euler", scheduler="ddim_uniform")
    return sampler.sample(torch.zeros_like(top), positive, negative, cfg=cfg, latent_image=top, sigmas=sigmas,
                          disable_pbar=True, seed=0)
