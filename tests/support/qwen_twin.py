"""A diffusers QwenImageTransformer2DModel with the same weights as a ComfyUI Qwen-Image ModelPatcher, run the
way ComfyUI's Qwen-Image runs: the diffusers twin of scripts/random_dits.py's tiny_qwen_image for the parity tests.

What each side does with its inputs (float32, CPU):
- weights: the state dict keys and shapes are the same on both sides (no conversion).
- timestep: ComfyUI's diffusion_model receives model_sampling.timestep(sigma) = sigma (ModelSamplingFlux) and
  both time projections multiply by 1000 (QwenImagePipeline passes t / 1000 = sigma). Both take sigma.
- latents: ComfyUI's are 5-D (batch, 16, frames = 1, height, width); a side not divisible by 2 is padded
  circularly and the output cropped. Both pack 2x2 patches channel-major, "b c t (h 2) (w 2) -> b (t h w) (c 2 2)".
- text mask: neither applies one (ComfyUI's Attention never receives encoder_hidden_states_mask).
- positions (frame, row, column) per token, RoPE on interleaved pairs with the axes (4, 14, 14) concatenated:
  ComfyUI centres the image on 0, rows r - rows // 2 and columns c - cols // 2, frame 0; its reference latents
  (the edit model's, "index" method) frame 1, 2, ... each centred alike; the text at txt_start + i on all three
  axes, txt_start = max(rows // 2, cols // 2) of the image alone. diffusers' QwenEmbedRope (scale_rope) places
  rows at -(rows - rows // 2) .. rows // 2 - 1: the same when the token grid is even, one lower when it is odd
  (a 10-wide latent: 5 columns, -3..1 instead of ComfyUI's -2..2); and its txt_start takes the max over the
  reference latents too. So the twin's pos_embed is ComfyPositions: diffusers' own frequency tables (rope_params)
  read at ComfyUI's positions (positions="diffusers" keeps diffusers' QwenEmbedRope, for the tests that show the
  difference).
"""

import functools

import torch
from diffusers import QwenImageTransformer2DModel

from random_dits import TEXT_DIM, tiny_qwen_image

CONFIG_KEYS = ("patch_size", "in_channels", "out_channels", "num_layers", "attention_head_dim", "num_attention_heads",
               "joint_attention_dim", "axes_dims_rope")  # the same names and defaults on both sides


def image_ids(rows: int, cols: int, frame: int = 0, w_offset: int = 0) -> torch.Tensor:
    """(rows * cols, 3) float: (frame, row - rows // 2, col - cols // 2 + w_offset) per token, row-major, as
    ComfyUI's process_img places an image (w_offset shifts the width axis)."""
    row = torch.arange(rows, dtype=torch.float32).repeat_interleave(cols) - rows // 2
    col = torch.arange(cols, dtype=torch.float32).repeat(rows) - cols // 2 + w_offset
    return torch.stack([torch.full_like(row, frame), row, col], -1)


def text_ids(rows: int, cols: int, tokens: int) -> torch.Tensor:
    """(tokens, 3): txt_start + i on every axis, txt_start = max(rows // 2, cols // 2) of the (first) image."""
    start = max(rows // 2, cols // 2)
    return torch.arange(start, start + tokens, dtype=torch.float32)[:, None].expand(-1, 3).clone()


class ComfyPositions(torch.nn.Module):
    """The twin's pos_embed: (image freqs, text freqs) as diffusers' QwenEmbedRope returns them (complex,
    (tokens, head dim / 2)), from its own rope_params, at ComfyUI's positions. img_shapes[0] lists
    (frames, rows, cols) of the image then of each reference latent (frames 1, 2, ... as ComfyUI's "index")."""

    def __init__(self, rope):
        super().__init__()
        self.rope = rope

    def freqs(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.rope.rope_params(ids[:, axis], dim, self.rope.theta)
                          for axis, dim in enumerate(self.rope.axes_dim)], 1)

    def forward(self, img_shapes, txt_seq_lens, device=None):
        shapes = img_shapes[0]
        if any(frames != 1 for frames, _, _ in shapes):
            raise ValueError("one frame per latent")
        ids = torch.cat([image_ids(rows, cols, frame=i) for i, (_, rows, cols) in enumerate(shapes)])
        text = text_ids(shapes[0][1], shapes[0][2], max(txt_seq_lens))
        return self.freqs(ids).to(device), self.freqs(text).to(device)


def _diffusers_config(unet_config: dict) -> dict:
    if unet_config.get("use_additional_t_cond") or not unet_config.get("final_layer", True):
        raise ValueError("diffusers' QwenImageTransformer2DModel has no additional t cond and always a final layer")
    if unet_config.get("default_ref_method", "index") != "index":
        raise ValueError("the twin places reference latents by ComfyUI's 'index' method only")
    config = {key: unet_config[key] for key in CONFIG_KEYS if key in unet_config}
    if "axes_dims_rope" in config:
        config["axes_dims_rope"] = tuple(config["axes_dims_rope"])
    return config


def twin_from_comfy(model_patcher, positions: str = "comfy") -> QwenImageTransformer2DModel:
    """The diffusers twin of a ComfyUI Qwen-Image ModelPatcher (its diffusion model's own weights, without
    patches), float32, eval mode; positions "comfy" (ComfyPositions) or "diffusers" (its QwenEmbedRope)."""
    base = model_patcher.model
    comfy_state = {k: v.detach().to("cpu", torch.float32).clone() for k, v in base.diffusion_model.state_dict().items()}
    twin = QwenImageTransformer2DModel(**_diffusers_config(base.model_config.unet_config)).eval()
    if set(twin.state_dict()) != set(comfy_state):
        raise ValueError(f"key names differ: {sorted(set(twin.state_dict()) ^ set(comfy_state))}")
    twin.load_state_dict(comfy_state, strict=True)
    if positions == "comfy":
        twin.pos_embed = ComfyPositions(twin.pos_embed)
    elif positions != "diffusers":
        raise ValueError(positions)
    return twin


def pack(x: torch.Tensor, patch: int = 2) -> torch.Tensor:
    """(B, C, 1, H, W), H and W even -> (B, H/p * W/p, C p p), as ComfyUI's process_img."""
    b, c, t, h, w = x.shape
    x = x.reshape(b, c, t, h // patch, patch, w // patch, patch).permute(0, 2, 3, 5, 1, 4, 6)
    return x.reshape(b, t * (h // patch) * (w // patch), c * patch * patch)


def unpack(tokens: torch.Tensor, rows: int, cols: int, patch: int = 2) -> torch.Tensor:
    b, _, channels = tokens.shape
    c = channels // (patch * patch)
    x = tokens.reshape(b, 1, rows, cols, c, patch, patch).permute(0, 4, 1, 2, 5, 3, 6)
    return x.reshape(b, c, 1, rows * patch, cols * patch)


def padded(x: torch.Tensor, patch: int = 2) -> torch.Tensor:
    """ComfyUI's pad_to_patch_size: each side up to a multiple of patch, circularly."""
    pad_h, pad_w = (-x.shape[-2]) % patch, (-x.shape[-1]) % patch
    return torch.nn.functional.pad(x, (0, pad_w, 0, pad_h, 0, 0), mode="circular") if pad_h or pad_w else x


def _per_row(value, batch: int) -> torch.Tensor:
    value = torch.as_tensor(value, dtype=torch.float32)
    return value.reshape(-1).expand(batch) if value.numel() == 1 else value.reshape(batch)


@torch.no_grad()
def twin_denoise(twin: QwenImageTransformer2DModel, x: torch.Tensor, timestep, context: torch.Tensor,
                 ref_latents=None, patch: int = 2) -> torch.Tensor:
    """What ComfyUI's diffusion_model(x, timestep, context, ref_latents=...) returns, computed by the twin: x the
    (B, 16, 1, H, W) latent as the model receives it (not rescaled), timestep sigma (a number or (B,)), context
    (B, T, text dim), ref_latents None or a list of (1 or B, 16, 1, h, w) latents (the edit model's, appended
    after the image rows); -> (B, 16, 1, H, W). A 4-D x is taken as one frame and answered 4-D."""
    if x.ndim == 4:
        return twin_denoise(twin, x[:, :, None], timestep, context, ref_latents, patch)[:, :, 0]
    batch, height, width = x.shape[0], x.shape[-2], x.shape[-1]
    tokens = [pack(padded(x.float(), patch), patch)]
    shapes = [(1, -(-height // patch), -(-width // patch))]
    for ref in ref_latents or []:
        tokens.append(pack(padded(ref.float(), patch), patch).expand(batch, -1, -1))
        shapes.append((1, -(-ref.shape[-2] // patch), -(-ref.shape[-1] // patch)))
    out = twin(hidden_states=torch.cat(tokens, 1), encoder_hidden_states=context.float(), timestep=_per_row(
        timestep, batch), img_shapes=[shapes] * batch, txt_seq_lens=[context.shape[1]] * batch, return_dict=False)[0]
    rows, cols = shapes[0][1:]
    return unpack(out[:, :rows * cols], rows, cols, patch)[..., :height, :width]


def twin_denoised(twin: QwenImageTransformer2DModel, x: torch.Tensor, sigma, context: torch.Tensor,
                  ref_latents=None) -> torch.Tensor:
    """The x0 ComfyUI's Qwen-Image gives at sigma (CONST: x - sigma * velocity; model timestep = sigma)."""
    velocity = twin_denoise(twin, x, sigma, context, ref_latents)
    return x - _per_row(sigma, x.shape[0]).view(-1, *[1] * (x.ndim - 1)) * velocity


# The shared inputs of the Qwen-Image twin and oracle tests
@functools.cache
def build(positions="comfy"):
    model = tiny_qwen_image(seed=4)
    return model, twin_from_comfy(model, positions)


def inputs(batch, height, width, tokens=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 16, 1, height, width, generator=g), torch.rand(batch, generator=g),
            torch.randn(batch, tokens, TEXT_DIM, generator=g))


def ref_latent(batch, height=6, width=10, seed=9):
    return torch.randn(1, 16, 1, height, width, generator=torch.Generator().manual_seed(seed)).expand(batch, -1, -1,
                                                                                                      -1, -1)
