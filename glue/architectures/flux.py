"""The Flux adapter (Flux.1 dev/schnell/Krea, Kontext, Chroma): the attention sites are the joint
attentions of the double and single blocks, named ("double", i) / ("single", i), installed as every
block-replacing DiT's are (joint_blocks.py: ComfyUI's block replacement running the block with an
attention override for it alone).

Token layout: text rows are the prompt's tokens (the context's length, read once per model call),
then ceil(h / 2) * ceil(w / 2) image rows, then Kontext's reference-image rows, if any; queries and
keys arrive with RoPE, whose matrices the block replacement receives.
"""

from dataclasses import dataclass

import comfy.ldm.chroma.model
import comfy.ldm.flux.model
import comfy.model_patcher

from ...attention_patches.layers import CUSTOM, LayerSelectionError
from .joint_blocks import JointBlocksAdapter, RotaryPositions

VITAL_BLOCKS = "vital_blocks"
SINGLE_BLOCKS = "single_blocks"
ALL_BLOCKS = "all_blocks"
PRESETS = (VITAL_BLOCKS, SINGLE_BLOCKS, ALL_BLOCKS, CUSTOM)
# Stable Flow's vital layers of Flux.1 (19 double, 38 single blocks), by block: the layers whose
# removal changes the image most; on another depth the same relative positions are taken.
VITAL = {"double": (0, 1, 17, 18), "single": (6, 9, 34, 35, 37)}
FLUX1_DEPTH = {"double": 19, "single": 38}


@dataclass(frozen=True)
class FluxAdapter(JointBlocksAdapter):
    double: int
    single: int
    patch_size: int
    theta: int
    axes_dim: tuple[int, ...]
    family = "Flux (Flux.1, Kontext, Chroma)"
    models = "Flux models (Flux.1, Kontext, Chroma)"
    presets = PRESETS
    auto = {"visual_style_prompting": VITAL_BLOCKS, "style_aligned": SINGLE_BLOCKS, "attention_maps": VITAL_BLOCKS}

    @classmethod
    def of(cls, model: comfy.model_patcher.ModelPatcher) -> "FluxAdapter | None":
        dit = model.get_model_object("diffusion_model")
        # by class: HunyuanVideo has the same block lists with image rows first and 5-D latents
        if not isinstance(dit, (comfy.ldm.flux.model.Flux, comfy.ldm.chroma.model.Chroma)):
            return None
        if not isinstance(dit.patch_size, int):
            return None
        return cls(len(dit.double_blocks), len(dit.single_blocks), dit.patch_size, dit.pe_embedder.theta,
                   tuple(dit.pe_embedder.axes_dim))

    @property
    def block_counts(self) -> dict[str, int]:
        return {"double": self.double, "single": self.single}

    @property
    def positions(self) -> RotaryPositions:
        return RotaryPositions(self.theta, self.axes_dim)

    def resolve(self, preset: str, custom_layers: str = "") -> list:
        """The blocks a preset (or the custom list) selects on this model; never empty."""
        if preset == VITAL_BLOCKS:
            return [(kind, i) for kind, count in (("double", self.double), ("single", self.single))
                    for i in sorted({round(v * (count - 1) / (FLUX1_DEPTH[kind] - 1)) for v in VITAL[kind]})
                    if count > 0]
        if preset == SINGLE_BLOCKS:
            return [("single", i) for i in range(self.single)]
        if preset == ALL_BLOCKS:
            return self.layers()
        if preset == CUSTOM:
            return self.custom(custom_layers)
        raise LayerSelectionError(f"layers: {preset!r} is not a preset of this model ({self.family}); expected "
                                  f"auto or one of {', '.join(PRESETS)}")
