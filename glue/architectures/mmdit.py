"""The SD3 adapter (SD3 Medium, SD3.5 Large/Medium/Turbo: ComfyUI's MMDiT): the attention sites are
the joint attentions of its joint blocks, named ("double", i) as ComfyUI's block replacement keys
them (an MMDiT block is a double-stream block, as Flux's double blocks), installed as every
block-replacing DiT's are (joint_blocks.py).

Token layout: text rows are the register tokens (if any) and the prompt's tokens, then
ceil(h / 2) * ceil(w / 2) image rows. No RoPE: SD3 adds an absolute position embedding to the image
tokens at the input, so a reference's keys carry the positions of its own pass (a target's, for a
reference of the same size) and "beside" has no rotation to apply. SD3.5 Medium's first blocks
(x_block_self_attn) run a second, image-only attention after the joint one: a styled block styles
both, each with the reference's features of the same attention.
"""

from dataclasses import dataclass

import comfy.ldm.modules.diffusionmodules.mmdit
import comfy.model_patcher

from .joint_blocks import DOUBLE_BLOCK_AUTO, DOUBLE_BLOCK_PRESETS, JointBlocksAdapter


@dataclass(frozen=True)
class MMDiTAdapter(JointBlocksAdapter):
    depth: int
    patch_size: int
    register_length: int = 0
    dual_attention: frozenset = frozenset()  # blocks with a second, image-only attention (SD3.5 Medium)
    family = "SD3 (SD3, SD3.5)"
    models = "SD3 models (SD3, SD3.5)"
    presets = DOUBLE_BLOCK_PRESETS
    auto = DOUBLE_BLOCK_AUTO
    block_keys = {"double": "double_block"}

    @classmethod
    def of(cls, model: comfy.model_patcher.ModelPatcher) -> "MMDiTAdapter | None":
        dit = model.get_model_object("diffusion_model")
        if not isinstance(dit, comfy.ldm.modules.diffusionmodules.mmdit.OpenAISignatureMMDITWrapper):
            return None
        if dit.context_processor is not None:  # it would change the text rows' count
            return None
        dual = frozenset(i for i, block in enumerate(dit.joint_blocks) if block.x_block.x_block_self_attn)
        return cls(len(dit.joint_blocks), dit.patch_size, dit.register_length, dual)

    @property
    def block_counts(self) -> dict[str, int]:
        return {"double": self.depth}

    @property
    def image_only_blocks(self) -> dict:
        return {"double": self.dual_attention}

    def text_rows(self, c_crossattn) -> int:
        return self.register_length + c_crossattn.shape[1]
