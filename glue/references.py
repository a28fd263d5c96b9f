"""External style references, run alone at each step: a latent (e.g. a VAE-encoded image),
forward-noised to each sigma under a fixed seed, or a DDIM inversion, at the latent its inversion
reached there; each with what it is conditioned on."""

from dataclasses import dataclass

import torch

import comfy.sampler_helpers
import comfy.samplers

from ..attention_patches.feature_store import FeatureStore
from ..inversion.ddim import InversionTrajectory


@dataclass(frozen=True, kw_only=True)
class ExternalReference:
    """A reference run alone at each step: its state at a sigma comes from a subclass."""

    conditioning: list  # a CONDITIONING with one entry
    cache_megabytes: int  # budget for recorded passes per style node; 0 records every step
    cache_on_cpu: bool

    def state_at(self, base_model, sigma: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def new_cache(self) -> FeatureStore | None:
        """The node's store of this reference's recorded passes, tagged by the model's weights."""
        if self.cache_megabytes == 0:
            return None
        return FeatureStore(self.cache_megabytes * 2**20, torch.device("cpu") if self.cache_on_cpu else None)

    def latent_shape(self) -> torch.Size:
        raise NotImplementedError

    def clean_latent(self, base_model) -> torch.Tensor:
        """The reference's clean latent in the model's space (colour calibration's statistics)."""
        raise NotImplementedError

    def model_inputs(self, base_model, noisy: torch.Tensor) -> dict:
        """apply_model's keyword inputs (c_crossattn, y, ...) for the reference, batch 1."""
        conds = comfy.sampler_helpers.convert_cond(self.conditioning)
        conds = comfy.samplers.encode_model_conds(base_model.extra_conds, conds, noisy, noisy.device, "positive")
        return {
            name: cond.process_cond(batch_size=1, device=noisy.device, area=None).cond
            for name, cond in conds[0]["model_conds"].items()
        }


@dataclass(frozen=True, kw_only=True)
class LatentReference(ExternalReference):
    """Forward-noised to each sigma with noise drawn once from a seed."""

    latent: torch.Tensor  # (1, C, H, W) or (1, C, 1, H, W), as a LATENT holds it (before the latent scaling)
    noise: torch.Tensor  # same shape

    def state_at(self, base_model, sigma: torch.Tensor) -> torch.Tensor:
        clean = self.clean_latent(base_model)
        return base_model.model_sampling.noise_scaling(sigma, with_frames(base_model, self.noise), clean)

    def latent_shape(self) -> torch.Size:
        return self.latent.shape

    def clean_latent(self, base_model) -> torch.Tensor:
        return base_model.process_latent_in(with_frames(base_model, self.latent))


def with_frames(base_model, latent: torch.Tensor) -> torch.Tensor:
    """An image latent as the model samples it: (1, C, 1, H, W) where its latents have a frame axis
    (Qwen-Image's, as ComfyUI's sampling turns an empty 4-D latent), else as it is."""
    if getattr(base_model.latent_format, "latent_dimensions", 2) == 3 and latent.ndim == 4:
        return latent.unsqueeze(2)
    return latent


@dataclass(frozen=True, kw_only=True)
class InversionReference(ExternalReference):
    """At each sigma, the latent its DDIM inversion reached there (sample with the inversion's schedule)."""

    trajectory: InversionTrajectory

    def state_at(self, base_model, sigma: torch.Tensor) -> torch.Tensor:
        return self.trajectory.latent_at(float(sigma[0]))

    def latent_shape(self) -> torch.Size:
        return self.trajectory.latents.shape[1:]

    def clean_latent(self, base_model) -> torch.Tensor:
        return self.trajectory.latents[0]  # the image's latent at sigma 0, in the model's space
