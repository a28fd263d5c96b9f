"""Random-weight SD1.5- and SDXL-shaped models built inside the real ComfyUI.

No model weights can be downloaded where this project is built and tested, so tests (and the demo's
stand-in checkpoint) use models of the right architecture with random weights, deterministic under
a seed. Import this only after ComfyUI's folder is on sys.path.
"""

import copy
import json
from dataclasses import dataclass

import torch

import comfy.clip_vision
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.supported_models
import comfy.utils
from comfy.ldm.models.autoencoder import AutoencoderKL

_TINY_UNET_COMMON = {
    "use_checkpoint": False,
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 32,  # GroupNorm uses 32 groups: the narrowest possible
    "num_res_blocks": [1, 1, 1],
    "channel_mult": [1, 2, 2],
    "use_spatial_transformer": True,
    "legacy": False,
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}

TINY_SD15_UNET = {
    **_TINY_UNET_COMMON,
    # SD1.5's pattern: attention at every level but the lowest resolution.
    "transformer_depth": [1, 1, 0],
    "transformer_depth_middle": 1,
    "transformer_depth_output": [1, 1, 1, 1, 0, 0],
    "context_dim": 32,
    "use_linear_in_transformer": False,
    "adm_in_channels": None,
}

TINY_SDXL_UNET = {
    **_TINY_UNET_COMMON,
    # SDXL's pattern: no attention at full resolution, deeper transformers lower down.
    "transformer_depth": [0, 2, 3],
    "transformer_depth_middle": 3,  # as deep as the lowest level, like SDXL (and diffusers' mid block)
    "transformer_depth_output": [0, 0, 2, 2, 3, 3],
    "num_classes": "sequential",
    "context_dim": 64,  # CLIP-L hidden + CLIP-G hidden
    "use_linear_in_transformer": True,
    "adm_in_channels": 32 + 6 * 256,  # CLIP-G pooled + six 256-d size embeddings
}

# The unet_configs ComfyUI 0.3.75 detects for real SD1.5 and SDXL checkpoints (comfy/model_detection.py),
# for full-size models with random weights (benchmarks) or on the meta device (layer maps).
_FULL_UNET_COMMON = {
    "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "model_channels": 320, "use_temporal_attention": False, "use_temporal_resblock": False,
}
FULL_SD15_UNET = {
    **_FULL_UNET_COMMON, "adm_in_channels": None, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
}
FULL_SDXL_UNET = {
    **_FULL_UNET_COMMON, "num_classes": "sequential", "adm_in_channels": 2816, "num_res_blocks": [2, 2, 2],
    "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4], "transformer_depth_middle": 10,
    "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
}

TINY_CLIP_TEXT_CONFIG = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,  # SDXL reads the penultimate layer of CLIP-L
    "num_attention_heads": 2,
    "projection_dim": 32,
}

TINY_VAE_DDCONFIG = {
    "double_z": True,
    "z_channels": 4,
    "resolution": 256,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 32,  # GroupNorm uses 32 groups: the narrowest possible
    "ch_mult": [1, 1, 1, 1],  # four levels keep the usual 8x downscale
    "num_res_blocks": 1,
    "attn_resolutions": [],
    "dropout": 0.0,
}

# The smallest UNet that CheckpointLoaderSimple still detects as SD1.5 (it keys on
# model_channels 320 and context_dim 768): two levels with attention at both.
DEMO_SD15_UNET = {
    **TINY_SD15_UNET,
    "model_channels": 320,
    "num_res_blocks": [1, 1],
    "channel_mult": [1, 1],
    "transformer_depth": [1, 1],
    "transformer_depth_output": [1, 1, 1, 1],
    "context_dim": 768,
}


class TinySDXL(comfy.supported_models.SDXL):
    """SDXL with 16-channel attention heads (SDXL's 64 would leave these narrow layers a single head)."""

    unet_extra_config = {"num_heads": -1, "num_head_channels": 16}


class TinySD15VPrediction(comfy.supported_models.SD15):
    """SD1.5-shaped, predicting v (as SD2.x 768-v models do)."""

    def model_type(self, state_dict, prefix=""):
        return comfy.model_base.ModelType.V_PREDICTION


def randomize_parameters(module: torch.nn.Module, seed: int) -> None:
    """Give every parameter random values of torch.nn's default scale.

    comfy.ops layers skip initialisation (their reset_parameters does nothing), so torch.nn's own
    reset_parameters is called on each; anything no layer owns is drawn from N(0, 0.02).
    """
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        initialised = set()
        for submodule in module.modules():
            for cls in type(submodule).__mro__:
                if cls.__module__.startswith("torch.nn") and "reset_parameters" in cls.__dict__:
                    cls.reset_parameters(submodule)
                    initialised.update(id(p) for p in submodule.parameters(recurse=False))
                    break
        for parameter in module.parameters():
            if id(parameter) not in initialised:
                with torch.no_grad():
                    parameter.normal_(0.0, 0.02)
    finally:
        torch.random.set_rng_state(generator_state)


@dataclass
class RandomModels:
    model: comfy.model_patcher.ModelPatcher
    clip: comfy.sd.CLIP
    vae: comfy.sd.VAE


def model_patcher(model_config, seed: int, dtype: torch.dtype = torch.float32,
                  manual_cast_dtype: torch.dtype | None = None) -> comfy.model_patcher.ModelPatcher:
    """The UNet with random weights stored in dtype, as ComfyUI loads a checkpoint in that dtype (with
    manual_cast_dtype: weights cast per layer to it, as for fp8 weights). The same seed gives the same
    weights in every dtype: they are drawn in float32 and rounded."""
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    randomize_parameters(model.diffusion_model, seed)
    if dtype != torch.float32 or manual_cast_dtype is not None:
        weights = model.diffusion_model.state_dict()
        model_config.set_inference_dtype(dtype, manual_cast_dtype)
        model = model_config.get_model({})
        model.diffusion_model.load_state_dict(weights)
    model.diffusion_model.eval()
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=comfy.model_management.unet_offload_device())


def _clip(model_config, text_config_overrides: dict, seed: int) -> comfy.sd.CLIP:
    clip = comfy.sd.CLIP(
        target=model_config.clip_target(),
        model_options={**text_config_overrides, "dtype": torch.float32},
    )
    randomize_parameters(clip.cond_stage_model, seed + 1)
    return clip


def _vae(ddconfig: dict, seed: int) -> comfy.sd.VAE:
    autoencoder = AutoencoderKL(ddconfig=ddconfig, embed_dim=ddconfig["z_channels"])
    randomize_parameters(autoencoder, seed + 2)
    return comfy.sd.VAE(
        sd=autoencoder.state_dict(),
        config={"params": {"ddconfig": ddconfig, "embed_dim": ddconfig["z_channels"]}},
        dtype=torch.float32,
    )


def tiny_sd15(seed: int = 0, unet_config: dict | None = None, v_prediction: bool = False,
              dtype: torch.dtype = torch.float32, manual_cast_dtype: torch.dtype | None = None) -> RandomModels:
    config_class = TinySD15VPrediction if v_prediction else comfy.supported_models.SD15
    model_config = config_class(copy.deepcopy(unet_config or TINY_SD15_UNET))
    return RandomModels(
        model=model_patcher(model_config, seed, dtype, manual_cast_dtype),
        clip=_clip(model_config, {"clip_l_model_config": TINY_CLIP_TEXT_CONFIG}, seed),
        vae=_vae(TINY_VAE_DDCONFIG, seed),
    )


def tiny_sdxl(seed: int = 0, unet_config: dict | None = None, dtype: torch.dtype = torch.float32,
              manual_cast_dtype: torch.dtype | None = None) -> RandomModels:
    model_config = TinySDXL(copy.deepcopy(unet_config or TINY_SDXL_UNET))
    text_overrides = {"clip_l_model_config": TINY_CLIP_TEXT_CONFIG, "clip_g_model_config": TINY_CLIP_TEXT_CONFIG}
    return RandomModels(
        model=model_patcher(model_config, seed, dtype, manual_cast_dtype),
        clip=_clip(model_config, text_overrides, seed),
        vae=_vae(TINY_VAE_DDCONFIG, seed),
    )


def save_demo_sd15_checkpoint(path: str, seed: int = 0) -> None:
    """Write a random-weight checkpoint that CheckpointLoaderSimple detects as SD1.5.

    Full CLIP-L and the standard SD VAE (their shapes are what detection expects), a two-level
    UNet, all in fp16. It makes noise, not pictures.
    """
    model_config = comfy.supported_models.SD15(copy.deepcopy(DEMO_SD15_UNET))
    model = model_patcher(model_config, seed)
    clip = _clip(model_config, {}, seed)
    default_vae_ddconfig = {**TINY_VAE_DDCONFIG, "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2}
    vae = _vae(default_vae_ddconfig, seed)
    state_dict = model.model.state_dict_for_saving(clip.get_sd(), vae.get_sd(), None)
    state_dict = {key: value.to(torch.float16) if value.is_floating_point() else value for key, value in state_dict.items()}
    comfy.utils.save_torch_file(state_dict, path, metadata={"style_attention_nodes": "random weights, not a model"})


def tiny_controlnet(unet_config: dict, seed: int = 0):
    """A ControlNet with random weights matching a tiny UNet (an image hint, 8x the latent size)."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.ops

    unused = ("out_channels", "use_temporal_attention", "use_temporal_resblock", "dtype")
    config = {key: value for key, value in unet_config.items() if key not in unused}
    control_model = comfy.cldm.cldm.ControlNet(hint_channels=3, device="cpu", dtype=torch.float32,
                                               operations=comfy.ops.disable_weight_init, **config)
    randomize_parameters(control_model, seed + 3)
    return comfy.controlnet.ControlNet(control_model, load_device=comfy.model_management.get_torch_device(),
                                       manual_cast_dtype=None)


def tiny_clip_vision(path, projection_dim: int = 32, seed: int = 3, hidden_size: int = 32):
    """A CLIP vision model of ComfyUI's own class from a small config written to path (a .json), random
    weights: 32 px images in 16 px patches, so 5 tokens of hidden_size."""
    config = {"hidden_act": "quick_gelu", "hidden_size": hidden_size, "image_size": 32, "intermediate_size": 64,
              "layer_norm_eps": 1e-05, "model_type": "clip_vision_model", "num_attention_heads": 2,
              "num_channels": 3, "num_hidden_layers": 2, "patch_size": 16, "projection_dim": projection_dim}
    path.write_text(json.dumps(config))
    vision = comfy.clip_vision.ClipVisionModel(str(path))
    randomize_parameters(vision.model, seed)
    return vision
