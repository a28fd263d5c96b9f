"""DiffStyler's content injection (plug-and-play): the content image's DDIM inversion runs as a source
branch at each step and its features replace or blend into the styled run's."""

from comfy_api.latest import io

from ..attention_patches.injection import (ATTENTION_SITE_PRESETS, FEATURE_SITE_PRESETS, PLUG_AND_PLAY,
                                           InjectedResidual, QueryKeyInjection, resolve_attention_sites,
                                           resolve_feature_blocks)
from ..attention_patches.shared_norm import ModelCallSlot
from ..attention_patches.style_call import StyleOwner
from ..glue.references import InversionReference
from ..glue.style_call import install_style_call
from .io_types import Inversion
from .model_layers import active_sigma_range, residual_branch_end, transformer_sites
from .reference import cache_inputs, conditioning_input, reference_conditioning
from .style_inputs import LayerConflictError, install_styled_self_attention, new_owner, validate_reference

NODE_ID = "StyleInjection"


def install_injected_residuals(model, paths: list[str], owner: StyleOwner) -> ModelCallSlot:
    """An object patch at the end of each ResBlock's residual branch; refused where one is already there."""
    for path in paths:
        existing = model.object_patches.get(path)
        if existing is not None:
            other = existing.owner if isinstance(existing, InjectedResidual) else f"another node ({type(existing).__name__})"
            raise LayerConflictError(
                f"feature_sites: {other} earlier in this chain already replaces {path}; {owner} would overwrite it: "
                "give the two nodes different feature sites (feature_sites: custom or none)"
            )
    slot = ModelCallSlot()
    for path in paths:
        model.add_object_patch(path, InjectedResidual(model.get_model_object(path), path, slot, owner))
    return slot


def check_fraction(value: float, name: str) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}: {value} is outside [0, 1]; it is the fraction of the schedule, from its start, "
                         "that injects")


class StyleInjection(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=NODE_ID,
            display_name="Style Injection (DiffStyler)",
            category="style_attention/diffstyler",
            description="Keeps a content image's structure in a styled run (DiffStyler, after Plug-and-Play): at each "
            "step the content's DDIM inversion runs as a source branch and its decoder features and self-attention "
            "queries/keys are injected. Sample the inverted latent with KSampler (Advanced), add_noise disabled, the "
            "inversion's steps and scheduler.",
            inputs=[
                io.Model.Input("model", tooltip="The model to sample with, typically Fit Style LoRA's output. Its own "
                               "UNet runs the source branch, as in the authors' code. Cloned, never changed."),
                Inversion.Input("inversion", tooltip="The content image's DDIM inversion (one image)."),
                io.Clip.Input("clip", tooltip="Encodes the source branch's prompt."),
                io.String.Input("source_prompt", default="", multiline=True,
                                tooltip="The source branch's prompt; the authors use the empty prompt."),
                io.Float.Input("feature_fraction", default=0.6, min=0.0, max=1.0, step=0.01,
                               tooltip="Part of the schedule, from the start, in which the ResBlock features are the "
                               "content's (authors: 30 of 50 steps). 0: off."),
                io.Float.Input("attention_fraction", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="Part of the schedule, from the start, in which self-attention takes the "
                               "content's queries and keys (authors: 25 of 50 steps), blended by min(1, 2t/1000). 0: off."),
                io.Combo.Input("attention_sites", options=list(ATTENTION_SITE_PRESETS), default=PLUG_AND_PLAY,
                               tooltip="plug_and_play: the decoder's transformers after its first (SD1.5 output blocks "
                               "4-11, SDXL 1-5). decoder: all of them. custom: custom_attention_sites."),
                io.String.Input("custom_attention_sites", default="",
                                tooltip="With attention_sites custom: block.number or block.number.index, e.g. output.4, output.6.0"),
                io.Combo.Input("feature_sites", options=list(FEATURE_SITE_PRESETS), default=PLUG_AND_PLAY,
                               tooltip="plug_and_play: the ResBlock of the decoder's second attention block (SD1.5 output "
                               "block 4 = up_blocks[1].resnets[1], SDXL output block 1). none: no feature injection. "
                               "custom: custom_feature_sites."),
                io.String.Input("custom_feature_sites", default="",
                                tooltip="With feature_sites custom: decoder blocks whose ResBlock is injected, e.g. output.4, output.5"),
                *cache_inputs(),
                conditioning_input(),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, inversion, clip, source_prompt, feature_fraction, attention_fraction, attention_sites,
                custom_attention_sites, feature_sites, custom_feature_sites, cache_megabytes, cache_on_cpu,
                conditioning=None) -> io.NodeOutput:
        check_fraction(feature_fraction, "feature_fraction")
        check_fraction(attention_fraction, "attention_fraction")
        if inversion.latents.shape[1] != 1:
            raise ValueError(f"inversion: holds {inversion.latents.shape[1]} images; the content is one image")
        sites = transformer_sites(model, NODE_ID)
        layers = resolve_attention_sites(sites, attention_sites, custom_attention_sites) if attention_fraction else []
        unet = model.get_model_object("diffusion_model")
        blocks = resolve_feature_blocks(sites, len(unet.output_blocks), feature_sites, custom_feature_sites)
        paths = [residual_branch_end(model, block, "feature_sites") for block in blocks] if feature_fraction else []
        source = InversionReference(conditioning=reference_conditioning(clip, source_prompt, conditioning),
                                    cache_megabytes=cache_megabytes, cache_on_cpu=cache_on_cpu, trajectory=inversion)
        validate_reference(source, model, "inversion")
        patched = model.clone()
        if not layers and not paths:
            return io.NodeOutput(patched)
        owner = new_owner(NODE_ID)
        if layers:
            install_styled_self_attention(patched, layers, QueryKeyInjection(), owner)
        slot = install_injected_residuals(patched, paths, owner) if paths else None
        install_style_call(patched, owner, source, active_sigma_range(model, 0.0, attention_fraction), slot,
                           slot_range=active_sigma_range(model, 0.0, feature_fraction), with_timestep=True)
        return io.NodeOutput(patched)
