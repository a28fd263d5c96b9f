"""External style references, run alone at each step: a latent (e.g. a VAE-encoded image),
forward-noised to each sigma under a fixed seed, or a DDIM inversion, at the latent its inversion
reached there; each with what it is conditioned on. Several, with a weight each, make a ReferenceSet."""

from dataclasses import dataclass

import torch

import comfy.sampler_helpers
import comfy.samplers

from ..attention_patches.feature_store import FeatureStore
from ..attention_patches.reference_set import mixture
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


MAX_REFERENCES = 8  # each adds its keys to every styled attention and (uncached) one model call per step


@dataclass(frozen=True)
class ReferenceSet:
    """Several external references with a weight each (> 0), in the order given: at each step each runs
    alone (or replays its own cache), and the style layers read their recordings together
    (attention_patches/reference_set.py says how weights act)."""

    members: tuple[ExternalReference, ...]
    weights: tuple[float, ...]

    def new_cache(self) -> tuple[FeatureStore | None, ...]:
        """One store per reference, each within its own node's budget."""
        return tuple(member.new_cache() for member in self.members)

    def channel_moments(self, base_model) -> tuple[torch.Tensor, torch.Tensor]:
        """Colour calibration's target: the mixture of the references' clean latents' per-channel
        (mean, unbiased variance) over space, in proportions w_i / sum w."""
        total = sum(self.weights)
        components = []
        for member in self.members:
            latent = member.clean_latent(base_model).float()
            components.append((latent.mean((-2, -1), keepdim=True), latent.var((-2, -1), keepdim=True)))
        return mixture(components, tuple(w / total for w in self.weights))


def combined(references: list[tuple[ExternalReference | ReferenceSet, float]]) -> ReferenceSet:
    """One ReferenceSet of (reference or set, weight) pairs: a set's members join with their weights times
    its weight, the same reference given twice counts once with the weights added (w copies of a reference's
    keys and w' more are w + w'), weight-0 references are left out. Errors name the weights' inputs."""
    merged: dict[int, list] = {}
    for number, (reference, weight) in enumerate(references, start=1):
        if not weight >= 0.0:
            raise ValueError(f"weight_{number}: expected a weight of 0 or more, got {weight}")
        pairs = zip(reference.members, reference.weights) if isinstance(reference, ReferenceSet) else [(reference, 1.0)]
        for member, member_weight in pairs:
            entry = merged.setdefault(id(member), [member, 0.0])
            entry[1] += weight * member_weight
    kept = [(member, weight) for member, weight in merged.values() if weight > 0.0]
    if not kept:
        raise ValueError("weights: every weight is 0; give at least one reference a weight above 0")
    if len(kept) > MAX_REFERENCES:
        raise ValueError(f"references: {len(kept)} different references, at most {MAX_REFERENCES} (each adds its "
                         "keys to every styled attention and, past its cache, one model call per step)")
    return ReferenceSet(tuple(member for member, _ in kept), tuple(weight for _, weight in kept))
