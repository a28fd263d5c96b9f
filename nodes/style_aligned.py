"""StyleAligned (Hertz et al. 2024): shared self-attention with AdaIN toward a reference, and shared
GroupNorm statistics."""

import torch

import comfy.model_base
import comfy.model_patcher
from comfy_api.latest import io

from ..attention_patches.shared_attention import SharedAttention
from ..attention_patches.shared_norm import SharedGroupNorm
from ..attention_patches.style_call import ModelCallSlot, StyleOwner
from ..glue.architectures import ADAPTERS, AUTO, LAYER_CHOICES, adapter_for, resolve_layers
from ..glue.architectures.unet import UNetAdapter
from ..glue.schedule import active_sigma_range
from ..glue.stand_ins import behaviours_of, layer_weights, stand_in
from ..glue.style_call import install_style_call
from .style_inputs import (LayerConflictError, install_styled_attention, layer_inputs, new_owner,
                           reference_input, schedule_inputs, validate_reference)

SHARED_NORM_CHOICES = ["auto", "on", "off"]
REFERENCE_POSITIONS = ("beside", "same")


def shares_group_norm(model: comfy.model_patcher.ModelPatcher, adapter, choice: str) -> bool:
    """auto follows the original notebooks: on for SD1.x/SD2.x, off for SDXL; a DiT has no GroupNorm."""
    if not isinstance(adapter, UNetAdapter):
        if choice == "on":
            raise ValueError(f"shared_group_norm: on has no meaning on {adapter.family}: the model has no GroupNorm "
                             "(its blocks normalise each token alone); set it to auto or off")
        return False
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
                *layer_inputs(AUTO, "Which attention layers are shared. auto: all_self_attention on a UNet (the "
                              "paper shares all), single_blocks on Flux (AlignedGen shares all 38 single blocks), "
                              "all_blocks on SD3, Qwen-Image and Lumina 2.",
                              LAYER_CHOICES),
                *schedule_inputs(),
                reference_input(),
                io.Combo.Input("reference_positions", options=list(REFERENCE_POSITIONS), default="beside",
                               tooltip="Flux, Qwen-Image and Lumina 2 only (a UNet's and SD3's attention have no "
                               "rotary positions): beside places the reference's shared keys one image width to the right of the target (AlignedGen), so "
                               "the target does not read it as its own content; same keeps the reference's own "
                               "positions, on top of the target's. AlignedGen's style factor 1.1 is "
                               "shared_score_scale."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, share_attention, adain_queries, adain_keys, adain_values, shared_score_scale,
                shared_score_shift, shared_group_norm, layers, custom_layers, start_percent, end_percent,
                reference=None, reference_positions="beside") -> io.NodeOutput:
        adapter = adapter_for(model, "StyleAlignedAttention", ADAPTERS)
        selected = resolve_layers(adapter, layers, custom_layers, "style_aligned")
        if reference_positions not in REFERENCE_POSITIONS:
            raise ValueError(f"reference_positions: expected one of {', '.join(REFERENCE_POSITIONS)}, "
                             f"not {reference_positions!r}")
        active_range = active_sigma_range(model, start_percent, end_percent)
        shared_norms = shares_group_norm(model, adapter, shared_group_norm)
        if reference is not None:
            validate_reference(reference, model, adapter, "reference")
        method = SharedAttention(share_attention, adain_queries, adain_keys, adain_values, shared_score_scale,
                                 shared_score_shift, reference_beside=reference_positions == "beside")
        patched = model.clone()
        owner = new_owner("StyleAlignedAttention")
        install_styled_attention(patched, adapter, selected, method, owner)
        norm_call = install_shared_group_norms(patched, owner) if shared_norms else None
        install_style_call(patched, owner, reference, active_range, norm_call, tokens=getattr(adapter, "token_grid", None))
        return io.NodeOutput(patched)
