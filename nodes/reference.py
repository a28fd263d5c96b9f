"""External style references: a latent (e.g. a VAE-encoded image) or a DDIM inversion, and what it
is conditioned on.

At each sigma the reference is its forward-noised latent under a fixed seed, or the latent its
inversion reached there. A separate forward pass of it records its features (self-attention
inputs, norm inputs) before the targets' pass uses them.
"""

from dataclasses import dataclass

import torch

import comfy.model_patcher
import comfy.patcher_extension
import comfy.sample
import comfy.sampler_helpers
import comfy.samplers
from comfy_api.latest import io

from ..attention_patches.reference import REFERENCE_STORE_OPTION, ReferenceFeatureStore
from ..attention_patches.reference_cache import ReferenceFeatureCache
from ..attention_patches.shared_norm import ModelCall, ModelCallSlot
from ..attention_patches.sigma_range import SigmaRange
from ..inversion.ddim import InversionTrajectory
from .model_layers import latent_downscale

StyleReference = io.Custom("STYLE_REFERENCE")
Inversion = io.Custom("INVERSION")

REFERENCE_PASS_WRAPPER_KEY = "style_attention_nodes.reference_pass"


@dataclass(frozen=True, kw_only=True)
class ExternalReference:
    """A reference run alone at each step: its state at a sigma comes from a subclass."""

    conditioning: list  # a CONDITIONING with one entry
    cache_megabytes: int  # budget for recorded passes per style node; 0 records every step
    cache_on_cpu: bool

    def state_at(self, base_model, sigma: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def new_cache(self) -> ReferenceFeatureCache | None:
        if self.cache_megabytes == 0:
            return None
        return ReferenceFeatureCache(self.cache_megabytes * 2**20, torch.device("cpu") if self.cache_on_cpu else None)

    def latent_shape(self) -> torch.Size:
        raise NotImplementedError

    def model_inputs(self, base_model, noisy: torch.Tensor) -> dict:
        """apply_model's keyword inputs (c_crossattn, y, ...) for the reference, batch 1."""
        conds = comfy.sampler_helpers.convert_cond(self.conditioning)
        conds = comfy.samplers.encode_model_conds(base_model.extra_conds, conds, noisy, noisy.device, "positive")
        return {
            name: cond.process_cond(batch_size=1, device=noisy.device, area=None).cond
            for name, cond in conds[0]["model_conds"].items()
        }

    def validate_for(self, model: comfy.model_patcher.ModelPatcher, input_name: str) -> None:
        shape = self.latent_shape()
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


@dataclass(frozen=True, kw_only=True)
class LatentReference(ExternalReference):
    """Forward-noised to each sigma with noise drawn once from a seed."""

    latent: torch.Tensor  # (1, C, H, W), as a LATENT holds it (before the model's latent scaling)
    noise: torch.Tensor  # same shape

    def state_at(self, base_model, sigma: torch.Tensor) -> torch.Tensor:
        clean = base_model.process_latent_in(self.latent)
        return base_model.model_sampling.noise_scaling(sigma, self.noise, clean)

    def latent_shape(self) -> torch.Size:
        return self.latent.shape


@dataclass(frozen=True, kw_only=True)
class InversionReference(ExternalReference):
    """At each sigma, the latent its DDIM inversion reached there (sample with the inversion's schedule)."""

    trajectory: InversionTrajectory

    def state_at(self, base_model, sigma: torch.Tensor) -> torch.Tensor:
        return self.trajectory.latent_at(float(sigma[0]))

    def latent_shape(self) -> torch.Size:
        return self.trajectory.latents.shape[1:]


def reference_conditioning(clip, prompt: str, conditioning) -> list:
    if conditioning is None:
        conditioning = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
    if len(conditioning) != 1:
        raise ValueError(f"conditioning: expected a single conditioning entry, got {len(conditioning)}")
    return conditioning


@dataclass(frozen=True)
class ReferencePass:
    """apply_model wrapper around each model call while the style is active.

    With an external reference it first runs the reference alone, recording its features, then the
    targets replaying them. With shared norms it tells them the call's batch layout and store.
    """

    reference: ExternalReference | None
    active_range: SigmaRange
    norm_call: ModelCallSlot | None = None
    cache: ReferenceFeatureCache | None = None

    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        if not self.active_range.contains(float(t[0])):
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        try:
            if self.reference is None:
                self._tell_norms(transformer_options["cond_or_uncond"], None)
                return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
            store = self._record_reference(executor, t[:1], x, transformer_options)
            self._tell_norms(transformer_options["cond_or_uncond"], store)
            options = {**transformer_options, REFERENCE_STORE_OPTION: store}
            return executor(x, t, c_concat, c_crossattn, control, options, **kwargs)
        finally:
            self._tell_norms(None, None)

    def _record_reference(self, executor, sigma, x, transformer_options) -> ReferenceFeatureStore:
        base_model = executor.class_obj
        key = (getattr(base_model, "current_weight_patches_uuid", None), float(sigma[0]))
        if self.cache is not None:
            cached = self.cache.get(key, x.device)
            if cached is not None:
                return cached
        reference_x = self.reference.state_at(base_model, sigma.cpu()).to(x)
        inputs = self.reference.model_inputs(base_model, reference_x)
        store = ReferenceFeatureStore()
        self._tell_norms([0], store)
        options = {**transformer_options, REFERENCE_STORE_OPTION: store, "cond_or_uncond": [0], "sigmas": sigma}
        executor(reference_x, sigma, inputs.pop("c_concat", None), inputs.pop("c_crossattn", None), None, options,
                 **inputs)
        if self.cache is not None:
            self.cache.put(key, store)
        return store.replay()

    def _tell_norms(self, cond_or_uncond, store) -> None:
        if self.norm_call is not None:
            self.norm_call.current = None if cond_or_uncond is None else ModelCall(cond_or_uncond, store)


def install_reference_pass(model: comfy.model_patcher.ModelPatcher, reference: ExternalReference | None,
                           active_range: SigmaRange, norm_call: ModelCallSlot | None = None) -> None:
    cache = None if reference is None else reference.new_cache()
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, REFERENCE_PASS_WRAPPER_KEY,
                               ReferencePass(reference, active_range, norm_call, cache))
    if cache is not None:
        model.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_DETACH, REFERENCE_PASS_WRAPPER_KEY,
                                    ClearOnUnload(cache))


@dataclass(frozen=True)
class ClearOnUnload:
    """ModelPatcher detach callback. ComfyUI also detaches a model (unpatch_all False) when it swaps in
    the next sampling run's clone of it; only a real unload (unpatch_all True) drops the recordings."""

    cache: ReferenceFeatureCache

    def __call__(self, patcher, unpatch_all: bool) -> None:
        if unpatch_all:
            self.cache.clear()


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
        if samples.ndim != 4 or samples.shape[0] != 1:
            raise ValueError(
                f"latent: expected one image latent of shape (1, C, H, W), got {tuple(samples.shape)}; "
                "pick one image with Latent From Batch"
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
