"""Inputs and installation shared by the self-attention style nodes (VSP, StyleAligned)."""

import uuid

import comfy.model_patcher
from comfy_api.latest import io

from ..attention_patches.layers import PRESETS
from ..attention_patches.style_call import StyleOwner
from ..glue.references import ExternalReference, ReferenceSet
from ..glue.site_patches import LayerConflictError, install_styled_attention  # noqa: F401 (the nodes' error, their install)
from .io_types import StyleReference


def layer_inputs(default: str, tooltip: str, choices=PRESETS) -> list:
    custom = ("Used when layers is custom: block.number (every depth) or block.number.index, comma separated, "
              "e.g. output.3, output.4.1")
    if "single_blocks" in choices:
        custom += ("; on Flux double.N, single.N, or double / single for all of them, e.g. double.0, single; on SD3, "
                   "Qwen-Image and Lumina 2 double.N or double, e.g. double.12, double.13")
    return [
        io.Combo.Input("layers", options=list(choices), default=default, tooltip=tooltip),
        io.String.Input("custom_layers", default="", tooltip=custom),
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
        tooltip="An external reference (Style Reference node; several with weights: Combine Style References). "
        "Unconnected: latent batch item 0 is the reference and the other items are styled after it.",
    )


def new_owner(node_id: str) -> StyleOwner:
    return StyleOwner(node_id, uuid.uuid4().hex)


def validate_reference(reference: ExternalReference | ReferenceSet, model: comfy.model_patcher.ModelPatcher, adapter,
                       input_name: str) -> None:
    members = reference.members if isinstance(reference, ReferenceSet) else (reference,)
    for number, member in enumerate(members, start=1):
        which = f"the set's reference {number}" if len(members) > 1 else "the reference"
        shape = member.latent_shape()
        channels = model.get_model_object("latent_format").latent_channels
        if shape[1] != channels:
            raise ValueError(
                f"{input_name}: {which} latent has {shape[1]} channels but this model's latents "
                f"have {channels}; encode the reference image with this model's VAE"
            )
        adapter.check_latent_size(*shape[-2:], input_name, f"{which} latent is ")
