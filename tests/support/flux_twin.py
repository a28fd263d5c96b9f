"""A diffusers FluxTransformer2DModel with the same weights as a ComfyUI Flux ModelPatcher, run the way
ComfyUI's Flux runs: the diffusers twin of scripts/random_dits.py's tiny_flux for the Flux parity tests.

What each side does with its inputs (float32, CPU):
- timestep: ComfyUI's diffusion_model receives model_sampling.timestep(sigma) = sigma (ModelSamplingFlux) and
  multiplies it by 1000 inside timestep_embedding; FluxTransformer2DModel multiplies by 1000 in its forward
  (FluxPipeline passes t / 1000 = sigma). So both take sigma as it is. The guidance (3.5) the same way: both
  embed 1000 * guidance.
- patches: both pack 2x2 patches channel-major, "b c (h ph) (w pw) -> b (h w) (c ph pw)"; ComfyUI pads a
  side not divisible by 2 circularly and crops the output, which twin_denoise does too.
- positions: img_ids (0, row, col) per token and txt_ids all zero in both; the joint sequence is text first.
  diffusers takes 2-D ids (a 3-D batch of them is deprecated and only row 0 is used).
- RoPE: both rotate interleaved pairs (x[2i], x[2i+1]) with the axes (4, 14, 14) concatenated.
- the final AdaLN is (shift, scale) in ComfyUI and (scale, shift) in diffusers (comfy.utils.swap_scale_shift).
"""

import torch
from diffusers import FluxTransformer2DModel

import comfy.utils


@torch.no_grad()
def sharpen_attention(model_patcher, seed: int = 0, low: float = 1.0, high: float = 2.5):
    """Redraw the QK-RMSNorm scales of a (fresh, tiny) ComfyUI Flux in place, uniform in [low, high].

    randomize_parameters draws them from N(0, 0.02) (ComfyUI's RMSNorm has no reset_parameters), which makes
    every attention almost uniform: then RoPE, positions and anything else that moves the scores barely move
    the output (a transposed RoPE layout changed it by ~1e-6). Real checkpoints have scales near 1 or above."""
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in model_patcher.model.diffusion_model.named_parameters():
        if name.endswith(("query_norm.scale", "key_norm.scale")):
            parameter.copy_(torch.rand(parameter.shape, generator=generator) * (high - low) + low)
    return model_patcher


def _diffusers_config(unet_config: dict) -> dict:
    patch = unet_config["patch_size"]
    heads, hidden = unet_config["num_heads"], unet_config["hidden_size"]
    if unet_config.get("theta", 10000) != 10000 or unet_config.get("mlp_ratio", 4.0) != 4.0:
        raise ValueError("diffusers' Flux fixes theta 10000 and mlp_ratio 4")
    if not unet_config.get("qkv_bias", True):
        raise ValueError("diffusers' Flux has qkv biases")
    return {
        "patch_size": 1,  # diffusers takes tokens already packed: in_channels is channels * patch ** 2
        "in_channels": unet_config["in_channels"] * patch * patch,
        "out_channels": unet_config["out_channels"] * patch * patch,
        "num_layers": unet_config["depth"],
        "num_single_layers": unet_config["depth_single_blocks"],
        "attention_head_dim": hidden // heads,
        "num_attention_heads": heads,
        "joint_attention_dim": unet_config["context_in_dim"],
        "pooled_projection_dim": unet_config["vec_in_dim"],
        "guidance_embeds": unet_config["guidance_embed"],
        "axes_dims_rope": tuple(unet_config["axes_dim"]),
    }


def twin_from_comfy(model_patcher) -> FluxTransformer2DModel:
    """The diffusers twin of a ComfyUI Flux ModelPatcher (its diffusion model's own weights, without patches),
    float32, eval mode, with every weight mapped through comfy.utils.flux_to_diffusers (checked both ways)."""
    base = model_patcher.model
    unet_config = base.model_config.unet_config
    comfy_state = {k: v.detach().to("cpu", torch.float32).clone() for k, v in base.diffusion_model.state_dict().items()}
    twin = FluxTransformer2DModel(**_diffusers_config(unet_config)).eval()
    mapping = comfy.utils.flux_to_diffusers(unet_config, output_prefix="")
    state, used = {}, set()
    for key in twin.state_dict():
        target = mapping[key]  # a KeyError here is a diffusers weight ComfyUI's map does not know
        if isinstance(target, str):
            comfy_key, value = target, comfy_state[target]
        elif target[1] is not None:  # (fused comfy key, (dim, start, length))
            comfy_key, (dim, start, length) = target
            value = comfy_state[comfy_key].narrow(dim, start, length)
        else:  # (comfy key, None, conversion)
            comfy_key, value = target[0], target[2](comfy_state[target[0]])
        state[key] = value.clone()
        used.add(comfy_key)
    unmapped = set(comfy_state) - used
    if unmapped:
        raise ValueError(f"ComfyUI weights without a diffusers twin: {sorted(unmapped)}")
    twin.load_state_dict(state, strict=True)
    return twin


def pack(x: torch.Tensor, patch: int = 2) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, C p p), as FluxPipeline._pack_latents (and ComfyUI's process_img)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // patch) * (w // patch), c * patch * patch)


def unpack(tokens: torch.Tensor, rows: int, cols: int, patch: int = 2) -> torch.Tensor:
    b, _, channels = tokens.shape
    c = channels // (patch * patch)
    x = tokens.reshape(b, rows, cols, c, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, rows * patch, cols * patch)


def image_ids(rows: int, cols: int, w_offset: float = 0.0) -> torch.Tensor:
    """(rows * cols, 3): (0, row, col + w_offset) per token, row-major (FluxPipeline._prepare_latent_image_ids)."""
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] = torch.arange(rows, dtype=torch.float32)[:, None]
    ids[..., 2] = torch.arange(cols, dtype=torch.float32)[None, :] + w_offset
    return ids.reshape(rows * cols, 3)


def _per_row(value, batch: int) -> torch.Tensor:
    value = torch.as_tensor(value, dtype=torch.float32)
    return value.reshape(-1).expand(batch) if value.numel() == 1 else value.reshape(batch)


@torch.no_grad()
def twin_denoise(twin: FluxTransformer2DModel, x: torch.Tensor, timestep, context: torch.Tensor,
                 y: torch.Tensor, guidance=None, patch: int = 2) -> torch.Tensor:
    """What ComfyUI's diffusion_model(x, timestep, context, y, guidance) returns, computed by the twin: x is the
    (B, C, H, W) latent as the model receives it (ModelSamplingFlux: not rescaled), timestep sigma (a number
    or (B,)), context (B, T, text dim), y (B, pooled dim), guidance a number, (B,) or None; -> (B, C, H, W)."""
    batch, _, height, width = x.shape
    pad_h, pad_w = (-height) % patch, (-width) % patch
    if pad_h or pad_w:  # ComfyUI's pad_to_patch_size
        x = torch.nn.functional.pad(x, (0, pad_w, 0, pad_h), mode="circular")
    rows, cols = x.shape[-2] // patch, x.shape[-1] // patch
    out = twin(
        hidden_states=pack(x.float(), patch),
        encoder_hidden_states=context.float(),
        pooled_projections=y.float(),
        timestep=_per_row(timestep, batch),
        img_ids=image_ids(rows, cols),
        txt_ids=torch.zeros(context.shape[1], 3),
        guidance=None if guidance is None else _per_row(guidance, batch),
        return_dict=False,
    )[0]
    return unpack(out, rows, cols, patch)[:, :, :height, :width]


def twin_denoised(twin: FluxTransformer2DModel, x: torch.Tensor, sigma, context: torch.Tensor, y: torch.Tensor,
                  guidance=None) -> torch.Tensor:
    """The x0 ComfyUI's Flux model gives at sigma (CONST: x - sigma * velocity; model timestep = sigma)."""
    velocity = twin_denoise(twin, x, sigma, context, y, guidance)
    return x - _per_row(sigma, x.shape[0]).view(-1, 1, 1, 1) * velocity
