"""StyleAligned (Hertz et al. 2024): shared self-attention with AdaIN toward a reference, and shared
GroupNorm statistics."""

import torch

import comfy.model_base
import comfy.model_patcher
from comfy_api.latest import io

from ..attention_patches.layers import ALL_SELF_ATTENTION
from ..attention_patches.shared_attention import SharedAttention
from ..attention_patches.shared_norm import SharedGroupNorm
from ..attention_patches.style_call import ModelCallSlot, StyleOwner
from ..glue.architectures import adapter_for
from ..glue.schedule import active_sigma_range
from ..glue.stand_ins import behaviours_of, layer_weights, stand_in
from ..glue.style_call import install_style_call
from .style_inputs import (LayerConflictError, install_styled_attention, layer_inputs, new_owner,
                           reference_input, schedule_inputs, validate_reference)

SHARED_NORM_CHOICES = ["auto", "on", "off"]


def shares_group_norm(model: comfy.model_patcher.ModelPatcher, choice: str) -> bool:
    """auto follows the original notebooks: on for SD1.x/SD2.x, off for SDXL."""
    if choice == "auto":
        return not isinstance(model.model, comfy.model_base.SDXL)
    return choice == "on"


def group_norm_paths(module: torch.nn.Module, prefix: str):
    """Paths of the GroupNorms below module (a stand-in of another clone, still applied, is one too)."""
    for name, child in module.named_children():
        path = f"{prefix}.{name}"
        if isinstance(child, torch.nn.GroupNorm):
            yield path
        else:
            yield from group_norm_paths(child, path)


def install_shared_group_norms(model: comfy.model_patcher.ModelPatcher, owner: StyleOwner) -> ModelCallSlot:
    """Every GroupNorm of the clone's UNet, as object patches; refused where an earlier node of the
    chain already shares them (a norm computes its statistics with one reference)."""
    earlier = {behaviour.owner for patch in model.object_patches.values() for behaviour in behaviours_of(patch)
               if isinstance(behaviour, SharedGroupNorm)}
    if earlier:
        raise LayerConflictError(
            f"shared_group_norm: {', '.join(map(str, earlier))} earlier in this chain already shares the "
            f"GroupNorm statistics with its reference; set shared_group_norm off on {owner} or on that node"
        )
    slot = ModelCallSlot()
    for path in group_norm_paths(model.model.diffusion_model, "diffusion_model"):
        # get_model_object gives the original module even while a sibling clone's patch is applied
        norm = SharedGroupNorm(path, slot, layer_weights, owner)
        model.add_object_patch(path, stand_in(model.get_model_object(path), norm))
    return slot


class StyleAlignedAttention(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StyleAlignedAttention",
            display_name="StyleAligned Attention",
            category="style_attention",
            description="Each target attends to itself and the reference, with AdaIN of its queries and keys "
            "toward the reference (StyleAligned, Hertz et al. 2024).",
            inputs=[
                io.Model.Input("model", tooltip="The model to style; it is cloned, never changed."),
                io.Boolean.Input("share_attention", default=True,
                                 tooltip="Targets attend to [their own ; the reference's] keys and values. Off: AdaIN only."),
                io.Boolean.Input("adain_queries", default=True,
                                 tooltip="Give the targets' queries the reference's per-channel mean and std."),
                io.Boolean.Input("adain_keys", default=True,
                                 tooltip="Give the targets' keys the reference's per-channel mean and std."),
                io.Boolean.Input("adain_values", default=False,
                                 tooltip="Give the targets' values the reference's per-channel mean and std."),
                io.Float.Input("shared_score_scale", default=1.0, min=0.0, max=10.0, step=0.01,
                               tooltip="Multiplies the reference's keys, scaling the targets' attention scores to it."),
                io.Float.Input("shared_score_shift", default=0.0, min=-10.0, max=10.0, step=0.001,
                               tooltip="Added to the scores of the reference part. The paper's transfer from a real "
                               "image uses log 2 = 0.693; higher follows the reference more."),
                io.Combo.Input("shared_group_norm", options=SHARED_NORM_CHOICES, default="auto",
                               tooltip="Targets' GroupNorm statistics computed jointly with the reference. auto: on "
                               "for SD1.x/SD2.x, off for SDXL, as in the original notebooks."),
                *layer_inputs(ALL_SELF_ATTENTION, "Which self-attention layers are shared. The paper shares all."),
                *schedule_inputs(),
                reference_input(),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, share_attention, adain_queries, adain_keys, adain_values, shared_score_scale,
                shared_score_shift, shared_group_norm, layers, custom_layers, start_percent, end_percent,
                reference=None) -> io.NodeOutput:
        adapter = adapter_for(model, "StyleAlignedAttention")
        selected = adapter.resolve(layers, custom_layers)
        active_range = active_sigma_range(model, start_percent, end_percent)
        if reference is not None:
            validate_reference(reference, model, adapter, "reference")
        method = SharedAttention(share_attention, adain_queries, adain_keys, adain_values, shared_score_scale,
                                 shared_score_shift)
        patched = model.clone()
        owner = new_owner("StyleAlignedAttention")
        install_styled_attention(patched, adapter, selected, method, owner)
        norm_call = install_shared_group_norms(patched, owner) if shares_group_norm(model, shared_group_norm) else None
        install_style_call(patched, owner, reference, active_range, norm_call)
        return io.NodeOutput(patched)
