"""The UNet adapter (SD1.x, SD2.x, SDXL): attention sites are the transformer blocks' attn1
(self-attention) and attn2 (cross-attention), named (block, number, depth index) as ComfyUI's
attention-replace patches name them, and a behaviour is installed as such a replace patch.

Every attention call at a site sees the image tokens alone (self-attention) or image queries against
the prompt (cross-attention): the token layout is the layer's own, with no text rows to skip."""

from dataclasses import dataclass

import torch

import comfy.model_patcher
from comfy.ldm.modules.attention import SpatialTransformer
from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, ResBlock, Upsample

from ...attention_patches.layers import (ALL_SELF_ATTENTION, LATE_SELF_ATTENTION, PRESETS, SelfAttentionLayer,
                                         TransformerSite, all_layers, layer_name, parse_custom_layers, resolve_layers,
                                         select_layers)

KINDS = ("attn1", "attn2")  # a site's self-attention, its cross-attention


@dataclass(frozen=True)
class UNetAdapter:
    """What this pack knows of one UNet: its transformer sites and how often it halves the latent."""

    sites: tuple[TransformerSite, ...]
    downscale: int  # how many times the UNet halves the latent
    family = "UNet (SD1.x, SD2.x, SDXL)"
    models = "UNet models (SD1.x, SD2.x, SDXL)"
    presets = PRESETS
    auto = {"visual_style_prompting": LATE_SELF_ATTENTION, "style_aligned": ALL_SELF_ATTENTION,
            "attention_maps": LATE_SELF_ATTENTION}
    kind_names = {"attn1": "self-attention", "attn2": "cross-attention"}
    map_kinds = {"self": "attn1", "cross": "attn2"}  # where each kind of attention map is read

    @classmethod
    def of(cls, model: comfy.model_patcher.ModelPatcher) -> "UNetAdapter | None":
        unet = model.get_model_object("diffusion_model")
        if not all(hasattr(unet, part) for part in ("input_blocks", "middle_block", "output_blocks")):
            return None
        return cls(tuple(_transformer_sites(unet)),
                   sum(isinstance(layer, Downsample) for block in unet.input_blocks for layer in block))

    def layers(self) -> list[SelfAttentionLayer]:
        return all_layers(list(self.sites))

    def resolve(self, preset: str, custom_layers: str = "") -> list[SelfAttentionLayer]:
        """The sites a preset (or the custom list) selects on this UNet; never empty."""
        return resolve_layers(list(self.sites), preset, custom_layers)

    @staticmethod
    def select(sites: list[SelfAttentionLayer], text: str, input_name: str, missing: str) -> list[SelfAttentionLayer]:
        """The sites among `sites` that the names in text select (output.3: every depth; output.3.1: one);
        a name selecting none raises missing formatted with its {name} and the {layers}."""
        return select_layers(sites, parse_custom_layers(text, input_name), missing)

    def check_latent_size(self, height: int, width: int, input_name: str, what: str = "") -> None:
        """A latent of this size can go through the model: what (e.g. "the reference latent is ") prefixes it."""
        multiple = 2 ** self.downscale
        if height % multiple or width % multiple:
            raise ValueError(f"{input_name}: {what}{height}x{width}; this UNet needs sides divisible by "
                             f"{multiple} (images divisible by {multiple * 8} pixels)")

    @staticmethod
    def name(site: SelfAttentionLayer) -> str:
        return layer_name(*site)

    @staticmethod
    def installed(model: comfy.model_patcher.ModelPatcher, site: SelfAttentionLayer, kind: str):
        """The replace patch at a site's attn1/attn2 on this clone, or None."""
        return model.model_options.get("transformer_options", {}).get("patches_replace", {}).get(kind, {}).get(site)

    @staticmethod
    def install(model: comfy.model_patcher.ModelPatcher, site: SelfAttentionLayer, kind: str, patch) -> None:
        if kind == "attn1":
            model.set_model_attn1_replace(patch, *site)
        elif kind == "attn2":
            model.set_model_attn2_replace(patch, *site)
        else:
            raise ValueError(f"a UNet site has attention kinds {', '.join(KINDS)}, not {kind!r}")

    @staticmethod
    def residual_branch_end(model: comfy.model_patcher.ModelPatcher, output_block: int, input_name: str) -> str:
        """The module path of the last layer of the residual branch of output block N's ResBlock: its
        output is the branch's, before the skip connection is added (diffusers' hidden_states after conv2)."""
        unet = model.get_model_object("diffusion_model")
        for index, layer in enumerate(unet.output_blocks[output_block]):
            if isinstance(layer, ResBlock):
                if layer.use_scale_shift_norm or not isinstance(layer.out_layers, torch.nn.Sequential):
                    break
                return f"diffusion_model.output_blocks.{output_block}.{index}.out_layers.{len(layer.out_layers) - 1}"
        raise ValueError(f"{input_name}: output block {output_block} of this UNet has no ResBlock whose residual "
                         "branch can be injected")


def _transformer_sites(unet) -> list[TransformerSite]:
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
    return [TransformerSite(block_name, number, len(layer.transformer_blocks), downsamplings)
            for layer in block if isinstance(layer, SpatialTransformer)]
