"""Fitting a style LoRA inside ComfyUI (the loop itself is lora_fit/objective.py).

The adapters are comfy.weight_adapter LoRA modules attached to a clone as ModelPatcher weight
wrappers (as core's TrainLoraNode does); the loop runs as a sampler in the guided-loop glue, so the
model is loaded, conditioned and patched exactly as for sampling, with ComfyUI's preview and
interrupt at every step. The input MODEL is never modified.
"""

import dataclasses
from dataclasses import dataclass

import torch

import comfy.lora
import comfy.model_management
import comfy.model_sampling
import comfy.utils
import node_helpers
from comfy.ldm.models.autoencoder import DiagonalGaussianRegularizer
from comfy.weight_adapter.lora import LoraDiff

from ..lora_fit.lora_file import lora_tensors
from ..lora_fit.objective import FitSettings, fit, initial_lora
from .guided_loop import run_guided_loop

TRAINING_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class FittedLoRA:
    tensors: dict[str, torch.Tensor]  # the LoRA file's tensors
    losses: list[float]
    prediction: str


def frozen(weight: torch.Tensor) -> torch.Tensor:
    """A weight autograd may save but never trains: a model loaded under torch.inference_mode (as
    ComfyUI's executor loads every model) holds inference tensors, which autograd refuses to save."""
    weight = weight.detach()
    return weight.clone() if weight.is_inference() else weight


def freeze_weights(patcher) -> None:
    """Every UNet weight of patcher (a clone) through `frozen`, so autograd can run through the model."""
    for name, module in patcher.model.named_modules():
        if name.startswith("diffusion_model.") and hasattr(module, "weight_function"):
            for part in ("weight", "bias"):
                if getattr(module, part, None) is not None:
                    patcher.add_weight_wrapper(f"{name}.{part}", frozen)


def linear_layers(model) -> dict[str, torch.nn.Module]:
    """The UNet's linear layers by ComfyUI's names ("diffusion_model.input_blocks.1.1...attn1.to_q")."""
    return {name: module for name, module in model.model.named_modules()
            if name.startswith("diffusion_model.") and isinstance(module, torch.nn.Linear)
            and hasattr(module, "weight_function")}


def lora_keys(model, names: list[str]) -> dict[str, str]:
    """The kohya-style key each layer is saved under: diffusers' naming (lora_unet_down_blocks_0_...),
    as most LoRA files and tools have it, where ComfyUI maps the architecture; ComfyUI's own otherwise.
    Stock LoraLoader reads both."""
    to_diffusers = {f"diffusion_model.{ldm}": key for key, ldm in
                    comfy.utils.unet_to_diffusers(model.model.model_config.unet_config).items()
                    if key.endswith(".weight")}
    keys = {}
    for name in names:
        diffusers_key = to_diffusers.get(f"{name}.weight")
        path = diffusers_key[: -len(".weight")] if diffusers_key else name[len("diffusion_model."):]
        keys[name] = "lora_unet_" + path.replace(".", "_")
    return keys


def prediction_of(model) -> str:
    sampling = model.get_model_object("model_sampling")
    unsupported = (comfy.model_sampling.EDM, comfy.model_sampling.X0, comfy.model_sampling.CONST)
    if not isinstance(sampling, comfy.model_sampling.ModelSamplingDiscrete) or isinstance(sampling, unsupported) \
            or not isinstance(sampling, comfy.model_sampling.EPS):
        raise ValueError("model: FitStyleLoRA fits eps- and v-prediction models with a discrete training schedule "
                         f"(SD1.x, SD2.x, SDXL); this one samples as {type(sampling).__name__}")
    return "v" if isinstance(sampling, comfy.model_sampling.V_PREDICTION) else "eps"


def latent_distribution(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(mean, std) of the VAE's latent distribution for each image; std is None where the VAE has no
    Gaussian posterior to read (VAE Encode gives the mean). The posterior's moments are read with a
    forward hook on the VAE's regulariser, removed before returning."""
    regularizer = getattr(vae.first_stage_model, "regularization", None)
    if not isinstance(regularizer, DiagonalGaussianRegularizer):
        return vae.encode(pixels), None
    moments = []
    handle = regularizer.register_forward_hook(lambda module, args, output: moments.append(args[0].detach()))
    try:
        mean = vae.encode(pixels)
    finally:
        handle.remove()
    moments = torch.cat(moments).float().to(mean.device) if moments else None
    if moments is None or moments.shape[0] != mean.shape[0] or moments.shape[2:] != mean.shape[2:]:
        return mean, None  # encoded in tiles: no single posterior to sample
    logvar = moments.chunk(2, dim=1)[1].clamp(-30.0, 20.0)
    return mean, (0.5 * logvar).exp()


def with_size(conditioning, height: int, width: int):
    """SDXL's size conditioning for the image (other models ignore it), tensors copied out of inference mode."""
    sized = node_helpers.conditioning_set_values(conditioning, {
        "width": width, "height": height, "target_width": width, "target_height": height, "crop_w": 0, "crop_h": 0})
    return [[embedding.clone(), {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in extras.items()}]
            for embedding, extras in sized]


def resolve_dtype(name: str) -> torch.dtype:
    device = comfy.model_management.get_torch_device()
    if TRAINING_DTYPES[name] is not None:
        return TRAINING_DTYPES[name]
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.bfloat16 if cuda_bf16 else torch.float32


def computing_in(model, dtype: torch.dtype):
    """model itself where it computes in dtype already (float32 runs as before), else a clone whose layers
    cast their stored weights to dtype as they run."""
    if (model.get_model_object("manual_cast_dtype") or model.model.get_dtype()) == dtype:
        return model
    patched = model.clone()
    patched.set_model_compute_dtype(dtype)
    return patched


def fit_style_lora(model, positive, mean: torch.Tensor, std: torch.Tensor | None, targets: list[str], rank: int,
                   alpha: float, settings: FitSettings, training_dtype: str = "auto", on_loss=None) -> FittedLoRA:
    """Fits rank-`rank` adapters on `targets` (linear_layers names) to the latents (VAE space, before
    the model's latent scaling); std None fits on the mean."""
    prediction = prediction_of(model)
    sampling = model.get_model_object("model_sampling")
    latent_format = model.get_model_object("latent_format")
    height, width = mean.shape[-2] * 8, mean.shape[-1] * 8
    with torch.inference_mode(False):
        trainee = model.clone()
        trainee.set_model_compute_dtype(resolve_dtype(training_dtype))
        freeze_weights(trainee)
        layers = linear_layers(trainee)
        adapters = {}
        for name, (up, down) in zip(targets, initial_lora([tuple(layers[n].weight.shape) for n in targets],
                                                          rank, settings.seed)):
            adapters[name] = LoraDiff((up, down, alpha, None, None, None)).train().requires_grad_(True)
            trainee.add_weight_wrapper(f"{name}.weight", adapters[name])
        parameters = [p for adapter in adapters.values() for p in (adapter.lora_up.weight, adapter.lora_down.weight)]
        mean = mean.clone().float()
        if std is None:  # no posterior to sample: fit on the mean
            settings, spread = dataclasses.replace(settings, sample_latent=False), torch.zeros_like(mean)
        else:  # the posterior's spread in the model's latent space (its latent scaling is affine)
            spread = latent_format.process_in(mean + std.to(mean)) - latent_format.process_in(mean)
        sigma_table = sampling.sigmas.detach().float().cpu()

        def fit_loop(denoise, x, sigmas, on_step):
            def step_done(step, loss, x_t, denoised):
                if on_loss is not None:
                    on_loss(step, loss)
                on_step(step, x_t, denoised)  # ComfyUI's preview and interrupt check

            losses = fit(denoise, x, spread.to(x), sigma_table, prediction, parameters, settings, step_done)
            return x, losses

        schedule = torch.linspace(float(sampling.sigma_max), float(sampling.sigma_min), settings.steps + 1)
        positive = with_size(positive, height, width)
        _, losses = run_guided_loop(trainee, positive, positive, 1.0, schedule, mean, fit_loop)
        keys = lora_keys(trainee, targets)
        tensors = lora_tensors({keys[n]: (a.lora_up.weight.cpu(), a.lora_down.weight.cpu()) for n, a in adapters.items()},
                               alpha)
    return FittedLoRA(tensors=tensors, losses=losses, prediction=prediction)


def with_lora(model, tensors: dict[str, torch.Tensor]):
    """model with the LoRA applied at strength 1, the way stock LoraLoaderModelOnly applies a file."""
    patches = comfy.lora.load_lora(tensors, comfy.lora.model_lora_keys_unet(model.model, {}))
    patched = model.clone()
    loaded = patched.add_patches(patches, 1.0)
    if len(loaded) != len(patches):
        raise RuntimeError(f"only {len(loaded)} of {len(patches)} fitted layers could be applied to the model")
    return patched
