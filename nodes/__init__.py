"""ComfyUI nodes: each translates between ComfyUI's inputs and the pack's glue/ (which runs things
inside ComfyUI: wrappers, patches, the architecture adapters). nodes/ and glue/ import comfy; the
pure packages (attention_patches/, inversion/, lora_fit/, mask/) never do."""

from .attention_maps import AttentionMapHeatmap, CaptureAttentionMaps
from .batch_prompts import ReferenceTargetPrompts
from .content_features import LoadContentFeatures, RecordContentFeatures, SaveContentFeatures
from .ddim_inversion import DDIMInversion, InversionLatent, LoadInversion, SaveInversion
from .fastsam import FastSAMLoader, FastSAMSegment
from .fit_style_lora import FitStyleLoRA
from .masked_style_blend import MaskedStyleBlend
from .prompt_to_prompt import PromptToPromptEdit
from .reference import StyleReferenceInversion, StyleReferenceLatent
from .reference_set import CombineStyleReferences
from .style_aligned import StyleAlignedAttention
from .style_injection import StyleInjection
from .stylediffusion import LoadStyleInversion, PromptEmbeddingInversion, SaveStyleInversion
from .visual_style_prompting import VisualStylePrompting

NODES = [
    VisualStylePrompting,
    StyleAlignedAttention,
    StyleReferenceLatent,
    StyleReferenceInversion,
    CombineStyleReferences,
    ReferenceTargetPrompts,
    DDIMInversion,
    SaveInversion,
    LoadInversion,
    InversionLatent,
    CaptureAttentionMaps,
    AttentionMapHeatmap,
    FitStyleLoRA,
    StyleInjection,
    RecordContentFeatures,
    SaveContentFeatures,
    LoadContentFeatures,
    FastSAMLoader,
    FastSAMSegment,
    MaskedStyleBlend,
    PromptEmbeddingInversion,
    SaveStyleInversion,
    LoadStyleInversion,
    PromptToPromptEdit,
]
