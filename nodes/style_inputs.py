"""Inputs and installation shared by the self-attention style nodes (VSP, StyleAligned)."""

import uuid

import comfy.ldm.modules.attention
import comfy.model_patcher
from comfy_api.latest import io

from ..attention_patches.attention import KernelAttention
from ..attention_patches.attention_maps import CapturingAttention
from ..attention_patches.layers import PRESETS, SelfAttentionLayer, layer_name
from ..attention_patches.style_call import StyleOwner
from ..attention_patches.styled_self_attention import StyleMethod, StyledSelfAttention
from ..glue.references import ExternalReference
from .io_types import StyleReference
from .model_layers import latent_downscale


class LayerConflictError(ValueError):
    pass


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


def new_owner(node_id: str) -> StyleOwner:
    return StyleOwner(node_id, uuid.uuid4().hex)


def validate_reference(reference: ExternalReference, model: comfy.model_patcher.ModelPatcher, input_name: str) -> None:
    shape = reference.latent_shape()
    channels = model.get_model_object("latent_format").latent_channels
    if shape[1] != channels:
        raise ValueError(
            f"{input_name}: the reference latent has {shape[1]} channels but this model's latents "
            f"have {channels}; encode the reference image with this model's VAE"
        )
    multiple = 2 ** latent_downscale(model)
    height, width = shape[-2:]
    if height % multiple or width % multiple:
        raise ValueError(
            f"{input_name}: the reference latent is {height}x{width}; this UNet needs sides divisible by "
            f"{multiple} (images divisible by {multiple * 8} pixels)"
        )


def check_layers_are_free(model: comfy.model_patcher.ModelPatcher, layers: list[SelfAttentionLayer],
                          owner: StyleOwner, patch: str = "attn1", input_name: str = "layers",
                          remedy: str = "give the two nodes disjoint layers (layers: custom)") -> None:
    """A layer styled by an earlier node of this pack, or replaced by another pack, is refused with
    both named; an attention-map capture placed earlier is taken over (the styled layer records)."""
    replaced = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get(patch, {})
    what = "self-attention" if patch == "attn1" else "cross-attention"
    styled, foreign = {}, {}
    for layer in layers:
        existing = replaced.get(layer)
        if isinstance(existing, StyledSelfAttention):
            other = str(existing.owner) + (" (for its negative visual query guidance: see its nvqg_layers)"
                                           if existing.method is None else "")
            styled.setdefault(other, []).append(layer_name(*layer))
        elif existing is not None and not isinstance(existing, CapturingAttention):
            foreign.setdefault(type(existing).__name__, []).append(layer_name(*layer))
    for other, names in styled.items():
        raise LayerConflictError(
            f"{input_name}: {owner} would restyle {', '.join(names)}, which {other} earlier in this chain already "
            f"styles; each layer takes one style node: {remedy}"
        )
    for patch_type, names in foreign.items():
        raise LayerConflictError(
            f"{input_name}: {', '.join(names)} already have their {what} replaced by another node ({patch_type}); "
            f"{owner} would overwrite it: choose other layers, or apply {owner} before that node"
        )


def install_styled_self_attention(
    model: comfy.model_patcher.ModelPatcher,
    layers: list[SelfAttentionLayer],
    method: StyleMethod,
    owner: StyleOwner,
    patch: str = "attn1",
    cond_only: bool = False,
    negative_layers: list[SelfAttentionLayer] = (),
    negative_method: StyleMethod | None = None,
) -> None:
    """A StyledSelfAttention per layer as its attn1 (or, patch "attn2", cross-attention) replace patch;
    cond_only: the uncond chunks keep plain attention. negative_method acts in the style's negative
    branch at negative_layers, styled or not (those not styled are plain outside that branch)."""
    negative_only = [layer for layer in negative_layers if layer not in layers]
    check_layers_are_free(model, layers, owner, patch)
    check_layers_are_free(model, negative_only, owner, patch, "nvqg_layers",
                          "set nvqg_layers to style_layers, or give the other node other layers")
    everywhere = list(layers) + negative_only
    for layer in everywhere:
        styled = StyledSelfAttention(
            layer=layer,
            method=method if layer in layers else None,
            owner=owner,
            attention=KernelAttention.of(comfy.ldm.modules.attention.optimized_attention),
            replaces=patch,
            cond_only=cond_only,
            negative_method=negative_method if layer in negative_layers else None,
        )
        if patch == "attn1":
            model.set_model_attn1_replace(styled, *layer)
        else:
            model.set_model_attn2_replace(styled, *layer)
