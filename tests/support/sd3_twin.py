"""A diffusers SD3Transformer2DModel with the same weights as a ComfyUI SD3 / SD3.5 ModelPatcher, run the way
ComfyUI's MMDiT runs: the diffusers twin of scripts/random_dits.py's tiny_sd3 and tiny_sd35_medium for the SD3
parity tests.

What each side does with its inputs (float32, CPU):
- timestep: ComfyUI's diffusion_model receives model_sampling.timestep(sigma) = 1000 * sigma
  (ModelSamplingDiscreteFlow, multiplier 1000); SD3Transformer2DModel takes the same (StableDiffusion3Pipeline
  passes the scheduler's timesteps, 1000 * sigma). Both embed it as [cos, sin] of 256 frequencies.
- patches: both embed 2 x 2 patches with a strided conv, row-major tokens; ComfyUI's PatchEmbed pads a side not
  divisible by 2 circularly and its forward crops the output, which twin_denoise does too.
- positions: no RoPE; both add the centre crop of the same (pos_embed_max_size ** 2, hidden) pos_embed table
  (a buffer, mapped with the weights) to the image tokens before the blocks.
- the joint sequence is text first in ComfyUI, image first in diffusers' JointAttnProcessor2_0: without masks
  or positions inside the attention the order does not change the result.
- SD3.5 Medium's dual blocks: ComfyUI's x_block.attn2 is diffusers' transformer_blocks[i].attn2 (image-only
  self-attention on the same LayerNorm'd input, its own shift/scale/gate: SD35AdaLayerNormZeroX's 9 chunks).
- the last block's text side is pre-only (AdaLN of 2 chunks, no projection after the attention), and the
  AdaLNs of 2 chunks are (shift, scale) in ComfyUI and (scale, shift) in diffusers (comfy.utils.swap_scale_shift).
"""

import torch
from diffusers import SD3Transformer2DModel

import comfy.utils

SUPPORTED_QK_NORMS = {None: None, "rms": "rms_norm"}


def _diffusers_config(unet_config: dict) -> dict:
    depth = unet_config["depth"]
    if unet_config.get("num_blocks", depth) != depth or unet_config.get("register_length", 0) \
            or unet_config.get("context_processor_layers") is not None or unet_config.get("x_block_self_attn"):
        raise ValueError("diffusers' SD3 has depth blocks, no register tokens, no context processor, and attn2 "
                         "only in the listed x_block_self_attn_layers")
    if unet_config.get("qk_norm") not in SUPPORTED_QK_NORMS or unet_config.get("pos_embed_max_size") is None:
        raise ValueError("the twin takes SD3's QK norms (none, rms) and a pos_embed table")
    context = unet_config["context_embedder_config"]["params"]
    return {
        "sample_size": unet_config["pos_embed_max_size"] * unet_config["patch_size"],  # its table is overwritten
        "patch_size": unet_config["patch_size"],
        "in_channels": unet_config["in_channels"],
        "out_channels": unet_config.get("out_channels", unet_config["in_channels"]),
        "num_layers": depth,
        "attention_head_dim": 64,  # MMDiT: hidden 64 * depth, depth heads
        "num_attention_heads": depth,
        "joint_attention_dim": context["in_features"],
        "caption_projection_dim": context["out_features"],
        "pooled_projection_dim": unet_config["adm_in_channels"],
        "pos_embed_max_size": unet_config["pos_embed_max_size"],
        "dual_attention_layers": tuple(unet_config.get("x_block_self_attn_layers", [])),
        "qk_norm": SUPPORTED_QK_NORMS[unet_config.get("qk_norm")],
    }


def twin_from_comfy(model_patcher) -> SD3Transformer2DModel:
    """The diffusers twin of a ComfyUI SD3 ModelPatcher (its diffusion model's own weights, without patches),
    float32, eval mode, every weight mapped through comfy.utils.mmdit_to_diffusers (checked both ways)."""
    base = model_patcher.model
    unet_config = base.model_config.unet_config
    comfy_state = {k: v.detach().to("cpu", torch.float32).clone() for k, v in base.diffusion_model.state_dict().items()}
    twin = SD3Transformer2DModel(**_diffusers_config(unet_config)).eval()
    mapping = comfy.utils.mmdit_to_diffusers(unet_config, output_prefix="")
    state, used = {}, set()
    for key in twin.state_dict():
        target = mapping[key]  # a KeyError here is a diffusers weight ComfyUI's map does not know
        if isinstance(target, str):
            comfy_key, value = target, comfy_state[target]
        elif target[1] is not None:  # (fused qkv key, (dim, start, length))
            comfy_key, (dim, start, length) = target
            value = comfy_state[comfy_key].narrow(dim, start, length)
        else:  # (comfy key, None, conversion)
            comfy_key, value = target[0], target[2](comfy_state[target[0]].clone())
        state[key] = value.clone()
        used.add(comfy_key)
    unmapped = set(comfy_state) - used
    if unmapped:
        raise ValueError(f"ComfyUI weights without a diffusers twin: {sorted(unmapped)}")
    twin.load_state_dict(state, strict=True)
    return twin


def _per_row(value, batch: int) -> torch.Tensor:
    value = torch.as_tensor(value, dtype=torch.float32)
    return value.reshape(-1).expand(batch) if value.numel() == 1 else value.reshape(batch)


@torch.no_grad()
def twin_denoise(twin: SD3Transformer2DModel, x: torch.Tensor, timestep, context: torch.Tensor,
                 y: torch.Tensor) -> torch.Tensor:
    """What ComfyUI's diffusion_model(x, timestep, context, y) returns (the velocity), computed by the twin: x
    the (B, C, H, W) latent as the model receives it (CONST: not rescaled), timestep 1000 * sigma (a number or
    (B,)), context (B, T, text dim), y (B, pooled dim); -> (B, C, H, W)."""
    batch, _, height, width = x.shape
    patch = twin.config.patch_size
    pad_h, pad_w = (-height) % patch, (-width) % patch
    if pad_h or pad_w:  # ComfyUI's pad_to_patch_size
        x = torch.nn.functional.pad(x, (0, pad_w, 0, pad_h), mode="circular")
    out = twin(hidden_states=x.float(), encoder_hidden_states=context.float(), pooled_projections=y.float(),
               timestep=_per_row(timestep, batch), return_dict=False)[0]
    return out[:, :, :height, :width]


def twin_denoised(twin: SD3Transformer2DModel, x: torch.Tensor, sigma, context: torch.Tensor,
                  y: torch.Tensor) -> torch.Tensor:
    """The x0 ComfyUI's SD3 model gives at sigma (CONST: x - sigma * velocity; model timestep 1000 * sigma)."""
    sigma = _per_row(sigma, x.shape[0])
    return x - sigma.view(-1, 1, 1, 1) * twin_denoise(twin, x, sigma * 1000, context, y)
