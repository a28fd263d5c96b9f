"""Inputs and installation shared by the self-attention style nodes (VSP, StyleAligned)."""

import comfy.ldm.modules.attention
import comfy.model_patcher
from comfy_api.latest import io

from ..attention_patches.layers import PRESETS, SelfAttentionLayer
from ..attention_patches.attention import KernelAttention
from ..attention_patches.sigma_range import SigmaRange
from ..attention_patches.styled_self_attention import StyleMethod, StyledSelfAttention
from .reference import StyleReference


def layer_inputs(default: str, tooltip: str) -> list:
    return [
        io.Combo.Input("layers", options=list(PRESETS), default=default, tooltip=tooltip),
        io.String.Input(
            "custom_layers",
            default="",
            tooltip="Used when layers is custom: block.number (every depth) or block.number.index, comma "
            "separated, e.g. output.3, output.4.1",
        ),
    ]


def schedule_inputs() -> list:
    return [
        io.Float.Input(
            "start_percent", default=0.0, min=0.0, max=1.0, step=0.001,
            tooltip="Fraction of the schedule (0 = first step) at which the style starts.",
        ),
        io.Float.Input(
            "end_percent", default=1.0, min=0.0, max=1.0, step=0.001,
            tooltip="Fraction of the schedule at which the style stops (1 = last step).",
        ),
    ]


def reference_input():
    return StyleReference.Input(
        "reference",
        optional=True,
        tooltip="An external reference (Style Reference node). Unconnected: latent batch item 0 is the "
        "reference and the other items are styled after it.",
    )


def install_styled_self_attention(
    model: comfy.model_patcher.ModelPatcher,
    layers: list[SelfAttentionLayer],
    method: StyleMethod,
    active_range: SigmaRange,
    in_batch: bool,
) -> None:
    for layer in layers:
        styled = StyledSelfAttention(
            layer=layer,
            method=method,
            active_range=active_range,
            attention=KernelAttention.of(comfy.ldm.modules.attention.optimized_attention),
            in_batch=in_batch,
        )
        model.set_model_attn1_replace(styled, *layer)
