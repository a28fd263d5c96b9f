"""A content image's source-branch features recorded once, for Style Injection into many styled runs,
and kept in a .safetensors file (glue/source_features.py does the recording)."""

import torch

import comfy.samplers
import folder_paths
from comfy_api.latest import io

from ..attention_patches.feature_store import FeatureStore
from ..glue.source_features import RecordedSource, load_recorded, record_source, save_recorded
from .ddim_inversion import new_output_path, saved_files
from .io_types import ContentFeatures, Inversion
from ..glue.schedule import active_sigma_range
from .reference import conditioning_input
from .style_inputs import new_owner
from .style_injection import (check_fraction, install_injected_residuals, install_injection_sites, resolve_sites,
                              site_inputs, source_of)

FEATURES_SUFFIX = ".features.safetensors"


class RecordContentFeatures(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="RecordContentFeatures",
            display_name="Record Content Features (DiffStyler)",
            category="style_attention/diffstyler",
            description="Runs the content's inversion through a model once, at each sigma of the sampling schedule, "
            "keeping what Style Injection injects. Record with the plain checkpoint (the paper's source branch) and "
            "connect the result to every style's Style Injection: the content runs once for all of them.",
            inputs=[
                io.Model.Input("model", tooltip="The model whose features are recorded, e.g. the plain checkpoint."),
                Inversion.Input("inversion", tooltip="The content image's DDIM inversion (one image)."),
                io.Int.Input("steps", default=50, min=1, max=10000, tooltip="The sampling steps Style Injection will run."),
                io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES, default="normal",
                               tooltip="The sampling scheduler; its sigmas must be in the inversion's schedule."),
                io.Float.Input("fraction", default=0.6, min=0.0, max=1.0, step=0.01,
                               tooltip="Record the first part of the schedule: at least the larger of Style Injection's "
                               "feature_fraction and attention_fraction."),
                *site_inputs(),
                io.String.Input("source_prompt", default="", multiline=True,
                                tooltip="The source branch's prompt; the authors use the empty prompt."),
                io.Int.Input("max_megabytes", default=8192, min=1, max=1 << 20,
                             tooltip="Memory for the recording; more is an error saying how much one step needs."),
                io.Boolean.Input("keep_on_cpu", default=True, tooltip="Keep the recording in system memory (copied to "
                                 "the GPU step by step when replayed)."),
                io.Clip.Input("clip", optional=True, tooltip="Encodes source_prompt."),
                conditioning_input(),
            ],
            outputs=[ContentFeatures.Output(display_name="content_features")],
        )

    @classmethod
    def execute(cls, model, inversion, steps, scheduler, fraction, attention_sites, custom_attention_sites,
                feature_sites, custom_feature_sites, cross_attention, source_prompt, max_megabytes, keep_on_cpu, clip=None,
                conditioning=None) -> io.NodeOutput:
        check_fraction(fraction, "fraction")
        layers, cross_layers, paths = resolve_sites(model, attention_sites, custom_attention_sites, feature_sites,
                                                    custom_feature_sites, cross_attention)
        source = source_of(model, inversion, clip, source_prompt, conditioning)
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps)[:-1]
        recorded_range = active_sigma_range(model, 0.0, fraction)
        sigmas = sigmas[[recorded_range.contains(float(sigma)) for sigma in sigmas]]
        store = FeatureStore(max_megabytes * 2**20, torch.device("cpu") if keep_on_cpu else None)
        recording = model.clone()
        owner = new_owner("RecordContentFeatures")
        install_injection_sites(recording, layers, cross_layers, owner)
        slot = install_injected_residuals(recording, paths, owner) if paths else None
        if len(sigmas):
            record_source(recording, owner, slot, source, sigmas, store)
        return io.NodeOutput(RecordedSource(store, tuple(layers), tuple(paths), tuple(inversion.latents.shape[1:]),
                                            tuple(cross_layers)))


class SaveContentFeatures(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SaveContentFeatures",
            display_name="Save Content Features",
            category="style_attention/diffstyler",
            description="Writes recorded content features to output/features/ as .safetensors (written beside, then "
            "moved into place). Move the file to input/ (or pick the [output] entry) to load it.",
            inputs=[
                ContentFeatures.Input("content_features", tooltip="From Record Content Features."),
                io.String.Input("filename_prefix", default="features/content",
                                tooltip="Path under the output folder, without extension."),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, content_features, filename_prefix) -> io.NodeOutput:
        save_recorded(content_features, new_output_path(filename_prefix, FEATURES_SUFFIX))
        return io.NodeOutput()


class LoadContentFeatures(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoadContentFeatures",
            display_name="Load Content Features",
            category="style_attention/diffstyler",
            inputs=[io.Combo.Input("content_features", options=saved_files(FEATURES_SUFFIX),
                                   tooltip="Features saved by Save Content Features (input/ or [output]).")],
            outputs=[ContentFeatures.Output(display_name="content_features")],
        )

    @classmethod
    def execute(cls, content_features) -> io.NodeOutput:
        return io.NodeOutput(load_recorded(folder_paths.get_annotated_filepath(content_features)))
