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
    """(the loop's latent on ComfyUI's intermediate device, the loop's result)."""
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
        results.append(result)
        return latent.to(x)

    samples = comfy.sample.fix_empty_latent_channels(model, samples)
    out = guider.sample(torch.zeros_like(samples), samples, comfy.samplers.KSAMPLER(sampler_function), sigmas,
                        callback=preview, disable_pbar=True, seed=0)
    return out.to(comfy.model_management.intermediate_device()), results[0]
