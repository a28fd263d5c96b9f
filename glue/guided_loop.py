"""A pure loop run as a sampler inside ComfyUI's CFG guider, so model loading, conds, model patches,
LoRAs and ControlNet all apply, with ComfyUI's preview callback and interrupt check at every step.

DDIM inversion runs here; the LoRA fit and the value-input inversion will too.
"""

from collections.abc import Callable

import torch

import comfy.model_management
import comfy.sample
import comfy.samplers
import latent_preview

# loop(denoise, x, sigmas, on_step) -> (the latent to return, the loop's own result); denoise(x, sigma)
# is the guided denoised prediction, on_step(i, x, denoised) must be called after each step.
Loop = Callable[[Callable, torch.Tensor, torch.Tensor, Callable], tuple[torch.Tensor, object]]


def run_guided_loop(model, positive, negative, cfg: float, sigmas: torch.Tensor, samples: torch.Tensor,
                    loop: Loop) -> tuple[torch.Tensor, object]:
    """(the loop's latent on ComfyUI's intermediate device, the loop's result).

    The latent is the sampler's state where the loop stopped, in LATENT space (the model's
    process_latent_out), not what the guider returns: KSAMPLER.sample ends with
    model_sampling.inverse_noise_scaling(sigmas[-1], x), which on flow models (CONST: Flux, SD3, Qwen)
    divides by 1 - sigma, ComfyUI's convention for a latent with leftover noise (a later sampler's
    noise_scaling multiplies its latent image by 1 - sigma again). The top of an ascending schedule is
    sigma 1 exactly on those models: the division gives inf, and the state there can only enter a
    sampler as its noise (noise_scaling(1, noise, image) ignores the image). On eps and v-prediction models inverse_noise_scaling is the identity and this
    is the guider's own result bit for bit (the same float32 cast and process_latent_out on the same
    device); loops that end at sigma 0 divide by 1 on flow models too.
    """
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    preview = latent_preview.prepare_callback(model, len(sigmas) - 1)
    results = []

    def sampler_function(denoiser, x, sigmas, extra_args=None, callback=None, disable=None):
        def on_step(i, x, denoised):
            comfy.model_management.throw_exception_if_processing_interrupted()
            if callback is not None:
                callback({"i": i, "x": x, "denoised": denoised, "sigma": sigmas[i + 1], "sigma_hat": sigmas[i + 1]})

        latent, result = loop(lambda x, s: denoiser(x, s, **extra_args), x, sigmas, on_step)
        latent = latent.to(x)
        results.append((latent, result))
        return latent

    samples = comfy.sample.fix_empty_latent_channels(model, samples)
    guider.sample(torch.zeros_like(samples), samples, comfy.samplers.KSAMPLER(sampler_function), sigmas,
                  callback=preview, disable_pbar=True, seed=0)
    (latent, result), = results
    out = model.model.process_latent_out(latent.to(torch.float32))
    return out.to(comfy.model_management.intermediate_device()), result
