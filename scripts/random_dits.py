"""Tiny Flux-family DiTs with random weights, built through comfy.supported_models as a real file of
that family would be (hidden 64, 2 heads, 2 double and 2 single blocks): no weights are downloaded.

Conditioning is built directly: [[context (1, tokens, TEXT_DIM), {"pooled_output": (1, POOLED_DIM),
"guidance": 3.5}]] (flux_conditioning)."""

import dataclasses

import torch

import comfy.ldm.flux.model
import comfy.supported_models
from random_models import model_patcher

TEXT_DIM, POOLED_DIM = 32, 32  # T5 and CLIP-L widths of the tiny models (4096 and 768 on Flux.1)


def tiny_flux_config(**overrides) -> dict:
    """A Flux.1-shaped unet_config as ComfyUI's detection writes it, shrunk (head dim 32: RoPE axes 4+14+14)."""
    config = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2, "vec_in_dim": POOLED_DIM,
              "context_in_dim": TEXT_DIM, "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2, "depth": 2,
              "depth_single_blocks": 2, "axes_dim": [4, 14, 14], "theta": 10000, "qkv_bias": True,
              "guidance_embed": True}
    if "txt_ids_dims" in {field.name for field in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}:
        config["txt_ids_dims"] = []  # ComfyUI 0.8.0 needs it; 0.3.75 rejects it
    return {**config, **overrides}


def tiny_flux(seed: int = 0, dtype: torch.dtype = torch.float32, manual_cast_dtype: torch.dtype | None = None,
              **overrides):
    """A tiny Flux.1 (dev: guidance embedded; schnell with guidance_embed=False) ModelPatcher."""
    model_config = comfy.supported_models.Flux(tiny_flux_config(**overrides))
    return model_patcher(model_config, seed, dtype, manual_cast_dtype)


def flux_conditioning(seed: int, tokens: int = 8, guidance: float | None = 3.5) -> list:
    generator = torch.Generator().manual_seed(seed)
    extras = {"pooled_output": torch.randn(1, POOLED_DIM, generator=generator)}
    if guidance is not None:
        extras["guidance"] = guidance
    return [[torch.randn(1, tokens, TEXT_DIM, generator=generator), extras]]
