"""DDIM inversion: the latent that sampling back with the same schedule turns into the given image,
and the whole trajectory up the schedule (an INVERSION) for style references."""

import os

import torch

import comfy.samplers
import folder_paths
from comfy_api.latest import io

from ..glue.guided_loop import run_guided_loop
from ..inversion.ddim import InversionTrajectory, invert, load_trajectory, save_trajectory
from .io_types import Inversion

INVERSION_SUFFIX = ".inversion.safetensors"


def run_inversion(model, samples, positive, negative, steps, cfg, scheduler) -> tuple[torch.Tensor, InversionTrajectory]:
    """DDIM inversion on the ascending sigmas of the scheduler, in ComfyUI's guider."""
    model_sampling = model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(model_sampling, scheduler, steps).flip(0)

    def input_scale(sigma):
        return model_sampling.calculate_input(sigma.reshape(1), torch.ones(1, device=sigma.device)).reshape(())

    def inversion_loop(denoise, x, sigmas, on_step):
        trajectory = invert(denoise, x, sigmas, input_scale, on_step)
        return trajectory.top, trajectory

    return run_guided_loop(model, positive, negative, cfg, sigmas, samples, inversion_loop)


class DDIMInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DDIMInversion",
            display_name="DDIM Inversion",
            category="style_attention/inversion",
            description="Walks a latent up the noise schedule (DDIM with eta 0, reversed). Sampling the result with "
            "the same steps, scheduler and cfg, the euler or ddim sampler and no added noise gives the latent back "
            "(on a flow model such as Flux the result is the noise of sigma 1: the sampler must take it as its noise).",
            inputs=[
                io.Model.Input("model", tooltip="The model to invert with (eps, v-prediction or flow: Flux)."),
                io.Latent.Input("latent", tooltip="The image to invert, VAE-encoded."),
                io.Conditioning.Input("positive", tooltip="What the image shows; sample with the same prompt."),
                io.Conditioning.Input("negative", tooltip="Used when cfg is not 1."),
                io.Int.Input("steps", default=50, min=1, max=1000, tooltip="Sample with the same number of steps."),
                io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="1 inverts most faithfully; sample back with the same cfg."),
                io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES, default="normal",
                               tooltip="Sample with the same scheduler (ddim_uniform + euler is exactly DDIM)."),
            ],
            outputs=[
                io.Latent.Output(display_name="inverted_latent"),
                Inversion.Output(display_name="inversion"),
            ],
        )

    @classmethod
    def execute(cls, model, latent, positive, negative, steps, cfg, scheduler) -> io.NodeOutput:
        inverted, trajectory = run_inversion(model, latent["samples"], positive, negative, steps, cfg, scheduler)
        return io.NodeOutput({**latent, "samples": inverted}, trajectory)


class SaveInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SaveInversion",
            display_name="Save Inversion",
            category="style_attention/inversion",
            description="Writes an INVERSION to output/inversions/ as .safetensors, so a reference is inverted once. "
            "Move it to input/ (or pick the [output] entry) to load it.",
            inputs=[
                Inversion.Input("inversion", tooltip="From DDIM Inversion."),
                io.String.Input("filename_prefix", default="inversions/reference",
                                tooltip="Path under the output folder, without extension."),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, inversion, filename_prefix) -> io.NodeOutput:
        save_trajectory(inversion, new_output_path(filename_prefix, INVERSION_SUFFIX))
        return io.NodeOutput()


def new_output_path(filename_prefix: str, suffix: str) -> str:
    """output/<prefix>_<next counter>_<suffix>, the way SaveImage numbers its files."""
    folder, name, counter, _, _ = folder_paths.get_save_image_path(filename_prefix, folder_paths.get_output_directory())
    return os.path.join(folder, f"{name}_{counter:05}_{suffix}")


def saved_files(suffix: str) -> list[str]:
    """Files ending in suffix under input/ and (annotated [output]) output/, for a loader's dropdown."""
    found = []
    for annotation, root in (("", folder_paths.get_input_directory()), (" [output]", folder_paths.get_output_directory())):
        for folder, _, files in os.walk(root):
            for file in files:
                if file.endswith(suffix):
                    found.append(os.path.relpath(os.path.join(folder, file), root) + annotation)
    return sorted(found)


class LoadInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoadInversion",
            display_name="Load Inversion",
            category="style_attention/inversion",
            inputs=[io.Combo.Input("inversion", options=saved_files(INVERSION_SUFFIX),
                                   tooltip="An inversion saved by Save Inversion (input/ or [output]).")],
            outputs=[Inversion.Output(display_name="inversion")],
        )

    @classmethod
    def execute(cls, inversion) -> io.NodeOutput:
        return io.NodeOutput(load_trajectory(folder_paths.get_annotated_filepath(inversion)))


class InversionLatent(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="InversionLatent",
            display_name="Inversion Latent At Schedule",
            category="style_attention/inversion",
            description="The latent an inversion reached at the first sigma of a sampling schedule: sample a finer "
            "inversion (the DiffStyler authors invert with 1000 steps and sample with 50) from here, with these "
            "steps and scheduler. The schedule's sigmas must be in the inversion's (ddim_uniform: steps dividing the "
            "inversion's).",
            inputs=[
                Inversion.Input("inversion", tooltip="From DDIM Inversion or Load Inversion."),
                io.Model.Input("model", tooltip="The model that will sample (for its schedule and latent format)."),
                io.Int.Input("steps", default=50, min=1, max=10000, tooltip="The sampling steps."),
                io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES, default="ddim_uniform",
                               tooltip="The sampling scheduler."),
            ],
            outputs=[io.Latent.Output(display_name="latent")],
        )

    @classmethod
    def execute(cls, inversion, model, steps, scheduler) -> io.NodeOutput:
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps)
        for sigma in sigmas[:-1].tolist():  # every sampling step will look its source latent up
            inversion.latent_at(sigma)
        latent = inversion.latent_at(float(sigmas[0]))
        return io.NodeOutput({"samples": model.get_model_object("latent_format").process_out(latent)})
