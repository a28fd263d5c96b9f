"""DDIM inversion in ComfyUI's sigma space: a latent walked up the noise schedule.

The latent x at noise level sigma is what ComfyUI's k-diffusion samplers hold and what its
noise_scaling makes from a clean latent x0 and noise n: x0 + sigma * n on eps and v-prediction models,
(1 - sigma) * x0 + sigma * n on flow models (CONST: Flux, SD3, Qwen). Both samplers and this walk
take eps = (x - denoised) / sigma, the noise on the first and the velocity n - x0 on the second, and
step x_next = x + (sigma_next - sigma) * eps. That Euler step is DDIM with eta 0 on both: the x0 and n
that x and eps imply at sigma (x0 = x - sigma * eps on both; n = eps, or x + (1 - sigma) * eps),
noised again to sigma_next, give the same x_next, both paths being straight lines in sigma for fixed
x0 and n. So the walk reverses ComfyUI's euler sampler on both, up to the error of the label below.

Inversion takes the ascending schedule. As in diffusers' DDIMInverseScheduler and the papers' inversion
code, the step sigma -> sigma_next predicts eps from the current latent labelled with sigma_next (at the
first step sigma is 0, where eps is not defined), the same label euler uses when stepping back from
sigma_next: the model sees the current latent scaled as it would be at sigma, i.e. the denoiser is
called on x * c_in(sigma) / c_in(sigma_next). c_in is 1 on flow models (CONST's calculate_input is the
identity), so there the denoiser sees x itself.

The trajectory keeps x in that same space at every sigma: the Style Reference (Inversion) feeds the
latent at sigma to the model at sigma, as a sampler would. On flow models the top (sigma 1) is pure
noise in that space; a sampler takes it as its noise, since noise_scaling(1, n, x0) ignores x0.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from safetensors import safe_open

from ..attention_patches.precision import at_least_float32
from ..safetensors_file import write_atomically

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, sigma per item) -> predicted x0


class ScheduleMismatchError(ValueError):
    pass


@dataclass(frozen=True)
class InversionTrajectory:
    """The inverted latent at every sigma of an ascending schedule (model space, before decoding)."""

    sigmas: torch.Tensor  # (steps + 1,), ascending from 0
    latents: torch.Tensor  # (steps + 1, batch, channels, height, width)

    def latent_at(self, sigma: float, tolerance: float = 1e-4) -> torch.Tensor:
        """The latent at a sigma of the schedule; any other sigma is an error (schedules must match)."""
        distance = (self.sigmas - sigma).abs()
        index = int(distance.argmin())
        if distance[index] > tolerance * max(1.0, abs(sigma)):
            raise ScheduleMismatchError(
                f"sigma {sigma:.4f} is not in the inversion's schedule ({len(self.sigmas) - 1} steps, "
                f"sigmas {self.sigmas[1]:.4f} to {self.sigmas[-1]:.4f}); sample with the steps and scheduler "
                "the inversion used"
            )
        return self.latents[index]

    @property
    def top(self) -> torch.Tensor:
        return self.latents[-1]


@torch.no_grad()
def invert(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    input_scale: Callable[[torch.Tensor], torch.Tensor],
    on_step: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
) -> InversionTrajectory:
    """Walk x (clean, at sigmas[0] = 0) up the ascending sigmas; return every intermediate latent.

    input_scale(sigma) is the model's c_in at sigma (1 / sqrt(sigma^2 + sigma_data^2) for eps and
    v-prediction models, 1 for flow models). on_step(i, x, denoised) is called after each step.

    The walk runs in at least float32 whatever x's dtype (a no-op for ComfyUI's float32 latents), the
    latents kept in x's dtype: in float16 the sigmas handed to the denoiser would be rounded (14.6146
    -> 14.617; 14.625 in bfloat16), eps = (x - x0) / sigma cancels at small sigma, and each step's
    update would be rounded into the next. The denoiser gets float32 latents and sigmas (ComfyUI's
    casts them to the model's dtype).
    """
    if sigmas.ndim != 1 or len(sigmas) < 2 or not bool((sigmas[1:] > sigmas[:-1]).all()):
        raise ValueError("inversion needs an ascending schedule of at least two sigmas")
    dtype = x.dtype
    latents = [x]
    x = at_least_float32(x)
    ones = x.new_ones(x.shape[0])
    scales = [input_scale(sigma) for sigma in sigmas]
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        labelled = x * (scales[i] / scales[i + 1])
        denoised = denoise(labelled, sigma_next * ones)
        eps = (labelled - denoised) / sigma_next
        x = x + (sigma_next - sigma) * eps
        latents.append(x.to(dtype))
        if on_step is not None:
            on_step(i, latents[-1], denoised)
    return InversionTrajectory(sigmas=sigmas.detach().cpu().float(), latents=torch.stack(latents).cpu())


TRAJECTORY_FORMAT = "style-attention-nodes/inversion-trajectory/1"


def save_trajectory(trajectory: InversionTrajectory, path: str, metadata: dict[str, str] | None = None) -> None:
    """Write to a .safetensors file atomically: a failed write leaves no partial file behind."""
    write_atomically({"sigmas": trajectory.sigmas, "latents": trajectory.latents}, path,
                     {**(metadata or {}), "format": TRAJECTORY_FORMAT})


def load_trajectory(path: str) -> InversionTrajectory:
    with safe_open(path, framework="pt") as archive:
        if (archive.metadata() or {}).get("format") != TRAJECTORY_FORMAT:
            raise ValueError(f"{path} is not an inversion saved by Save Inversion")
        sigmas, latents = archive.get_tensor("sigmas"), archive.get_tensor("latents")
    # latents: (steps + 1, batch, C, H, W), or (..., C, 1, H, W) for a model with a frame axis (Qwen-Image)
    if sigmas.ndim != 1 or latents.ndim not in (5, 6) or latents.shape[0] != sigmas.shape[0]:
        raise ValueError(f"{path}: inconsistent inversion (sigmas {tuple(sigmas.shape)}, latents {tuple(latents.shape)})")
    return InversionTrajectory(sigmas=sigmas, latents=latents)
