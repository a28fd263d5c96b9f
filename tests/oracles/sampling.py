"""DDIM sampling with classifier-free guidance on a diffusers UNet, the way the papers' pipelines run it.

ComfyUI samples in sigma space: x = x0 + sigma * eps, and the UNet sees x / sqrt(1 + sigma^2). With
alphas_cumprod a_t, sigma_t = sqrt((1 - a_t) / a_t), and that scaled x is diffusers' latent x_t.
Euler steps on ComfyUI's ddim_uniform sigmas are DDIM (eta 0) steps on diffusers' "leading"
timesteps with steps_offset 1, ending at alpha 1 (set_alpha_to_one).
"""

from dataclasses import dataclass

import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler


# Stable Diffusion's schedule, ending at alpha 1 like ComfyUI's final sigma 0.
SD_SCHEDULE = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}


def sd_scheduler() -> DDIMScheduler:
    return DDIMScheduler(**SD_SCHEDULE)


def sd_inverse_scheduler() -> DDIMInverseScheduler:
    return DDIMInverseScheduler(**SD_SCHEDULE)


@torch.no_grad()
def ddim_invert(unet, clean_latents, steps, prompts, cfg):
    """DDIM inversion as diffusers runs it (DDIMInverseScheduler); returns the latent at the last timestep."""
    scheduler = sd_inverse_scheduler()
    scheduler.set_timesteps(steps)
    latents = clean_latents
    for timestep in scheduler.timesteps:
        eps = guided_eps(unet, latents, timestep, prompts, cfg)
        latents = scheduler.step(eps, timestep, latents).prev_sample
    return latents, int(scheduler.timesteps[-1])


def sigma_of_timestep(scheduler: DDIMScheduler, timestep: int) -> float:
    alpha = scheduler.alphas_cumprod[timestep].double()
    return float(((1 - alpha) / alpha).sqrt())


def comfy_to_diffusers_latent(x: torch.Tensor, sigma: float) -> torch.Tensor:
    return x / (1 + sigma**2) ** 0.5


@dataclass
class Prompts:
    """Per-item text embeddings (batch, tokens, dim); pooled ones for SDXL."""

    cond: torch.Tensor
    uncond: torch.Tensor
    pooled_cond: torch.Tensor | None = None
    pooled_uncond: torch.Tensor | None = None

    def comfy_conditioning(self):
        def entry(embeddings, pooled):
            return [[embeddings, {} if pooled is None else {"pooled_output": pooled}]]

        return entry(self.cond, self.pooled_cond), entry(self.uncond, self.pooled_uncond)


def unet_eps(unet, latents, timestep, embeddings, pooled, height, width):
    added = None
    if pooled is not None:
        time_ids = torch.tensor([[height * 8, width * 8, 0, 0, height * 8, width * 8]], dtype=latents.dtype)
        added = {"text_embeds": pooled, "time_ids": time_ids.repeat(latents.shape[0], 1)}
    return unet(latents, timestep, encoder_hidden_states=embeddings, added_cond_kwargs=added).sample


def uncond_cond_eps(unet, latents, timestep, prompts: Prompts, before_call=None):
    """(eps_uncond, eps_cond), batched as diffusers pipelines batch them: [uncond; cond]."""
    batch, _, height, width = latents.shape
    embeddings = torch.cat([prompts.uncond, prompts.cond])
    pooled = None if prompts.pooled_cond is None else torch.cat([prompts.pooled_uncond, prompts.pooled_cond])
    if before_call is not None:
        before_call(timestep)
    return unet_eps(unet, torch.cat([latents, latents]), timestep, embeddings, pooled, height, width).chunk(2)


def guided_eps(unet, latents, timestep, prompts: Prompts, cfg: float, before_call=None):
    """Classifier-free guidance as diffusers pipelines batch it: [uncond; cond]."""
    eps_uncond, eps_cond = uncond_cond_eps(unet, latents, timestep, prompts, before_call)
    return eps_uncond + cfg * (eps_cond - eps_uncond)


@torch.no_grad()
def ddim_sample(unet, scheduler, comfy_start_x, steps, prompts, cfg, before_call=None, guide=guided_eps):
    """DDIM from ComfyUI's starting state (x = noise * sigma at the first timestep); returns x0."""
    scheduler.set_timesteps(steps)
    first = int(scheduler.timesteps[0])
    latents = comfy_to_diffusers_latent(comfy_start_x, sigma_of_timestep(scheduler, first))
    for timestep in scheduler.timesteps:
        eps = guide(unet, latents, timestep, prompts, cfg, before_call)
        latents = scheduler.step(eps, timestep, latents, eta=0.0).prev_sample
    return latents


@torch.no_grad()
def denoise(unet, scheduler, comfy_x, timestep, prompts, cfg, before_call=None):
    """x0 predicted at one timestep from ComfyUI's state x, with guidance."""
    sigma = sigma_of_timestep(scheduler, timestep)
    latents = comfy_to_diffusers_latent(comfy_x, sigma)
    eps = guided_eps(unet, latents, torch.tensor(timestep), prompts, cfg, before_call)
    alpha = scheduler.alphas_cumprod[timestep]
    return (latents - (1 - alpha).sqrt() * eps) / alpha.sqrt()
