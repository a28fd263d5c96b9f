"""DiffStyler's LoRA fit (the authors' lora_train.py) written out by hand on a diffusers UNet.

Each adapted linear layer computes W x + (alpha / rank) * up(down(x)), as diffusers' LoRA processors
do; the loop adds DDPM noise with diffusers' scheduler, predicts with the UNet and takes the MSE to
the noise (or to the scheduler's velocity), AdamW at a constant rate.
"""

import torch
from diffusers import DDPMScheduler

from .sampling import SD_SCHEDULE, unet_eps


class LoRALinear(torch.nn.Module):
    def __init__(self, base: torch.nn.Linear, up: torch.Tensor, down: torch.Tensor, alpha: float):
        super().__init__()
        self.base = base
        self.up = torch.nn.Parameter(up.clone())
        self.down = torch.nn.Parameter(down.clone())
        self.scale = alpha / down.shape[0]

    def forward(self, x):
        return self.base(x) + self.scale * torch.nn.functional.linear(torch.nn.functional.linear(x, self.down), self.up)


def install(unet, module_names: list[str], initial: list[tuple[torch.Tensor, torch.Tensor]], alpha: float):
    """Replaces the named linear layers (diffusers names) by LoRA layers; returns them in order."""
    layers = []
    for name, (up, down) in zip(module_names, initial):
        parent_name, _, child = name.rpartition(".")
        parent = unet.get_submodule(parent_name)
        layer = LoRALinear(getattr(parent, child) if not child.isdigit() else parent[int(child)], up, down, alpha)
        if child.isdigit():
            parent[int(child)] = layer
        else:
            setattr(parent, child, layer)
        layers.append(layer)
    return layers


def train(unet, layers, x0_of_step, draws, embeddings, pooled, learning_rate, prediction="epsilon", adam_eps=1e-8):
    """x0_of_step(step, draw) -> the clean latents (diffusers' scaling); draws: each step's noise and
    timesteps. Returns the loss per step."""
    scheduler = DDPMScheduler(**{k: v for k, v in SD_SCHEDULE.items() if k in ("beta_start", "beta_end", "beta_schedule")},
                              prediction_type=prediction)
    parameters = [p for layer in layers for p in (layer.up, layer.down)]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, betas=(0.9, 0.999), weight_decay=1e-2, eps=adam_eps)
    for p in unet.parameters():
        p.requires_grad_(False)
    for p in parameters:
        p.requires_grad_(True)
    losses = []
    for step, draw in enumerate(draws):
        x0 = x0_of_step(step, draw)
        noisy = scheduler.add_noise(x0, draw.noise, draw.timesteps)
        batch = x0.shape[0]
        output = unet_eps(unet, noisy, draw.timesteps, embeddings.expand(batch, -1, -1),
                          None if pooled is None else pooled.expand(batch, -1), x0.shape[2], x0.shape[3])
        target = draw.noise if prediction == "epsilon" else scheduler.get_velocity(x0, draw.noise, draw.timesteps)
        loss = torch.nn.functional.mse_loss(output.float(), target.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    return losses
