"""Style Attention Nodes: Visual Style Prompting, StyleAligned, DiffStyler and StyleDiffusion as ComfyUI nodes."""

from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

from .nodes import NODES


class StyleAttentionExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> StyleAttentionExtension:
    return StyleAttentionExtension()
