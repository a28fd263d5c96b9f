"""Visual Style Prompting (Jeong et al. 2024): in late self-attention the target keeps its queries and
takes the reference's keys and values. Cross-attention is never touched."""

from comfy_api.latest import io

from ..attention_patches.kv_swap import KeyValueSwap
from ..attention_patches.layers import NVQG_LAYERS, negative_layers
from ..attention_patches.query_swap import QuerySwap
from ..glue.architectures import ADAPTERS, AUTO, LAYER_CHOICES, adapter_for, resolve_layers
from ..glue.color_calibration import install_color_calibration
from ..glue.negative_query_guidance import install_negative_query_guidance
from ..glue.references import ReferenceSet
from ..glue.schedule import active_sigma_range
from ..glue.style_call import install_style_call
from .style_inputs import (install_styled_attention, layer_inputs, new_owner, reference_input, schedule_inputs,
                           validate_reference)

LAYERS_TOOLTIP = (
    "Which attention layers take the reference's keys and values. auto: late_self_attention on a UNet, "
    "vital_blocks on Flux, late_blocks on SD3, Qwen-Image and Lumina 2. late_self_attention (UNet): the decoder's "
    "attention levels above its coarsest one (SDXL output blocks 3-5, as in the paper; SD1.5 output blocks 6-11). "
    "vital_blocks (Flux): Stable Flow's vital layers (double 0, 1, 17, 18; single 6, 9, 34, 35, 37 on Flux.1). "
    "late_blocks (SD3, Qwen-Image, Lumina 2): the second half of the blocks. On a DiT only the image tokens' keys "
    "and values are swapped, the prompt's stay. custom: the custom_layers list."
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
                *layer_inputs(AUTO, LAYERS_TOOLTIP, LAYER_CHOICES),
                io.Float.Input(
                    "strength", default=1.0, min=0.0, max=1.0, step=0.01,
                    tooltip="1 is the paper's swap; lower values blend toward the target's own attention; 0 is off.",
                ),
                *schedule_inputs(),
                reference_input(),
                io.Boolean.Input(
                    "cond_only", default=False,
                    tooltip="StyleKeeper: swap in the conditional branch only; the unconditional branch keeps "
                    "plain self-attention, so guidance pushes toward the style without the reference's content "
                    "(the paper's (1 + w) eps_swap - w eps_empty is cfg = 1 + w). Off: both branches swap (VSP).",
                ),
                io.Boolean.Input(
                    "calibrate_colors", default=False,
                    tooltip="StyleKeeper: with a reference image, in a window of model timesteps the predicted clean "
                    "latent takes the reference latent's per-channel mean and std over space, so its colours "
                    "survive. Needs an external reference.",
                ),
                io.Int.Input(
                    "calibration_timestep", default=150, min=1, max=999,
                    tooltip="Colour calibration acts at model timesteps below this one (the authors' 150) ...",
                ),
                io.Int.Input(
                    "calibration_length", default=50, min=1, max=999,
                    tooltip="... and above it minus this many (the authors' 50: 150 > t > 100, three steps of a "
                    "50-step DDIM run).",
                ),
                io.Float.Input(
                    "nvqg_weight", default=0.0, min=0.0, max=20.0, step=0.05,
                    tooltip="StyleKeeper's negative visual query guidance: a third, negative branch (the negative "
                    "prompt with the targets' queries swapped for the reference's, simulating content leakage) "
                    "subtracted as cfg_result - weight * (negative - unconditional). 0 is off and costs nothing; "
                    "on, each step runs one more unconditional-sized batch. An external reference must have the "
                    "output's size.",
                ),
                io.Combo.Input(
                    "nvqg_layers", options=list(NVQG_LAYERS), default="style_layers",
                    tooltip="Where the negative branch swaps queries: style_layers, the layers that swap keys and "
                    "values; other_layers, every other self-attention layer; all_layers.",
                ),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(
        cls, model, layers, custom_layers, strength, start_percent, end_percent, reference=None, cond_only=False,
        calibrate_colors=False, calibration_timestep=150, calibration_length=50, nvqg_weight=0.0,
        nvqg_layers="style_layers",
    ) -> io.NodeOutput:
        adapter = adapter_for(model, "VisualStylePrompting", ADAPTERS)
        selected = resolve_layers(adapter, layers, custom_layers, "visual_style_prompting")
        negative = negative_layers(adapter.layers(), selected, nvqg_layers) if nvqg_weight > 0 else []
        active_range = active_sigma_range(model, start_percent, end_percent)
        if reference is not None:
            validate_reference(reference, model, adapter, "reference")
        if nvqg_weight > 0 and isinstance(reference, ReferenceSet):
            raise ValueError("nvqg_weight: negative visual query guidance swaps in one reference's queries; with "
                             "several references (Combine Style References) set it to 0")
        if calibrate_colors and reference is None:
            raise ValueError("calibrate_colors: needs a reference image (connect a Style Reference (Latent) or "
                             "(Inversion) to reference); an in-batch reference has no image to take colours from")
        patched = model.clone()
        if strength == 0.0 or active_range.sigma_start == active_range.sigma_end:  # no style at all: nothing
            return io.NodeOutput(patched)
        owner = new_owner("VisualStylePrompting")
        install_styled_attention(patched, adapter, selected, KeyValueSwap(strength), owner, cond_only=cond_only,
                                 negative_layers=negative, negative_method=QuerySwap())
        install_style_call(patched, owner, reference, active_range, tokens=getattr(adapter, "token_grid", None))
        if negative:  # before the calibration: that acts on the final prediction
            install_negative_query_guidance(patched, owner, nvqg_weight, active_range, reference)
        if calibrate_colors:
            install_color_calibration(patched, reference, calibration_timestep, calibration_length)
        return io.NodeOutput(patched)
