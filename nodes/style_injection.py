"""DiffStyler's content injection (plug-and-play): the content image's DDIM inversion runs as a source
branch at each step and its features replace or blend into the styled run's."""

from comfy_api.latest import io

from ..attention_patches.injection import (ATTENTION_SITE_PRESETS, FEATURE_SITE_PRESETS, PLUG_AND_PLAY,
                                           InjectedResidual, QueryKeyInjection, resolve_attention_sites,
                                           resolve_feature_blocks)
from ..attention_patches.style_call import ModelCallSlot
from ..attention_patches.style_call import StyleOwner
from ..glue.architectures import adapter_for
from ..glue.references import InversionReference
from ..glue.source_features import RecordedSource
from ..glue.stand_ins import behaviours_of, stand_in
from ..glue.schedule import active_sigma_range
from ..glue.style_call import install_style_call
from .io_types import ContentFeatures, Inversion
from .reference import cache_inputs, conditioning_input, reference_conditioning
from .style_inputs import LayerConflictError, install_styled_attention, new_owner, validate_reference

NODE_ID = "StyleInjection"


def install_injected_residuals(model, paths: list[str], owner: StyleOwner) -> ModelCallSlot:
    """An object patch at the end of each ResBlock's residual branch; refused where one is already there."""
    for path in paths:
        existing = model.object_patches.get(path)
        if existing is not None:
            mine = [behaviour.owner for behaviour in behaviours_of(existing) if isinstance(behaviour, InjectedResidual)]
            other = mine[0] if mine else f"another node ({type(existing).__name__})"
            raise LayerConflictError(
                f"feature_sites: {other} earlier in this chain already replaces {path}; {owner} would overwrite it: "
                "give the two nodes different feature sites (feature_sites: custom or none)"
            )
    slot = ModelCallSlot()
    for path in paths:
        model.add_object_patch(path, stand_in(model.get_model_object(path), InjectedResidual(path, ((slot, owner),))))
    return slot


def check_fraction(value: float, name: str) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}: {value} is outside [0, 1]; it is the fraction of the schedule, from its start, "
                         "that injects")


def site_inputs() -> list:
    return [
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
        io.Boolean.Input("cross_attention", default=False,
                         tooltip="Also blend the source's queries and keys into the cross-attention of the attention "
                         "sites (named by the paper; commented out in the authors' code)."),
    ]


def resolve_sites(model, attention_sites, custom_attention_sites, feature_sites, custom_feature_sites,
                  cross_attention=False, with_attention=True, with_features=True) -> tuple[list, list, list[str]]:
    """(self-attention layers, cross-attention layers, residual-branch module paths) on this UNet."""
    adapter = adapter_for(model, NODE_ID)
    sites = list(adapter.sites)
    layers = resolve_attention_sites(sites, attention_sites, custom_attention_sites) if with_attention else []
    blocks = resolve_feature_blocks(sites, len(model.get_model_object("diffusion_model").output_blocks), feature_sites,
                                    custom_feature_sites)
    paths = [adapter.residual_branch_end(model, block, "feature_sites") for block in blocks] if with_features else []
    return layers, layers if cross_attention else [], paths


def source_of(model, inversion, clip, source_prompt, conditioning, cache_megabytes=0, cache_on_cpu=False):
    """The content's source branch: its inversion, conditioned on the source prompt."""
    if inversion.latents.shape[1] != 1:
        raise ValueError(f"inversion: holds {inversion.latents.shape[1]} images; the content is one image")
    if clip is None and conditioning is None:
        raise ValueError("clip: needed to encode source_prompt (or connect conditioning)")
    source = InversionReference(conditioning=reference_conditioning(clip, source_prompt, conditioning),
                                cache_megabytes=cache_megabytes, cache_on_cpu=cache_on_cpu, trajectory=inversion)
    validate_reference(source, model, adapter_for(model, NODE_ID), "inversion")
    return source


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
                io.Float.Input("feature_fraction", default=0.6, min=0.0, max=1.0, step=0.01,
                               tooltip="Part of the schedule, from the start, in which the ResBlock features are the "
                               "content's (authors: 30 of 50 steps). 0: off."),
                io.Float.Input("attention_fraction", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="Part of the schedule, from the start, in which self-attention takes the "
                               "content's queries and keys (authors: 25 of 50 steps), blended by min(1, 2t/1000). 0: off."),
                *site_inputs(),
                io.String.Input("source_prompt", default="", multiline=True,
                                tooltip="The source branch's prompt (with inversion); the authors use the empty prompt."),
                *cache_inputs(),
                Inversion.Input("inversion", optional=True,
                                tooltip="The content image's DDIM inversion (one image): the source runs through this "
                                "model at each injected step."),
                ContentFeatures.Input("content_features", optional=True,
                                      tooltip="Instead of inversion: the content's features recorded once (Record Content "
                                      "Features, e.g. by the plain model) and replayed into this model's run."),
                io.Clip.Input("clip", optional=True, tooltip="Encodes source_prompt (with inversion)."),
                conditioning_input(),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, feature_fraction, attention_fraction, attention_sites, custom_attention_sites,
                feature_sites, custom_feature_sites, cross_attention, source_prompt, cache_megabytes, cache_on_cpu,
                inversion=None,
                content_features=None, clip=None, conditioning=None) -> io.NodeOutput:
        check_fraction(feature_fraction, "feature_fraction")
        check_fraction(attention_fraction, "attention_fraction")
        layers, cross_layers, paths = resolve_sites(model, attention_sites, custom_attention_sites, feature_sites,
                                                    custom_feature_sites, cross_attention, attention_fraction > 0,
                                                    feature_fraction > 0)
        if (inversion is None) == (content_features is None):
            raise ValueError("inversion / content_features: connect exactly one: the content's inversion (its source "
                             "runs at each step) or its recorded features")
        source = None
        if inversion is not None:
            source = source_of(model, inversion, clip, source_prompt, conditioning, cache_megabytes, cache_on_cpu)
        else:
            check_recorded(content_features, model, layers, cross_layers, paths)
        patched = model.clone()
        if not layers and not paths:
            return io.NodeOutput(patched)
        owner = new_owner(NODE_ID)
        install_injection_sites(patched, layers, cross_layers, owner)
        slot = install_injected_residuals(patched, paths, owner) if paths else None
        install_style_call(patched, owner, source, active_sigma_range(model, 0.0, attention_fraction), slot,
                           slot_range=active_sigma_range(model, 0.0, feature_fraction), with_timestep=True,
                           recorded=None if content_features is None else content_features.store)
        return io.NodeOutput(patched)


def install_injection_sites(model, layers, cross_layers, owner: StyleOwner) -> None:
    adapter = adapter_for(model, NODE_ID)
    if layers:
        install_styled_attention(model, adapter, layers, QueryKeyInjection(), owner)
    if cross_layers:
        install_styled_attention(model, adapter, cross_layers, QueryKeyInjection(("text",)), owner, patch="attn2")


def check_recorded(recorded: RecordedSource, model, layers, cross_layers, paths) -> None:
    missing = recorded.missing(layers, cross_layers, paths)
    if missing:
        raise ValueError(f"content_features: recorded at {len(recorded.layers)} attention, {len(recorded.cross_layers)} "
                         f"cross-attention and {len(recorded.paths)} feature sites, not at {', '.join(missing)}; record "
                         "with the same sites")
    channels = model.get_model_object("latent_format").latent_channels
    if recorded.latent_shape[1] != channels:
        raise ValueError(f"content_features: recorded from {recorded.latent_shape[1]}-channel latents; this model's "
                         f"have {channels}")
