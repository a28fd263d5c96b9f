"""The fitting loop: ε- (or v-) prediction MSE at random timesteps on the style image's latent.

ComfyUI samples in sigma space, x_t = x0 + sigma * noise, and its model returns the denoised x0;
the model's raw ε or v output is recovered from that exactly, so the loss is the paper's (and the
authors' code's) MSE on the raw prediction, whatever the sampling wrappers do.

Randomness comes from CPU generators seeded by the seed, so one seed gives one LoRA on any device:
the initial adapters from `seed`, each step's images, latent sample, noise and timesteps from
`seed + 1`.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..attention_patches.precision import at_least_float32


@dataclass(frozen=True)
class FitSettings:
    steps: int = 200
    batch_size: int = 1
    learning_rate: float = 2e-4
    seed: int = 0
    sample_latent: bool = True  # a fresh sample of the VAE's latent distribution each step (authors)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-2
    eps: float = 1e-8


@dataclass(frozen=True)
class StepDraw:
    images: list[int]
    latent_noise: torch.Tensor  # for the latent sample (drawn in both latent modes)
    noise: torch.Tensor
    timesteps: torch.Tensor


def draw_step(generator: torch.Generator, step: int, image_count: int, batch_size: int, shape,
              timesteps: int) -> StepDraw:
    """Step `step`'s random choices (t uniform in [0, timesteps)); images cycle in order so a small
    batch of styles is seen evenly."""
    return StepDraw(
        images=[(step * batch_size + j) % image_count for j in range(batch_size)],
        latent_noise=torch.randn((batch_size, *shape), generator=generator),
        noise=torch.randn((batch_size, *shape), generator=generator),
        timesteps=torch.randint(0, timesteps, (batch_size,), generator=generator),
    )


def initial_lora(shapes: list[tuple[int, int]], rank: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(up, down) per (out, in) shape, as diffusers' LoRA layers start: down ~ N(0, 1/rank), up 0."""
    generator = torch.Generator().manual_seed(seed)
    return [(torch.zeros(out_features, rank), torch.randn(rank, in_features, generator=generator) / rank)
            for out_features, in_features in shapes]


def prediction_loss(prediction: str, x0, noise, sigma, x_t, denoised) -> torch.Tensor:
    """MSE between the model's raw output (from its denoised x0) and the ε or v target, in float32.

    Every input is taken to at least float32 first (no-ops for float32): recovering the raw output
    subtracts nearly equal latents and divides by a small sigma (eps) or cancels x_t c^2 against x0
    (v), which in float16 costs percents of the loss; the gradient reaches denoised in its own dtype."""
    x0, noise, sigma, x_t, denoised = map(at_least_float32, (x0, noise, sigma, x_t, denoised))
    s = sigma.reshape(-1, *[1] * (x0.ndim - 1))
    if prediction == "eps":  # denoised = x_t - s * eps
        output, target = (x_t - denoised) / s, noise
    elif prediction == "v":  # denoised = c^2 x_t - s c v, with c = 1 / sqrt(1 + s^2)
        c = (1 + s**2).rsqrt()
        output, target = (x_t * c**2 - denoised) / (s * c), c * (noise - s * x0)
    else:
        raise ValueError(f"prediction must be 'eps' or 'v', not {prediction!r}")
    return torch.nn.functional.mse_loss(output.float(), target.float())


def fit(denoise: Callable, mean: torch.Tensor, std: torch.Tensor, sigmas: torch.Tensor, prediction: str,
        parameters: list[torch.Tensor], settings: FitSettings, on_step: Callable) -> list[float]:
    """Trains `parameters` (the adapters `denoise` goes through) with AdamW at a constant rate.

    mean, std: the latent distribution of each image, in the model's latent space; sigmas: the
    model's sigma at each integer timestep of its training schedule (1000 for SD);
    on_step(step, loss, x_t, denoised) after each step.
    Returns the loss of every step."""
    optimizer = torch.optim.AdamW(parameters, lr=settings.learning_rate, betas=settings.betas,
                                  weight_decay=settings.weight_decay, eps=settings.eps,
                                  fused=mean.device.type == "cuda" or None)
    generator = torch.Generator().manual_seed(settings.seed + 1)
    losses = []
    for step in range(settings.steps):
        draw = draw_step(generator, step, mean.shape[0], settings.batch_size, mean.shape[1:], len(sigmas))
        x0 = mean[draw.images]
        if settings.sample_latent:
            x0 = x0 + std[draw.images] * draw.latent_noise.to(x0)
        noise = draw.noise.to(x0)
        sigma = sigmas[draw.timesteps].to(x0)
        x_t = x0 + sigma.reshape(-1, *[1] * (x0.ndim - 1)) * noise
        with torch.enable_grad():
            denoised = denoise(x_t, sigma)
            loss = prediction_loss(prediction, x0, noise, sigma, x_t, denoised)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))  # the one device sync of a step: the progress text and curve need it
        on_step(step, losses[-1], x_t, denoised.detach())
    return losses
