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
    dims = (-2, -1)
    x, reference = at_least_float32(x0), at_least_float32(reference)  # no-ops for float32
    mean, std = x.mean(dims, keepdim=True), x.std(dims, keepdim=True)
    reference_mean, reference_std = reference.mean(dims, keepdim=True), reference.std(dims, keepdim=True)
    return ((x - mean) / (std + EPSILON) * reference_std + reference_mean).to(x0.dtype)
