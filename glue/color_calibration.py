"""StyleKeeper's colour calibration in ComfyUI: a post-CFG function that gives the guided denoised
prediction (every row: with an external reference all rows are targets) the reference's clean latent's
per-channel statistics, in the authors' window of model timesteps (strictly between start - length and
start: their code's 150 > t > 100)."""

from dataclasses import dataclass

import torch

from ..attention_patches.color_calibration import channel_calibrated
from .references import ExternalReference


@dataclass(frozen=True)
class ColorCalibration:
    reference: ExternalReference
    sigma_low: float  # the window's sigmas, both ends excluded
    sigma_high: float

    def __call__(self, args: dict) -> torch.Tensor:
        denoised = args["denoised"]
        sigma = float(args["sigma"].flatten()[0])
        if not self.sigma_low < sigma < self.sigma_high:
            return denoised
        reference = self.reference.clean_latent(args["model"]).to(denoised)
        return channel_calibrated(denoised, reference)


def install_color_calibration(model, reference: ExternalReference, start_timestep: int, length: int) -> None:
    """On model (a clone): calibrate while start_timestep - length < t < start_timestep."""
    sampling = model.get_model_object("model_sampling")
    high = float(sampling.sigma(torch.tensor(float(start_timestep))))
    low = float(sampling.sigma(torch.tensor(float(max(start_timestep - length, 0)))))
    model.set_model_sampler_post_cfg_function(ColorCalibration(reference, low, high))
