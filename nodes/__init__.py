"""ComfyUI nodes: the only layer that imports comfy."""

from .batch_prompts import ReferenceTargetPrompts
from .reference import StyleReferenceLatent
from .style_aligned import StyleAlignedAttention
from .visual_style_prompting import VisualStylePrompting

NODES = [VisualStylePrompting, StyleAlignedAttention, StyleReferenceLatent, ReferenceTargetPrompts]
