"""Visual Style Prompting (Jeong et al. 2024): in late self-attention the target keeps its queries and
takes the reference's keys and values. Cross-attention is never touched."""

import comfy.ldm.modules.attention
from comfy_api.latest import io

from ..attention_patches.kv_swap import KeyValueSwap
from ..attention_patches.layers import LATE_SELF_ATTENTION, PRESETS, resolve_layers
from ..attention_patches.styled_self_attention import StyledSelfAttention
from .model_layers import active_sigma_range, transformer_sites
from .reference import StyleReference, install_reference_pass

LAYERS_TOOLTIP = (
    "Which self-attention layers take the reference's keys and values. late_self_attention: the "
    "decoder's attention levels above its coarsest one (SDXL output blocks 3-5, as in the paper; SD1.5 "
    "output blocks 6-11). custom: the custom_layers list."
)

def layer_inputs() -> list:
    return [
        io.Combo.Input("layers", options=list(PRESETS), default=LATE_SELF_ATTENTION, tooltip=LAYERS_TOOLTIP),
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

class VisualStylePrompting(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VisualStylePrompting",
            display_name="Visual Style Prompting",
            category="style_attention",
            description="Targets keep their self-attention queries and attend to the reference's keys and "
            "values in the selected layers (Visual Style Prompting, Jeong et al. 2024).",
            inputs=[
                io.Model.Input("model", tooltip="The model to style; it is cloned, never changed."),
                *layer_inputs(),
                io.Float.Input(
                    "strength", default=1.0, min=0.0, max=1.0, step=0.01,
                    tooltip="1 is the paper's swap; lower values blend toward the target's own attention; 0 is off.",
                ),
                *schedule_inputs(),
                reference_input(),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(
        cls, model, layers, custom_layers, strength, start_percent, end_percent, reference=None
    ) -> io.NodeOutput:
        selected = resolve_layers(transformer_sites(model, "VisualStylePrompting"), layers, custom_layers)
        active_range = active_sigma_range(model, start_percent, end_percent)
        if reference is not None:
            reference.validate_for(model, "reference")
        patched = model.clone()
        if strength == 0.0:
            return io.NodeOutput(patched)
        method = KeyValueSwap(strength)
        for layer in selected:
            styled = StyledSelfAttention(
                layer=layer,
                method=method,
                active_range=active_range,
                attention=comfy.ldm.modules.attention.optimized_attention,
                in_batch=reference is None,
            )
            patched.set_model_attn1_replace(styled, *layer)
        if reference is not None:
            install_reference_pass(patched, reference, active_range)
        return io.NodeOutput(patched)
