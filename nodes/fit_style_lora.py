"""FitStyleLoRA: DiffStyler's style LoRA, fitted on one style image and saved as a standard LoRA file."""

import os

import folder_paths
from comfy_api.latest import io, ui

from ..glue.lora_fit import TRAINING_DTYPES, fit_style_lora, latent_distribution, linear_layers, with_lora
from ..lora_fit.lora_file import save_lora
from ..lora_fit.loss_plot import loss_plot
from ..lora_fit.objective import FitSettings
from ..lora_fit.style_image import resized
from ..lora_fit.targets import DEFAULT_TARGETS, TARGET_PRESETS, select_targets

LATENT_SAMPLING = {"sample each step (authors' code)": True, "mean (as VAE Encode)": False}
DEFAULT_PROMPT = "painting of <sss>, girl"


def progress_text(node_id):
    """Sends 'step k/N  loss x' to the node in the frontend (ComfyUI's progress bar shows the step)."""
    try:
        from server import PromptServer
        server = PromptServer.instance
    except (ImportError, AttributeError):
        return lambda text: None
    if node_id is None or not hasattr(server, "send_progress_text"):
        return lambda text: None
    return lambda text: server.send_progress_text(text, node_id)


def check_inputs(image, rank, alpha, steps, batch_size, learning_rate):
    if image is None or image.ndim != 4 or image.shape[0] == 0 or image.shape[-1] not in (3, 4):
        shape = None if image is None else tuple(image.shape)
        raise ValueError(f"image: expected one style image or a small batch (batch, height, width, 3), got {shape}")
    for name, value, low in (("rank", rank, 1), ("steps", steps, 1), ("batch_size", batch_size, 1)):
        if value < low:
            raise ValueError(f"{name} must be at least {low}, got {value}")
    if not alpha > 0 or not learning_rate > 0:
        raise ValueError(f"alpha and learning_rate must be positive, got {alpha} and {learning_rate}")


class FitStyleLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FitStyleLoRA",
            display_name="Fit Style LoRA (DiffStyler)",
            category="style_attention/diffstyler",
            description="Fits a LoRA on the style image (DiffStyler: eps- or v-prediction MSE at random timesteps, "
            "AdamW at a constant rate) and saves it to models/loras/ as a standard LoRA file. Outputs the model "
            "with the LoRA applied, as LoraLoaderModelOnly would load the file.",
            inputs=[
                io.Model.Input("model", tooltip="The model to fit the LoRA on (SD1.x, SD2.x, SDXL). Not modified."),
                io.Clip.Input("clip", tooltip="Encodes the prompt."),
                io.Vae.Input("vae", tooltip="Encodes the style image."),
                io.Image.Input("image", tooltip="The style image (or a small batch of them, seen in turn)."),
                io.String.Input("prompt", default=DEFAULT_PROMPT, multiline=True,
                                tooltip="A rare token for the style and a coarse content word, as the paper's "
                                "'painting of <sss>, girl'. Sample with the same token."),
                io.Int.Input("resolution", default=512, min=0, max=4096, step=8,
                             tooltip="The image's short side in pixels for fitting (the authors' 512; SDXL: 1024). "
                             "No crop. 0 keeps the image's size."),
                io.Int.Input("rank", default=16, min=1, max=256, tooltip="LoRA rank (the paper's 16)."),
                io.Float.Input("alpha", default=16.0, min=0.01, max=1024.0, step=0.5,
                               tooltip="LoRA alpha: the update is scaled by alpha / rank. alpha = rank is the "
                               "authors' scale of 1."),
                io.Int.Input("steps", default=200, min=1, max=100000, tooltip="Optimizer steps (the paper's 200)."),
                io.Float.Input("learning_rate", default=2e-4, min=1e-7, max=1.0, step=1e-5, round=1e-7,
                               tooltip="AdamW's constant learning rate (the paper's 2e-4)."),
                io.Int.Input("batch_size", default=1, min=1, max=64,
                             tooltip="Noised copies per step, each with its own timestep and noise."),
                io.Combo.Input("target_modules", options=list(TARGET_PRESETS), default=DEFAULT_TARGETS,
                               tooltip="Which linear layers get an adapter: q/k/v/out of every attention layer as "
                               "the authors' code, q/k/v only as the paper says, self-attention only, or a "
                               "custom pattern."),
                io.String.Input("target_pattern", default="",
                                tooltip="For 'custom pattern': a regular expression searched in ComfyUI's layer "
                                "names, e.g. 'output_blocks.*attn1\\.to_[qkv]$'."),
                io.Combo.Input("latent_sampling", options=list(LATENT_SAMPLING),
                               default="sample each step (authors' code)",
                               tooltip="Each step draws a fresh sample of the VAE's latent distribution (the "
                               "authors), or fits the distribution's mean (what VAE Encode gives)."),
                io.Combo.Input("training_dtype", options=list(TRAINING_DTYPES), default="auto",
                               tooltip="The model's compute dtype while fitting (adapters stay float32). auto: "
                               "bfloat16 on a GPU that has it, float32 otherwise."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False,
                             tooltip="Seeds the adapters' start and every step's noise and timesteps: one seed, "
                             "one LoRA."),
                io.String.Input("filename_prefix", default="style_loras/style",
                                tooltip="Path under models/loras/, without extension; a counter is appended and "
                                "no file is overwritten."),
            ],
            outputs=[
                io.Model.Output(display_name="model"),
                io.String.Output(display_name="lora_name"),
                io.Image.Output(display_name="loss_curve"),
            ],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, clip, vae, image, prompt, resolution, rank, alpha, steps, learning_rate, batch_size,
                target_modules, target_pattern, latent_sampling, training_dtype, seed, filename_prefix) -> io.NodeOutput:
        check_inputs(image, rank, alpha, steps, batch_size, learning_rate)
        if latent_sampling not in LATENT_SAMPLING:
            raise ValueError(f"latent_sampling must be one of {list(LATENT_SAMPLING)}, not {latent_sampling!r}")
        targets = select_targets(list(linear_layers(model)), target_modules, target_pattern)
        mean, std = latent_distribution(vae, resized(image[..., :3], resolution))
        settings = FitSettings(steps=steps, batch_size=batch_size, learning_rate=learning_rate, seed=seed,
                               sample_latent=LATENT_SAMPLING[latent_sampling])
        show = progress_text(cls.hidden.unique_id if cls.hidden is not None else None)
        fitted = fit_style_lora(model, clip.encode_from_tokens_scheduled(clip.tokenize(prompt)), mean, std, targets,
                                rank, alpha, settings, training_dtype,
                                on_loss=lambda step, loss: show(f"step {step + 1}/{steps}  loss {loss:.4f}"))
        folder = folder_paths.get_folder_paths("loras")[0]
        path = save_lora(fitted.tensors, folder, filename_prefix, {
            "rank": rank, "alpha": alpha, "steps": steps, "learning_rate": learning_rate, "batch_size": batch_size,
            "prompt": prompt, "seed": seed, "targets": target_modules, "target_pattern": target_pattern,
            "latent_sampling": latent_sampling if std is not None else "mean (as VAE Encode)",
            "resolution": resolution, "prediction": fitted.prediction})
        lora_name = os.path.relpath(path, folder)
        plot = loss_plot(fitted.losses, f"FitStyleLoRA {os.path.basename(path)}: {steps} steps, rank {rank}")
        return io.NodeOutput(with_lora(model, fitted.tensors), lora_name, plot, ui=ui.PreviewImage(plot, cls=cls))
