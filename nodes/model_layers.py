"""Reading a ComfyUI UNet's transformer layout and sigma schedule for the pure layer maps."""

import torch

import comfy.model_patcher
from comfy.ldm.modules.attention import SpatialTransformer
from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, ResBlock, Upsample

from ..attention_patches.layers import TransformerSite
from ..attention_patches.sigma_range import SigmaRange


def transformer_sites(model: comfy.model_patcher.ModelPatcher, node_name: str) -> list[TransformerSite]:
    unet = model.get_model_object("diffusion_model")
    if not all(hasattr(unet, part) for part in ("input_blocks", "middle_block", "output_blocks")):
        raise ValueError(
            f"{node_name} works on UNet models (SD1.x, SD2.x, SDXL); this model is {type(unet).__name__}"
        )
    sites = []
    downsamplings = 0
    for number, block in enumerate(unet.input_blocks):
        sites.extend(_sites_in("input", number, block, downsamplings))
        downsamplings += sum(isinstance(layer, Downsample) for layer in block)
    sites.extend(_sites_in("middle", 0, unet.middle_block, downsamplings))
    for number, block in enumerate(unet.output_blocks):
        sites.extend(_sites_in("output", number, block, downsamplings))
        downsamplings -= sum(isinstance(layer, Upsample) for layer in block)
    return sites


def _sites_in(block_name, number, block, downsamplings):
    return [
        TransformerSite(block_name, number, len(layer.transformer_blocks), downsamplings)
        for layer in block
        if isinstance(layer, SpatialTransformer)
    ]


def latent_downscale(model: comfy.model_patcher.ModelPatcher) -> int:
    """How many times the UNet halves the latent: its sides must be divisible by 2 to that power."""
    unet = model.get_model_object("diffusion_model")
    return sum(isinstance(layer, Downsample) for block in unet.input_blocks for layer in block)


def active_sigma_range(model: comfy.model_patcher.ModelPatcher, start_percent: float, end_percent: float) -> SigmaRange:
    if start_percent > end_percent:
        raise ValueError(f"start_percent ({start_percent}) must not be greater than end_percent ({end_percent})")
    model_sampling = model.get_model_object("model_sampling")
    return SigmaRange(
        sigma_start=float(model_sampling.percent_to_sigma(start_percent)),
        sigma_end=float(model_sampling.percent_to_sigma(end_percent)),
    )


def residual_branch_end(model: comfy.model_patcher.ModelPatcher, output_block: int, input_name: str) -> str:
    """The module path of the last layer of the residual branch of output block N's ResBlock: its output
    is the branch's, before the skip connection is added (diffusers' hidden_states after conv2)."""
    unet = model.get_model_object("diffusion_model")
    for index, layer in enumerate(unet.output_blocks[output_block]):
        if isinstance(layer, ResBlock):
            if layer.use_scale_shift_norm or not isinstance(layer.out_layers, torch.nn.Sequential):
                break
            return f"diffusion_model.output_blocks.{output_block}.{index}.out_layers.{len(layer.out_layers) - 1}"
    raise ValueError(f"{input_name}: output block {output_block} of this UNet has no ResBlock whose residual "
                     "branch can be injected")
