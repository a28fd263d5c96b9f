"""StyleKeeper's colour calibration in ComfyUI: a post-CFG function that gives the guided denoised
prediction (every row: with an external reference all rows are targets) the reference's clean latent's
per-channel statistics (several references: their mixture's), in the authors' window of model timesteps
(strictly between start - length and start: their code's 150 > t > 100). On a flow model (Flux) the model's timestep is sigma itself; there the
window is read on diffusers' flow scale, t = 1000 * sigma (Flux pipelines' timesteps), so the same
numbers mean the same late part of the schedule."""

from dataclasses import dataclass

import torch

import comfy.model_sampling

from ..attention_patches.color_calibration import calibrated_to, channel_calibrated
from .references import ExternalReference, ReferenceSet


@dataclass(frozen=True)
class ColorCalibration:
    reference: ExternalReference | ReferenceSet
    timestep_low: float  # the window's model timesteps, both ends excluded
    timestep_high: float

    def __call__(self, args: dict) -> torch.Tensor:
        denoised = args["denoised"]
        # the sampling model's own schedule at call time (a later ModelSampling node may have changed it)
        model_sampling = args["model"].model_sampling
        sigma = args["sigma"].flatten()[:1]
        if isinstance(model_sampling, comfy.model_sampling.CONST):
            timestep = 1000.0 * float(sigma[0])
        else:
            timestep = float(model_sampling.timestep(sigma)[0])
        if not self.timestep_low < timestep < self.timestep_high:
            return denoised
        if isinstance(self.reference, ReferenceSet):
            mean, variance = self.reference.channel_moments(args["model"])
            return calibrated_to(denoised, mean.to(denoised.device), variance.sqrt().to(denoised.device))
        reference = self.reference.clean_latent(args["model"]).to(denoised)
        return channel_calibrated(denoised, reference)


def install_color_calibration(model, reference: ExternalReference | ReferenceSet, start_timestep: int, length: int) -> None:
    """On model (a clone): calibrate while start_timestep - length < t < start_timestep."""
    model.set_model_sampler_post_cfg_function(
        ColorCalibration(reference, float(max(start_timestep - length, 0)), float(start_timestep)))
