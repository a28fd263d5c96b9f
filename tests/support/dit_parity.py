"""What the DiT parity tests (SD3, Qwen-Image, Lumina 2) share: the external latent reference both sides
use, StyleAligned on its own positions, and ComfyUI's euler sampling of the tiny model."""

import torch

import comfy.sample
from helpers import run_node

TOLERANCE = 1e-4
SIZE = 8
REFERENCE_SEED = 3


def reference_latent() -> torch.Tensor:
    return torch.randn(1, 16, SIZE, SIZE, generator=torch.Generator().manual_seed(11))


def external_reference(conditioning):
    """Style Reference (Latent) of reference_latent() with that conditioning, its noise from REFERENCE_SEED."""
    (reference,) = run_node("StyleReferenceLatent", latent={"samples": reference_latent()}, clip=None, prompt="",
                            reference_seed=REFERENCE_SEED, cache_megabytes=64, cache_on_cpu=False,
                            conditioning=conditioning)
    return reference


def oracle_reference(model, conditioning, frames: bool = False):
    """What the oracle's twin_sample takes for that reference: (clean latent in the model's space, its noise, its
    conditioning); frames: with the frame axis the pack gives a 4-D latent on Qwen-Image."""
    latent = reference_latent().unsqueeze(2) if frames else reference_latent()
    return model.model.process_latent_in(latent), comfy.sample.prepare_noise(latent, REFERENCE_SEED), conditioning


def same_positions(model, **kwargs):
    """StyleAligned on every block with the reference's keys on their own positions (reference_positions same)."""
    (styled,) = run_node("StyleAlignedAttention", model=model, share_attention=True, adain_queries=True,
                         adain_keys=True, adain_values=False, shared_score_scale=1.0, shared_score_shift=0.0,
                         shared_group_norm="auto", layers="all_blocks", custom_layers="", start_percent=0.0,
                         end_percent=1.0, reference_positions="same", **kwargs)
    return styled


def sample(model, noise, steps, cfg, positive, negative):
    """ComfyUI's euler on the simple schedule from an empty latent."""
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", positive, negative, torch.zeros_like(noise),
                               seed=1, disable_pbar=True)
