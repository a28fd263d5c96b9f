"""ComfyUI nodes: the only layer that imports comfy."""

from .batch_prompts import ReferenceTargetPrompts
from .reference import StyleReferenceLatent
from .visual_style_prompting import VisualStylePrompting

NODES = [VisualStylePrompting, StyleReferenceLatent, ReferenceTargetPrompts]
