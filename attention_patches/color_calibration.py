"""StyleKeeper's colour calibration (Jeong et al. 2025; the authors' scheduling_ddim.py, fit_mode
"channel"), pure torch: a predicted clean latent takes a reference latent's per-channel statistics
over space, so a real-image reference's colours survive the swap."""

import torch

from .precision import at_least_float32

EPSILON = 1e-8  # added to the target's standard deviation, as the authors' code


def channel_calibrated(x0: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """x0 (batch, channels, height, width): each image's channels normalised over space and given the
    mean and standard deviation (unbiased, over space) of reference's (1, channels, h, w) channels.

    In at least float32 (precision.py), cast back to x0's dtype: in float16 EPSILON rounds to 0, so a
    constant channel gives 0 / 0. (ComfyUI hands the post-CFG function float32 latents; this keeps
    the function safe on its own.)"""
    if reference.shape[1] != x0.shape[1]:
        raise ValueError(f"colour calibration: the reference latent has {reference.shape[1]} channels and the "
                         f"prediction {x0.shape[1]}")
    reference = at_least_float32(reference)  # a no-op for float32
    dims = (-2, -1)
    return calibrated_to(x0, reference.mean(dims, keepdim=True), reference.std(dims, keepdim=True))


def calibrated_to(x0: torch.Tensor, reference_mean: torch.Tensor, reference_std: torch.Tensor) -> torch.Tensor:
    """x0's channels normalised over space and given this mean and standard deviation ((1, channels, 1, 1)
    each; several references: their mixture's, glue's ReferenceSet.channel_moments)."""
    dims = (-2, -1)
    x = at_least_float32(x0)
    mean, std = x.mean(dims, keepdim=True), x.std(dims, keepdim=True)
    return ((x - mean) / (std + EPSILON) * reference_std + reference_mean).to(x0.dtype)
