"""The files of an SD3.5 Large, a Qwen-Image and a Z-Image Turbo setup, tiny and random, for the example
workflows' test: the diffusion model of scripts/random_dits.py, a text encoder of ComfyUI's own classes with the
real tokenizers (shrunk, random weights) and a VAE of the family's latent, built as ComfyUI builds them from the
files.

- SD3.5 Large (sd3.5_large_fp8_scaled.safetensors, one checkpoint with its text encoders): ComfyUI's SD3
  text encoder (comfy.text_encoders.sd3_clip) with CLIP-L and CLIP-G, no T5. SD3ClipModel pads the CLIPs'
  output to T5-XXL's width, 4096, whatever their own width (hard-coded), and concatenates T5's tokens after
  them, so a T5 in this encoder would have to be 4096 wide: a 130M-parameter token embedding. Without T5 the
  text is CLIP-L's and CLIP-G's 77 tokens, 4096 wide as on the real model, and the tiny MMDiT's context
  embedder takes 4096 (its pooled vector is CLIP-L's width plus CLIP-G's projection, POOLED_DIM).
- Qwen-Image (CLIPLoader type qwen_image, qwen_2.5_vl_7b_fp8_scaled.safetensors): ComfyUI's Qwen-Image text
  encoder (comfy.text_encoders.qwen_image: the chat template, the system prompt dropped from the output) on a
  Qwen2.5-VL language model of hidden TEXT_DIM (3584 on the real one), its vision tower (which only images in
  the prompt use, as Qwen-Image Edit's) shrunk to one narrow layer instead of 32 of width 1280.
- Z-Image Turbo (CLIPLoader type lumina2, qwen_3_4b.safetensors): ComfyUI's Z-Image text encoder
  (comfy.text_encoders.z_image: the Qwen3 tokenizer and chat template, no padding, the second-to-last hidden
  layer) on a Qwen3-4B of hidden TEXT_DIM (2560 on the real one), the tiny Z-Image's caption width.
- VAEs: a KL autoencoder of 16 channels for SD3.5 and Z-Image (random_dits.tiny_flux_vae: SD3's VAE and
  Z-Image's ae.safetensors have Flux's shape) and a Wan 2.1 VAE of width 8 for Qwen-Image
  (qwen_image_vae.safetensors is one, width 96), loaded from its state dict as VAELoader loads the file: ComfyUI
  detects it and gives 5-D latents (batch, 16, frames, h, w).
"""

from contextlib import contextmanager

import torch

import comfy.ldm.wan.vae
import comfy.sd
import comfy.supported_models_base
import comfy.text_encoders.qwen_image
import comfy.text_encoders.qwen_vl
import comfy.text_encoders.sd3_clip
import comfy.text_encoders.z_image
import random_dits
from random_models import TINY_CLIP_TEXT_CONFIG, RandomModels, randomize_parameters

SD3_CONTEXT_WIDTH = 4096  # SD3ClipModel pads the CLIPs' output to T5-XXL's width
TINY_SD3_CLIP_L = {**TINY_CLIP_TEXT_CONFIG, "hidden_size": random_dits.POOLED_DIM // 2}
TINY_SD3_CLIP_G = {**TINY_CLIP_TEXT_CONFIG, "hidden_size": random_dits.POOLED_DIM // 2,
                   "projection_dim": random_dits.POOLED_DIM // 2}
# Qwen2.5-VL 7B's language model, shrunk (the head width, 128, and the rotary sections stay: class attributes)
TINY_QWEN25_CONFIG = {"hidden_size": random_dits.TEXT_DIM, "intermediate_size": 64, "num_hidden_layers": 2,
                      "num_attention_heads": 2, "num_key_value_heads": 1}
TINY_QWEN_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "num_layers": 1}
TINY_WAN_VAE_DIM = 8
# Qwen3-4B, shrunk (the head width, 128, stays: a class attribute); 3 layers, as Z-Image reads the second-to-last
TINY_QWEN3_CONFIG = {"hidden_size": random_dits.TEXT_DIM, "intermediate_size": 64, "num_hidden_layers": 3,
                     "num_attention_heads": 2, "num_key_value_heads": 1}


def tiny_sd35_large(seed: int = 0):
    """A tiny SD3.5 Large: SD3's MMDiT with QK RMSNorm and no second attention (2 blocks of 2 heads), its
    context embedder taking the SD3 text encoder's 4096-wide tokens."""
    hidden = 64 * 2
    embedder = {"target": "torch.nn.Linear", "params": {"in_features": SD3_CONTEXT_WIDTH, "out_features": hidden}}
    return random_dits.tiny_sd3(seed, qk_norm="rms", context_embedder_config=embedder)


def tiny_sd3_clip(seed: int = 0) -> comfy.sd.CLIP:
    """The text encoder in an SD3.5 checkpoint as ComfyUI builds it (SD3Tokenizer, sd3_clip), with CLIP-L and
    CLIP-G shrunk and without T5 (see the module's docstring): a prompt encodes to (1, 77, 4096) with a
    (1, POOLED_DIM) pooled output."""
    target = comfy.supported_models_base.ClipTarget(comfy.text_encoders.sd3_clip.SD3Tokenizer,
                                                     comfy.text_encoders.sd3_clip.sd3_clip(clip_l=True, clip_g=True,
                                                                                           t5=False))
    clip = comfy.sd.CLIP(target=target, model_options={"clip_l_model_config": TINY_SD3_CLIP_L,
                                                        "clip_g_model_config": TINY_SD3_CLIP_G, "dtype": torch.float32})
    randomize_parameters(clip.cond_stage_model, seed + 1)
    return clip


def tiny_sd35_models(seed: int = 0) -> RandomModels:
    """What Load Checkpoint gives for sd3.5_large_fp8_scaled.safetensors, tiny and random."""
    return RandomModels(model=tiny_sd35_large(seed), clip=tiny_sd3_clip(seed), vae=random_dits.tiny_flux_vae(seed))


@contextmanager
def _tiny_vision_tower():
    """Qwen2.5-VL's vision tower, built while this is open, one narrow layer deep (Qwen25_7BVLI builds it
    with a fixed width of 1280 and 32 layers: 670M parameters)."""
    full = comfy.text_encoders.qwen_vl.Qwen2VLVisionTransformer
    comfy.text_encoders.qwen_vl.Qwen2VLVisionTransformer = lambda **kwargs: full(**{**kwargs, **TINY_QWEN_VISION})
    try:
        yield
    finally:
        comfy.text_encoders.qwen_vl.Qwen2VLVisionTransformer = full


def tiny_qwen_image_clip(seed: int = 0) -> comfy.sd.CLIP:
    """Qwen-Image's text encoder as CLIPLoader (type qwen_image) builds it (QwenImageTokenizer, qwen_image.te),
    the language model TINY_QWEN25_CONFIG: a prompt encodes to (1, tokens, TEXT_DIM), the template's system
    prompt left out as on the real one."""
    target = comfy.supported_models_base.ClipTarget(comfy.text_encoders.qwen_image.QwenImageTokenizer,
                                                     comfy.text_encoders.qwen_image.te())
    with _tiny_vision_tower():
        clip = comfy.sd.CLIP(target=target, model_options={"qwen25_7b_model_config": TINY_QWEN25_CONFIG,
                                                            "dtype": torch.float32})
    randomize_parameters(clip.cond_stage_model, seed + 1)
    _unit_norms(clip.cond_stage_model)
    return clip


def _unit_norms(module: torch.nn.Module) -> None:
    """RMSNorm scales at 1, as initialised (randomize_parameters draws them from N(0, 0.02), which scales each
    normalised activation down 50-fold: a text encoder's layers would barely act, a VAE's output be flat)."""
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if name.endswith(("norm.weight", "layernorm.weight", ".gamma")):
                parameter.fill_(1.0)


def tiny_wan21_vae(seed: int = 0) -> comfy.sd.VAE:
    """A Wan 2.1 VAE (Qwen-Image's: 16 channels, 8x downscale, causal 3-D convolutions) of width
    TINY_WAN_VAE_DIM, loaded from its state dict as VAELoader loads a file (ComfyUI detects the family and reads
    the width from the weights)."""
    autoencoder = comfy.ldm.wan.vae.WanVAE(dim=TINY_WAN_VAE_DIM, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                                           attn_scales=[], temperal_downsample=[False, True, True], dropout=0.0)
    randomize_parameters(autoencoder, seed + 2)
    _unit_norms(autoencoder)
    return comfy.sd.VAE(sd=autoencoder.state_dict(), dtype=torch.float32)


def tiny_qwen_image_models(seed: int = 0) -> RandomModels:
    """The three files of a Qwen-Image setup (diffusion model, text encoder, VAE), tiny and random."""
    return RandomModels(model=random_dits.tiny_qwen_image(seed), clip=tiny_qwen_image_clip(seed),
                        vae=tiny_wan21_vae(seed))


def tiny_z_image_clip(seed: int = 0) -> comfy.sd.CLIP:
    """Z-Image's text encoder as CLIPLoader builds it from qwen_3_4b.safetensors (ZImageTokenizer, z_image.te),
    the language model TINY_QWEN3_CONFIG: a prompt encodes to (1, tokens, TEXT_DIM), its own token count (the
    chat template around it, no padding)."""
    target = comfy.supported_models_base.ClipTarget(comfy.text_encoders.z_image.ZImageTokenizer,
                                                     comfy.text_encoders.z_image.te())
    clip = comfy.sd.CLIP(target=target, model_options={"qwen3_4b_model_config": TINY_QWEN3_CONFIG,
                                                        "dtype": torch.float32})
    randomize_parameters(clip.cond_stage_model, seed + 1)
    _unit_norms(clip.cond_stage_model)
    return clip


def tiny_z_image_models(seed: int = 0) -> RandomModels:
    """The three files of a Z-Image Turbo setup (z_image_turbo_bf16, qwen_3_4b, ae), tiny and random."""
    return RandomModels(model=random_dits.tiny_z_image(seed), clip=tiny_z_image_clip(seed),
                        vae=random_dits.tiny_flux_vae(seed))
