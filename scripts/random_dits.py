"""Tiny DiTs with random weights (Flux.1, Chroma, SD3, SD3.5 Medium, Qwen-Image, Lumina 2, Z-Image), built
through comfy.supported_models as a real file of that family would be (a few blocks, 2 heads; hidden 64
where the family allows): no weights are downloaded. Attention is sharpened as a trained model's is
(QK-norm scales in [1, 2.5]), or every attention would be almost uniform.

Conditioning is built directly: [[context (1, tokens, TEXT_DIM), {...}]] (flux_conditioning with its
pooled output and guidance, sd3_conditioning, qwen_conditioning, lumina2_conditioning), or for Flux by a
tiny text encoder of ComfyUI's own classes (tiny_flux_clip); tiny_flux_vae decodes 16-channel latents."""

import dataclasses

import torch

import comfy.ldm.chroma.model
import comfy.ldm.flux.model
import comfy.sd
import comfy.supported_models
from random_models import TINY_CLIP_TEXT_CONFIG, TINY_VAE_DDCONFIG, RandomModels, _clip, _vae, model_patcher

TEXT_DIM, POOLED_DIM = 32, 32  # T5 and CLIP-L widths of the tiny models (4096 and 768 on Flux.1)
TINY_T5_CONFIG = {"d_model": TEXT_DIM, "d_ff": 64, "d_kv": 16, "num_heads": 2, "num_layers": 2}


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
    """A tiny Flux.1 (dev: guidance embedded; schnell with guidance_embed=False) ModelPatcher, its QK-norm
    scales drawn as a trained model has them (_sharpened)."""
    model_config = comfy.supported_models.Flux(tiny_flux_config(**overrides))
    return _sharpened(model_patcher(model_config, seed, dtype, manual_cast_dtype), seed)


def tiny_chroma(seed: int = 0, dtype: torch.dtype = torch.float32, manual_cast_dtype: torch.dtype | None = None):
    """A tiny Chroma (Flux's blocks, modulation from a distilled approximator instead of per-block layers),
    its QK-norm scales drawn as tiny_flux's."""
    config = {"image_model": "chroma", "in_channels": 64, "out_channels": 64, "patch_size": 2,
              "context_in_dim": TEXT_DIM, "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2, "depth": 2,
              "depth_single_blocks": 2, "axes_dim": [4, 14, 14], "theta": 10000, "qkv_bias": True,
              "in_dim": 64, "out_dim": 64, "hidden_dim": 64, "n_layers": 1}
    fields = {field.name for field in dataclasses.fields(comfy.ldm.chroma.model.ChromaParams)}
    config.update({name: value for name, value in (("txt_ids_dims", []), ("vec_in_dim", None)) if name in fields})
    return _sharpened(model_patcher(comfy.supported_models.Chroma(config), seed, dtype, manual_cast_dtype), seed)


def _sharpened(patcher, seed: int, names=("query_norm.scale", "key_norm.scale")):
    """QK-norm scales uniform in [1, 2.5], as a trained model has them (near 1 and above): the generic
    N(0, 0.02) of parameters without reset_parameters would make every attention almost uniform, where
    positions (RoPE) and anything else that moves the scores barely move the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in patcher.model.diffusion_model.named_parameters():
            if name.endswith(names):
                parameter.copy_(torch.rand(parameter.shape, generator=generator) * 1.5 + 1.0)
    return patcher


QWEN_IMAGE_CONFIG = {"image_model": "qwen_image", "patch_size": 2, "in_channels": 64, "out_channels": 16,
                     "num_layers": 2, "attention_head_dim": 32, "num_attention_heads": 2,
                     "joint_attention_dim": TEXT_DIM, "axes_dims_rope": (4, 14, 14)}


def tiny_qwen_image(seed: int = 0, dtype: torch.dtype = torch.float32, manual_cast_dtype: torch.dtype | None = None):
    """A tiny Qwen-Image (2 dual-stream blocks of 2 heads of 32, text width TEXT_DIM; 3584 on the real one)
    ModelPatcher, its QK RMSNorm weights (norm_q, norm_k, norm_added_q, norm_added_k) uniform in [1, 2.5] as
    _sharpened's. Latents at the model are 5-D: (batch, 16, 1, height, width)."""
    patcher = model_patcher(comfy.supported_models.QwenImage(dict(QWEN_IMAGE_CONFIG)), seed, dtype, manual_cast_dtype)
    return _sharpened(patcher, seed, names=tuple(f"attn.{n}.weight" for n in ("norm_q", "norm_k", "norm_added_q",
                                                                                "norm_added_k")))


def qwen_conditioning(seed: int, tokens: int = 8) -> list:
    """[[context (1, tokens, TEXT_DIM), {}]] for tiny_qwen_image (no pooled output, no guidance)."""
    return [[torch.randn(1, tokens, TEXT_DIM, generator=torch.Generator().manual_seed(seed)), {}]]


def tiny_lumina2_config(z_image: bool = False, **overrides) -> dict:
    """A Lumina Image 2.0-shaped unet_config as ComfyUI's detection writes it, shrunk (hidden 64, 2 heads of 32,
    grouped-query attention with 1 key/value head, 2 main layers and 1 of each refiner); z_image: Z-Image's
    (no grouped keys, its modulation, time scale 1000, rope theta 256, caption and image padded to 32 tokens;
    256 wide, 2 heads of 128 with the real axes 32 + 48 + 48: its modulation is 256 wide whatever the model's)."""
    config = {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 64, "cap_feat_dim": TEXT_DIM,
              "n_layers": 2, "n_refiner_layers": 1, "n_heads": 2, "n_kv_heads": 1, "qk_norm": True,
              "axes_dims": [8, 12, 12], "axes_lens": [300, 512, 512], "rope_theta": 10000.0, "ffn_dim_multiplier": 4.0,
              "multiple_of": 16}
    if z_image:
        config.update(dim=256, n_kv_heads=2, axes_dims=[32, 48, 48], rope_theta=256.0, ffn_dim_multiplier=8.0 / 3.0, z_image_modulation=True,
                      time_scale=1000.0, pad_tokens_multiple=32)
    return {**config, **overrides}


def tiny_lumina2(seed: int = 0, dtype: torch.dtype = torch.float32, manual_cast_dtype: torch.dtype | None = None,
                 z_image: bool = False):
    """A tiny Lumina Image 2.0 (or, z_image, Z-Image) ModelPatcher, its QK-norm weights drawn as _sharpened's
    and its padding tokens (torch.empty in the model) drawn N(0, 1)."""
    supported = comfy.supported_models.ZImage if z_image else comfy.supported_models.Lumina2
    patcher = model_patcher(supported(tiny_lumina2_config(z_image)), seed, dtype, manual_cast_dtype)
    dit = patcher.model.diffusion_model
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name in ("x_pad_token", "cap_pad_token"):
            if hasattr(dit, name):
                getattr(dit, name).copy_(torch.randn(getattr(dit, name).shape, generator=generator))
    return _sharpened(patcher, seed, names=("q_norm.weight", "k_norm.weight"))


def tiny_z_image(seed: int = 0, dtype: torch.dtype = torch.float32, manual_cast_dtype: torch.dtype | None = None):
    return tiny_lumina2(seed, dtype, manual_cast_dtype, z_image=True)


def lumina2_conditioning(seed: int, tokens: int = 8) -> list:
    """[[context (1, tokens, TEXT_DIM), {}]] for tiny_lumina2 / tiny_z_image (Gemma 2 / Qwen3 hidden states on
    the real ones)."""
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, tokens, TEXT_DIM, generator=generator), {}]]


def flux_conditioning(seed: int, tokens: int = 8, guidance: float | None = 3.5) -> list:
    generator = torch.Generator().manual_seed(seed)
    extras = {"pooled_output": torch.randn(1, POOLED_DIM, generator=generator)}
    if guidance is not None:
        extras["guidance"] = guidance
    return [[torch.randn(1, tokens, TEXT_DIM, generator=generator), extras]]


def tiny_sd3_config(depth: int = 2, **overrides) -> dict:
    """SD3 Medium's unet_config as ComfyUI's detection writes it, shrunk. MMDiT derives its width from depth
    (hidden 64 * depth, depth heads of 64), so depth 2 is 128 wide, 2 heads, 2 joint blocks (the last one's
    text side pre-only). The pos_embed table is 16 x 16 patches (latents up to 32 x 32)."""
    config = {"in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": depth, "input_size": None,
              "adm_in_channels": POOLED_DIM, "pos_embed_scaling_factor": None, "num_patches": 256,
              "pos_embed_max_size": 16, "x_block_self_attn_layers": [],
              "context_embedder_config": {"target": "torch.nn.Linear",
                                          "params": {"in_features": TEXT_DIM, "out_features": 64 * depth}}}
    return {**config, **overrides}


def tiny_sd3(seed: int = 0, dtype: torch.dtype = torch.float32, manual_cast_dtype: torch.dtype | None = None,
             **overrides):
    """A tiny SD3 (3.0 Medium: no QK norm) ModelPatcher: 2 joint blocks of 2 heads, attention sharpened
    (_mmdit_filled)."""
    model_config = comfy.supported_models.SD3(tiny_sd3_config(**overrides))
    return _mmdit_filled(model_patcher(model_config, seed, dtype, manual_cast_dtype), seed)


def tiny_sd35_medium(seed: int = 0, dtype: torch.dtype = torch.float32,
                     manual_cast_dtype: torch.dtype | None = None):
    """A tiny SD3.5 Medium: QK RMSNorm, and the x_block's second, image-only self-attention (attn2) in its
    first blocks (0-12 of 24 in the real one): depth 3 (192 wide, 3 heads), attn2 in blocks 0 and 1."""
    return tiny_sd3(seed, dtype, manual_cast_dtype, depth=3, qk_norm="rms", x_block_self_attn_layers=[0, 1])


def _mmdit_filled(patcher, seed: int):
    """What randomize_parameters leaves unlike a real file: the pos_embed buffer (torch.empty: garbage) gets
    the 2-D sin-cos table; QK-RMSNorm scales uniform in [1, 2.5] as _sharpened's, or without QK norm (SD3.0)
    every qkv's q and k rows times 3. Otherwise attention is near-uniform (normalised entropy ~0.99) and
    errors in what a row attends to are invisible."""
    from comfy.ldm.modules.diffusionmodules.mmdit import get_2d_sincos_pos_embed
    dit = patcher.model.diffusion_model
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        side = dit.pos_embed_max_size
        dit.pos_embed.copy_(torch.from_numpy(get_2d_sincos_pos_embed(dit.hidden_size, side)).float()[None])
        qk_norm = any(name.endswith("ln_q.weight") for name, _ in dit.named_parameters())
        for name, parameter in dit.named_parameters():
            if name.endswith(("ln_q.weight", "ln_k.weight")):
                parameter.copy_(torch.rand(parameter.shape, generator=generator) * 1.5 + 1.0)
            elif name.endswith(("qkv.weight", "qkv.bias")) and not qk_norm:
                parameter[:2 * dit.hidden_size] *= 3.0
    return patcher


def sd3_conditioning(seed: int, tokens: int = 8) -> list:
    """[[context (1, tokens, TEXT_DIM), {"pooled_output": (1, POOLED_DIM)}]] for tiny_sd3 / tiny_sd35_medium
    (4096 and 2048 wide on the real ones)."""
    generator = torch.Generator().manual_seed(seed)
    pooled = torch.randn(1, POOLED_DIM, generator=generator)
    return [[torch.randn(1, tokens, TEXT_DIM, generator=generator), {"pooled_output": pooled}]]


def tiny_flux_clip(seed: int = 0) -> comfy.sd.CLIP:
    """Flux's text encoder as DualCLIPLoader (type flux) builds it: ComfyUI's CLIP-L and T5-XXL classes with
    their real tokenizers, shrunk (CLIP-L hidden POOLED_DIM, T5 d_model TEXT_DIM), random weights. A short
    prompt encodes to (1, 256, TEXT_DIM) (Flux's T5 pads to 256 tokens) with a (1, POOLED_DIM) pooled output."""
    clip_l = {**TINY_CLIP_TEXT_CONFIG, "hidden_size": POOLED_DIM}
    model_config = comfy.supported_models.Flux(tiny_flux_config())
    return _clip(model_config, {"clip_l_model_config": clip_l, "t5xxl_model_config": TINY_T5_CONFIG}, seed)


def tiny_flux_vae(seed: int = 0) -> comfy.sd.VAE:
    """A VAE of Flux's latent (16 channels, 8x downscale): ComfyUI's KL autoencoder, as narrow as random_models'
    SD VAE. (ComfyUI detects ae.safetensors as the full-size 16-channel autoencoder, 84M parameters and
    seconds per 64 px decode on one CPU core: too slow for tests that decode every run.)"""
    vae = _vae({**TINY_VAE_DDCONFIG, "z_channels": 16}, seed)
    vae.latent_channels = 16  # what detection reads from the state dict; the config path keeps SD's 4
    return vae


def tiny_flux_models(seed: int = 0) -> RandomModels:
    """The three files of a Flux.1 dev setup (diffusion model, text encoders, VAE), tiny and random."""
    return RandomModels(model=tiny_flux(seed), clip=tiny_flux_clip(seed), vae=tiny_flux_vae(seed))
