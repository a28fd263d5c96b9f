"""One set of random weights, two implementations: a diffusers UNet2DConditionModel and ComfyUI's UNet.

The diffusers model is built from a config equivalent to the ComfyUI test model's unet_config and
its weights are mapped into ComfyUI's UNet with comfy.utils.unet_to_diffusers.
"""

import copy
from dataclasses import dataclass

import torch
from diffusers import UNet2DConditionModel

import comfy.model_management
import comfy.model_patcher
import comfy.supported_models
import comfy.utils
import random_models


@dataclass
class TwinModels:
    architecture: str
    diffusers_unet: UNet2DConditionModel
    comfy_model: comfy.model_patcher.ModelPatcher
    context_dim: int
    pooled_dim: int | None  # SDXL's pooled text embedding width, None for SD1.5


def _diffusers_config(unet_config: dict, architecture: str) -> dict:
    channels = [unet_config["model_channels"] * m for m in unet_config["channel_mult"]]
    per_level_depth = unet_config["transformer_depth"][:: unet_config["num_res_blocks"][0]]
    down = ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in per_level_depth]
    up = ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(per_level_depth)]
    config = {
        "sample_size": 8,
        "in_channels": unet_config["in_channels"],
        "out_channels": unet_config["out_channels"],
        "block_out_channels": channels,
        "down_block_types": down,
        "up_block_types": up,
        "layers_per_block": unet_config["num_res_blocks"][0],
        "cross_attention_dim": unet_config["context_dim"],
        "use_linear_projection": unet_config["use_linear_in_transformer"],
        "norm_num_groups": 32,
    }
    if architecture == "sd15":
        config["attention_head_dim"] = 8  # diffusers' SD1.5 name for 8 heads
    else:
        config["attention_head_dim"] = [c // unet_config["num_head_channels"] for c in channels]
        config["transformer_layers_per_block"] = [max(d, 1) for d in per_level_depth]
        config["addition_embed_type"] = "text_time"
        config["addition_time_embed_dim"] = 256
        config["projection_class_embeddings_input_dim"] = unet_config["adm_in_channels"]
    return config


def twin_models(architecture: str, seed: int = 0, v_prediction: bool = False) -> TwinModels:
    tiny = random_models.TINY_SD15_UNET if architecture == "sd15" else random_models.TINY_SDXL_UNET
    model_config_class = comfy.supported_models.SD15 if architecture == "sd15" else random_models.TinySDXL
    if v_prediction:
        if architecture != "sd15":
            raise ValueError("the v-prediction twin is SD1.5-shaped")
        model_config_class = random_models.TinySD15VPrediction
    model_config = model_config_class(copy.deepcopy(tiny))
    model_config.set_inference_dtype(torch.float32, None)
    unet_config = model_config.unet_config  # with the architecture's head settings merged in

    torch.manual_seed(seed)
    diffusers_unet = UNet2DConditionModel(**_diffusers_config(unet_config, architecture)).eval()
    with torch.no_grad():  # diffusers zero-initialises output layers; parity needs every layer to matter
        for parameter in diffusers_unet.parameters():
            if not parameter.any():
                parameter.normal_(0.0, 0.05)

    base_model = model_config.get_model({})
    diffusers_state = diffusers_unet.state_dict()
    mapping = comfy.utils.unet_to_diffusers(model_config.unet_config)
    comfy_state = {
        comfy_key: diffusers_state[diffusers_key]
        for diffusers_key, comfy_key in mapping.items()
        if diffusers_key in diffusers_state  # the map also lists layers this shape does not have
    }
    if len(comfy_state) != len(diffusers_state):
        raise AssertionError(f"mapped {len(comfy_state)} of {len(diffusers_state)} diffusers tensors")
    base_model.diffusion_model.load_state_dict(comfy_state, strict=True)
    device = comfy.model_management.get_torch_device()
    comfy_model = comfy.model_patcher.ModelPatcher(base_model, load_device=device, offload_device=device)
    return TwinModels(
        architecture=architecture,
        diffusers_unet=diffusers_unet,
        comfy_model=comfy_model,
        context_dim=unet_config["context_dim"],
        pooled_dim=None if architecture == "sd15" else unet_config["adm_in_channels"] - 6 * 256,
    )
