"""StyleDiffusion (Li et al. 2023): a real image inverted through the value input of cross-attention,
saved and loaded as a STYLE_INVERSION."""

import comfy.samplers
import comfy.utils
import folder_paths
from comfy_api.latest import io, ui

from ..attention_patches.layers import coarsest_level_layers
from ..glue.architectures import adapter_for
from ..glue.value_inversion import TRAINING_DTYPES, inversion_sigmas, prompt_embedding_inversion, vision_tokens
from ..inversion.style_inversion import load_style_inversion, save_style_inversion
from ..inversion.value_input import ATTENTION_TARGETS, ValueInversionSettings, iterations_at
from ..lora_fit.loss_plot import loss_plot
from .ddim_inversion import new_output_path, saved_files
from .fit_style_lora import progress_text
from .io_types import StyleInversion

STYLE_INVERSION_SUFFIX = ".style-inversion.safetensors"


def check_vision_input(clip_vision, image) -> None:
    if clip_vision is not None and image is None:
        raise ValueError("clip_vision: connected without image; connect the real image the latent was encoded "
                         "from (IMAGE) to train the mapping network, or disconnect clip_vision to train each "
                         "step's scale and shift directly")
    if image is not None and clip_vision is None:
        raise ValueError("image: connected without clip_vision; connect a CLIP vision model (Load CLIP Vision) "
                         "to train the mapping network from the image, or disconnect image")
    if image is not None and (image.ndim != 4 or image.shape[0] != 1):
        raise ValueError(f"image: expected one image (a batch of 1, height, width, channels), the one the latent "
                         f"was encoded from; got {tuple(image.shape)}")


def check_latent(model, samples) -> None:
    channels = model.get_model_object("latent_format").latent_channels
    if samples.ndim != 4 or samples.shape[0] != 1 or samples.shape[1] != channels:
        raise ValueError(f"latent: expected one image's latent (1, {channels}, height, width) from VAE Encode with "
                         f"this model's VAE, got {tuple(samples.shape)}")
    adapter_for(model, "PromptEmbeddingInversion").check_latent_size(*samples.shape[-2:], "latent")


class PromptEmbeddingInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PromptEmbeddingInversion",
            display_name="Prompt Embedding Inversion (StyleDiffusion)",
            category="style_attention/stylediffusion",
            description="Inverts a real image for prompt-to-prompt editing: a DDIM inversion with the source prompt, "
            "then, step by step from the noisiest, a per-token scale and shift of the prompt embedding that goes "
            "into the value projection of every cross-attention layer (keys keep the prompt, so its attention maps "
            "stay editable) is trained until guided sampling lands on the inversion's latents, the maps held to the "
            "inversion's. With a CLIP vision model and the image, the scale and shift come from the authors' "
            "mapping network of the image's CLIP vision tokens, trained instead. Outputs the STYLE_INVERSION and "
            "the latent the learned steps reconstruct.",
            inputs=[
                io.Model.Input("model", tooltip="The model to invert with (SD1.x, SD2.x, SDXL). Not modified."),
                io.Clip.Input("clip", tooltip="Encodes the source prompt."),
                io.Latent.Input("latent", tooltip="The real image, VAE-encoded (one image)."),
                io.String.Input("source_prompt", default="a cat sitting on a wall", multiline=True,
                                tooltip="What the image shows; edits change words of it."),
                io.Int.Input("steps", default=30, min=1, max=200,
                             tooltip="DDIM steps (the authors' 30); edit with the same steps and scheduler."),
                io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES, default="ddim_uniform",
                               tooltip="ddim_uniform is DDIM's schedule; edit with the same one."),
                io.Float.Input("guidance", default=7.5, min=1.0, max=30.0, step=0.1, round=0.01,
                               tooltip="The cfg the learned steps reconstruct at; edit with the same cfg."),
                io.Int.Input("inner_iterations", default=20, min=1, max=1000,
                             tooltip="N: step i trains ceil(N e^(-0.1 i)) iterations (README's command 20, "
                             "the code's default 100)."),
                io.Float.Input("learning_rate", default=0.01, min=1e-6, max=1.0, step=0.001, round=1e-6,
                               tooltip="Adam's rate at the first step, falling as 1 - i/100."),
                io.Float.Input("attention_weight", default=1.0, min=0.0, max=100.0, step=0.1,
                               tooltip="Weight of the attention regulariser (cross-attention maps of the coarsest "
                               "encoder/decoder level against the inversion's); 0 turns it off."),
                io.Combo.Input("attention_target", options=list(ATTENTION_TARGETS), default=ATTENTION_TARGETS[0],
                               tooltip="Which inversion step's maps a step is held to: the one that saw the same "
                               "latent (authors' code), or the one at the same sigma."),
                io.Boolean.Input("early_stop", default=True,
                                 tooltip="End a step once its loss is below 1e-5 + 2e-5 i (authors' code)."),
                io.Int.Input("max_megabytes", default=4096, min=1, max=1 << 20,
                             tooltip="Memory the inversion's attention maps may take on the CPU."),
                io.Combo.Input("training_dtype", options=list(TRAINING_DTYPES), default="auto",
                               tooltip="The model's compute dtype while inverting (the learned values stay "
                               "float32). auto: bfloat16 on a GPU that has it, float32 otherwise. float16: for "
                               "GPUs without bfloat16, with loss scaling so small gradients do not vanish."),
                io.ClipVision.Input("clip_vision", optional=True,
                                    tooltip="Optional (with image): a small network per step maps the image's "
                                    "CLIP vision tokens to the scale and shift (the authors' variant, there "
                                    "ViT-B/16); without it the scale and shift are trained directly."),
                io.Image.Input("image", optional=True,
                               tooltip="With clip_vision: the real image the latent was encoded from (one image)."),
            ],
            outputs=[
                StyleInversion.Output(display_name="style_inversion"),
                io.Latent.Output(display_name="reconstruction"),
                io.Image.Output(display_name="loss_curve"),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, clip, latent, source_prompt, steps, scheduler, guidance, inner_iterations, learning_rate,
                attention_weight, attention_target, early_stop, max_megabytes, training_dtype="auto",
                clip_vision=None, image=None) -> io.NodeOutput:
        samples = latent["samples"]
        check_latent(model, samples)
        check_vision_input(clip_vision, image)
        if not source_prompt.strip():
            raise ValueError("source_prompt: empty; describe what the image shows (edits change its words)")
        settings = ValueInversionSettings(inner_iterations=inner_iterations, learning_rate=learning_rate,
                                          attention_weight=attention_weight, early_stop=early_stop,
                                          attention_target=attention_target)
        layers = coarsest_level_layers(list(adapter_for(model, "PromptEmbeddingInversion").sites))
        planned = [iterations_at(settings, i) for i in range(len(inversion_sigmas(model, scheduler, steps)) - 1)]
        bar, done = comfy.utils.ProgressBar(sum(planned)), [0]
        show = progress_text(cls.hidden.unique_id if cls.hidden is not None else None)

        def on_iteration(i, iteration, loss):
            done[0] = sum(planned[:i]) + iteration + 1
            bar.update_absolute(done[0])
            show(f"step {i + 1}/{len(planned)}  iteration {iteration + 1}/{planned[i]}  loss {loss:.5f}")

        positive = clip.encode_from_tokens_scheduled(clip.tokenize(source_prompt))
        negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
        tokens = None if clip_vision is None else vision_tokens(clip_vision, image)
        reconstruction, inversion = prompt_embedding_inversion(
            model, positive, negative, samples, steps, scheduler, guidance, layers, settings, source_prompt,
            max_megabytes << 20, on_iteration, tokens, training_dtype)
        plot = loss_plot([step[-1] for step in inversion.losses],
                         f"PromptEmbeddingInversion: last loss of each of {len(planned)} steps "
                         f"({sum(map(len, inversion.losses))} iterations)")
        return io.NodeOutput(inversion, {**latent, "samples": reconstruction}, plot, ui=ui.PreviewImage(plot, cls=cls))


class SaveStyleInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SaveStyleInversion",
            display_name="Save Style Inversion",
            category="style_attention/stylediffusion",
            description="Writes a STYLE_INVERSION to output/ as .safetensors (atomically), so an image is inverted "
            "once. Move it to input/ (or pick the [output] entry) to load it.",
            inputs=[
                StyleInversion.Input("style_inversion", tooltip="From Prompt Embedding Inversion."),
                io.String.Input("filename_prefix", default="inversions/style",
                                tooltip="Path under the output folder, without extension."),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, style_inversion, filename_prefix) -> io.NodeOutput:
        save_style_inversion(style_inversion, new_output_path(filename_prefix, STYLE_INVERSION_SUFFIX))
        return io.NodeOutput()


class LoadStyleInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoadStyleInversion",
            display_name="Load Style Inversion",
            category="style_attention/stylediffusion",
            inputs=[io.Combo.Input("style_inversion", options=saved_files(STYLE_INVERSION_SUFFIX),
                                   tooltip="A style inversion saved by Save Style Inversion (input/ or [output]).")],
            outputs=[StyleInversion.Output(display_name="style_inversion")],
        )

    @classmethod
    def execute(cls, style_inversion) -> io.NodeOutput:
        return io.NodeOutput(load_style_inversion(folder_paths.get_annotated_filepath(style_inversion)))
