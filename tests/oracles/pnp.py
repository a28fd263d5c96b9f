"""DiffStyler's plug-and-play injection as its authors' code runs it, on a diffusers UNet.

Each step runs one batch [source, uncond, cond]: the source is the content's inverted latent at this
timestep with its own (empty) prompt. In the chosen self-attention layers the targets' queries and
keys become rate * source + (1 - rate) * target, rate = min(1, 2t/1000), for the first attention
steps; in the chosen ResBlock the targets' residual branch (conv2's output, before the shortcut is
added) is the source's, for the first feature steps. Guidance mixes the last two thirds only.
"""

import torch

from .attention import attend, projections
from .sampling import comfy_to_diffusers_latent, sigma_of_timestep, unet_eps


class Schedule:
    """What the current step injects: set before each UNet call."""

    def __init__(self):
        self.timestep = 0
        self.attention = False
        self.features = False


class QueryKeyInjectionProcessor:
    def __init__(self, schedule: Schedule):
        self.schedule = schedule

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        query, key, value = projections(attn, hidden_states, encoder_hidden_states)
        if self.schedule.attention:
            rate = min(1.0, self.schedule.timestep / 1000 * 2.0)
            third = query.shape[0] // 3
            for tensor in (query, key):
                for start in (third, 2 * third):
                    tensor[start:start + third] = tensor[:third] * rate + tensor[start:start + third] * (1 - rate)
        return attend(attn, query, key, value)


def pnp_layers(unet):
    """The authors' sites generalised: in the up_blocks with attention, every attention but the first
    one's first, with all their transformer blocks; and the second resnet of that first up_block."""
    with_attention = [i for i, block in enumerate(unet.up_blocks) if hasattr(block, "attentions")]
    first = with_attention[0]
    prefixes = [f"up_blocks.{first}.attentions.{j}." for j in range(1, len(unet.up_blocks[first].attentions))]
    prefixes += [f"up_blocks.{i}.attentions." for i in with_attention[1:]]
    names = [name for name in unet.attn_processors if name.endswith("attn1.processor")
             and any(name.startswith(prefix) for prefix in prefixes)]
    return names, unet.up_blocks[first].resnets[1]


def install(unet, schedule: Schedule):
    from .attention import PlainProcessor

    names, resnet = pnp_layers(unet)
    unet.set_attn_processor({name: QueryKeyInjectionProcessor(schedule) if name in names else PlainProcessor()
                             for name in unet.attn_processors})

    def replace_targets(module, inputs, output):
        if schedule.features:
            third = output.shape[0] // 3
            output = output.clone()
            output[third:] = output[:third].repeat(2, 1, 1, 1)
        return output

    return resnet.conv2.register_forward_hook(replace_targets)


@torch.no_grad()
def pnp_sample(unet, scheduler, schedule, trajectory, steps, prompts, source, cfg, attention_steps, feature_steps):
    """DDIM from the inversion's latent at the first timestep, the source run beside each target; returns x0.

    trajectory: ComfyUI's InversionTrajectory of the content (model space); source: its Prompts (cond used).
    """
    scheduler.set_timesteps(steps)
    first = int(scheduler.timesteps[0])
    latents = comfy_to_diffusers_latent(trajectory.latent_at(sigma_of_timestep(scheduler, first)),
                                        sigma_of_timestep(scheduler, first))
    batch = prompts.cond.shape[0]
    latents = latents.expand(batch, -1, -1, -1)
    height, width = latents.shape[-2:]
    embeddings = torch.cat([source.cond.expand(batch, -1, -1), prompts.uncond, prompts.cond])
    pooled = None if prompts.pooled_cond is None else torch.cat([source.pooled_cond.expand(batch, -1),
                                                                prompts.pooled_uncond, prompts.pooled_cond])
    for i, timestep in enumerate(scheduler.timesteps):
        sigma = sigma_of_timestep(scheduler, int(timestep))
        source_latent = comfy_to_diffusers_latent(trajectory.latent_at(sigma), sigma)
        schedule.timestep, schedule.attention, schedule.features = int(timestep), i < attention_steps, i < feature_steps
        eps = unet_eps(unet, torch.cat([source_latent.expand(batch, -1, -1, -1), latents, latents]), timestep, embeddings, pooled, height, width)
        _, eps_uncond, eps_cond = eps.chunk(3)
        latents = scheduler.step(eps_uncond + cfg * (eps_cond - eps_uncond), timestep, latents, eta=0.0).prev_sample
    return latents
