"""The style reference nodes: a latent (e.g. a VAE-encoded image) or a DDIM inversion, with what it
is conditioned on (glue/references.py holds the references themselves)."""

import comfy.sample
from comfy_api.latest import io

from ..glue.references import InversionReference, LatentReference
from .io_types import Inversion, StyleReference


def reference_conditioning(clip, prompt: str, conditioning) -> list:
    if conditioning is None:
        conditioning = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
    if len(conditioning) != 1:
        raise ValueError(f"conditioning: expected a single conditioning entry, got {len(conditioning)}")
    return conditioning


def prompt_inputs(prompt_tooltip: str) -> list:
    return [
        io.Clip.Input("clip", tooltip="Encodes the reference's own prompt."),
        io.String.Input("prompt", default="", multiline=True, tooltip=prompt_tooltip),
    ]


def conditioning_input():
    return io.Conditioning.Input("conditioning", optional=True,
                                 tooltip="Overrides clip + prompt: the reference's own conditioning (one entry).")


def cache_inputs() -> list:
    return [
        io.Int.Input("cache_megabytes", default=2048, min=0, max=1 << 20,
                     tooltip="Memory for the reference's recorded features: within it the reference runs once per "
                     "sigma and later steps and runs replay it. 0 runs it at every step."),
        io.Boolean.Input("cache_on_cpu", default=False,
                         tooltip="Keep the recorded features in system memory instead of the GPU's."),
    ]


class StyleReferenceLatent(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StyleReferenceLatent",
            display_name="Style Reference (Latent)",
            category="style_attention/reference",
            description="A style reference from a latent, e.g. a VAE-encoded image. At each step the style "
            "nodes see it forward-noised to the current sigma under a fixed seed.",
            inputs=[
                io.Latent.Input("latent", tooltip="The reference as a latent (VAE Encode an image). One image."),
                *prompt_inputs("What the reference shows, e.g. its style description. Empty is the usual choice."),
                io.Int.Input(
                    "reference_seed",
                    default=0,
                    min=0,
                    max=0xFFFFFFFFFFFFFFFF,
                    control_after_generate=False,
                    tooltip="Seed of the fixed noise that brings the reference to each sigma.",
                ),
                *cache_inputs(),
                conditioning_input(),
            ],
            outputs=[StyleReference.Output(display_name="reference")],
        )

    @classmethod
    def execute(cls, latent, clip, prompt, reference_seed, cache_megabytes, cache_on_cpu,
                conditioning=None) -> io.NodeOutput:
        samples = latent["samples"]
        if not (samples.ndim == 4 or (samples.ndim == 5 and samples.shape[2] == 1)) or samples.shape[0] != 1:
            raise ValueError(
                f"latent: expected one image latent of shape (1, C, H, W) (or (1, C, 1, H, W), Qwen-Image's), got "
                f"{tuple(samples.shape)}; pick one image with Latent From Batch"
            )
        noise = comfy.sample.prepare_noise(samples, reference_seed)
        conditioning = reference_conditioning(clip, prompt, conditioning)
        return io.NodeOutput(LatentReference(conditioning=conditioning, cache_megabytes=cache_megabytes, cache_on_cpu=cache_on_cpu,
                                            latent=samples.float(), noise=noise.float()))


class StyleReferenceInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StyleReferenceInversion",
            display_name="Style Reference (Inversion)",
            category="style_attention/reference",
            description="A style reference from a real image's DDIM inversion: at each step the style nodes see the "
            "latent the inversion reached at that sigma. Sample with the inversion's steps and scheduler.",
            inputs=[
                Inversion.Input("inversion", tooltip="From DDIM Inversion or Load Inversion (one image)."),
                *prompt_inputs("What the reference shows; best the prompt it was inverted with."),
                *cache_inputs(),
                conditioning_input(),
            ],
            outputs=[StyleReference.Output(display_name="reference")],
        )

    @classmethod
    def execute(cls, inversion, clip, prompt, cache_megabytes, cache_on_cpu, conditioning=None) -> io.NodeOutput:
        if inversion.latents.shape[1] != 1:
            raise ValueError(f"inversion: holds {inversion.latents.shape[1]} images; a reference is one image")
        conditioning = reference_conditioning(clip, prompt, conditioning)
        return io.NodeOutput(InversionReference(conditioning=conditioning, cache_megabytes=cache_megabytes,
                                               cache_on_cpu=cache_on_cpu, trajectory=inversion))
