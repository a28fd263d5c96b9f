"""The parity runs on the diffusers twin (tests/oracles/): the same random weights as a ComfyUI model and a
diffusers UNet, random prompts and noise for both, ComfyUI's side sampled or denoised, the oracle's side
sampled with DDIM, and the relative tolerance they agree to."""

import pytest
import torch

import comfy.sample
import comfy.samplers
from helpers import run_node
from oracles.models import twin_models
from oracles.sampling import Prompts, ddim_sample, sd_scheduler, sigma_of_timestep, unet_eps

TOLERANCE = 1e-4
SIZE = 8


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def twins(request):
    return twin_models(request.param, seed=1)


def random_prompts(twins, batch, seed=2) -> Prompts:
    g = torch.Generator().manual_seed(seed)
    embeddings = lambda: torch.randn(batch, 77, twins.context_dim, generator=g)  # noqa: E731
    pooled = (lambda: torch.randn(batch, twins.pooled_dim, generator=g)) if twins.pooled_dim else (lambda: None)
    return Prompts(cond=embeddings(), uncond=embeddings(), pooled_cond=pooled(), pooled_uncond=pooled())


def start_noise(batch, seed=3):
    return torch.randn(batch, 4, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def scale_factor(twins):
    return twins.comfy_model.model.latent_format.scale_factor


def comfy_denoise(model, prompts, timestep, cfg, noise):
    """ComfyUI's guided x0 at one timestep: a single Euler step from sigma_t to 0 lands on it."""
    sigma = float(model.get_model_object("model_sampling").sigma(torch.tensor(timestep)))
    positive, negative = prompts.comfy_conditioning()
    sampler = comfy.samplers.sampler_object("euler")
    latent = torch.zeros_like(noise)
    out = comfy.sample.sample_custom(model, noise, cfg, sampler, torch.tensor([sigma, 0.0]), positive, negative,
                                     latent, disable_pbar=True, seed=0)
    return out, sigma


def comfy_sample(model, prompts, steps, cfg, noise):
    positive, negative = prompts.comfy_conditioning()
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "ddim_uniform", positive, negative,
                               torch.zeros_like(noise), disable_pbar=True, seed=0)


class ExternalReferenceCase:
    """A reference latent with its own prompt, as the ComfyUI node takes it and as the reference runs it alone."""

    def __init__(self, twins):
        self.twins = twins
        self.prompts = random_prompts(twins, batch=1, seed=5)
        self.latent = torch.randn(1, 4, SIZE, SIZE, generator=torch.Generator().manual_seed(6))
        (self.node_output,) = run_node("StyleReferenceLatent", latent={"samples": self.latent}, clip=None, prompt="",
                                       reference_seed=9, cache_megabytes=2048, cache_on_cpu=False, conditioning=self.prompts.comfy_conditioning()[0])

    def run_alone_before_each_call(self, scheduler, external):
        noise = comfy.sample.prepare_noise(self.latent, 9)
        clean = self.latent * scale_factor(self.twins)

        def run_reference_alone(timestep):
            external.recording = True
            noisy = scheduler.add_noise(clean, noise, torch.tensor([int(timestep)]))
            unet_eps(self.twins.diffusers_unet, noisy, timestep, self.prompts.cond, self.prompts.pooled_cond, SIZE,
                     SIZE)
            external.recording = False

        return run_reference_alone


def reference_sample(twins, prompts, noise, before_call=None):
    scheduler = sd_scheduler()
    scheduler.set_timesteps(4)
    start = noise * sigma_of_timestep(scheduler, int(scheduler.timesteps[0]))
    hook = before_call(scheduler) if before_call else None
    return ddim_sample(twins.diffusers_unet, scheduler, start, 4, prompts, 4.0, before_call=hook)


def all_self_attention(unet):
    return [name for name in unet.attn_processors if name.endswith("attn1.processor")]
