"""The Qwen-Image adapter (Qwen-Image, Qwen-Image-Edit): the attention sites are the joint attentions
of its double-stream blocks, named ("double", i) as ComfyUI's block replacement keys them, installed
as every block-replacing DiT's are (joint_blocks.py).

Token layout: text rows are the prompt's tokens (Qwen2.5-VL's hidden states; ComfyUI never passes
their padding mask to attention, so every text row attends and is attended to), then ceil(h / 2) *
ceil(w / 2) image rows of the (batch, 16, 1, h, w) latent, then the edit model's reference-image rows,
if any. Queries and keys arrive with RoPE (Flux's matrices; text positions on the diagonal after the
image's, image positions centred on 0), whose matrices the block replacement receives.
"""

from dataclasses import dataclass

import comfy.ldm.qwen_image.model
import comfy.model_patcher

from .joint_blocks import DOUBLE_BLOCK_AUTO, DOUBLE_BLOCK_PRESETS, JointBlocksAdapter, RotaryPositions


@dataclass(frozen=True)
class QwenImageAdapter(JointBlocksAdapter):
    depth: int
    patch_size: int
    theta: int
    axes_dim: tuple[int, ...]
    family = "Qwen-Image"
    models = "Qwen-Image models"
    presets = DOUBLE_BLOCK_PRESETS
    auto = DOUBLE_BLOCK_AUTO
    block_keys = {"double": "double_block"}

    @classmethod
    def of(cls, model: comfy.model_patcher.ModelPatcher) -> "QwenImageAdapter | None":
        dit = model.get_model_object("diffusion_model")
        if not isinstance(dit, comfy.ldm.qwen_image.model.QwenImageTransformer2DModel):
            return None
        return cls(len(dit.transformer_blocks), dit.patch_size, dit.pe_embedder.theta, tuple(dit.pe_embedder.axes_dim))

    @property
    def block_counts(self) -> dict[str, int]:
        return {"double": self.depth}

    @property
    def positions(self) -> RotaryPositions:
        return RotaryPositions(self.theta, self.axes_dim)
