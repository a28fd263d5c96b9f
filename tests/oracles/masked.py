"""DiffStyler's mask-wise sampling (the authors' diffstyler.py, eq. 7) written out on diffusers UNets:
each style is its own UNet (a copy with its LoRA merged into the weights, as the authors deep-copy
the UNet per LoRA); at every step the base's guided noise prediction is replaced inside each hard
mask by that style's, in order, then one DDIM step."""

import copy

import torch

from .sampling import comfy_to_diffusers_latent, guided_eps, sigma_of_timestep


def with_merged_lora(unet, lora: dict[str, tuple[torch.Tensor, torch.Tensor, float]]):
    """A copy of unet with W += scale * up @ down at each named linear layer (diffusers names)."""
    styled = copy.deepcopy(unet)
    with torch.no_grad():
        for name, (up, down, scale) in lora.items():
            styled.get_submodule(name).weight += scale * up @ down
    return styled


@torch.no_grad()
def masked_ddim_sample(base, styles, masks, scheduler, comfy_start_x, steps, prompts, cfg):
    """styles: UNets; masks: (height, width) bool at the latent's size, one per style."""
    scheduler.set_timesteps(steps)
    latents = comfy_to_diffusers_latent(comfy_start_x, sigma_of_timestep(scheduler, int(scheduler.timesteps[0])))
    for timestep in scheduler.timesteps:
        eps = guided_eps(base, latents, timestep, prompts, cfg)
        for unet, mask in zip(styles, masks):
            eps[:, :, mask] = guided_eps(unet, latents, timestep, prompts, cfg)[:, :, mask]
        latents = scheduler.step(eps, timestep, latents, eta=0.0).prev_sample
    return latents
