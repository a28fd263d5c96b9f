"""Seconds per FitStyleLoRA step against one sampling step of the same batch, in one run.

A fit step is a forward and a backward through the UNet; a backward costs about two forwards, so the
ratio to compare with is 3.0. The sampling step runs at cfg 1 (one forward of the same image).

    make bench                        # tiny UNet and full-size random SD1.5, 64x64 latents, on CPU
    python bench/fit_lora.py --gpu    # the paper's fit on a GPU: 200 steps at 512x512, SD1.5 shapes
"""

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

GPU = "--gpu" in sys.argv
REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "scripts"), str(REPO / "tests")]
import comfyui_host  # noqa: E402

comfyui_host.prepare(cpu=not GPU)

import asyncio  # noqa: E402

import torch  # noqa: E402

import comfy.model_management  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.supported_models  # noqa: E402
import nodes  # noqa: E402
import random_models  # noqa: E402


def build(name):
    if name == "tiny":
        return random_models.tiny_sd15(seed=0).model, 32
    config = comfy.supported_models.SD15(copy.deepcopy(random_models.FULL_SD15_UNET))
    return random_models.model_patcher(config, seed=0), 768


def synchronize():
    if GPU:
        torch.cuda.synchronize()


def fit_step_seconds(model, context_dim, side, steps):
    """(median seconds per step after the first, whole fit's seconds)."""
    glue = comfyui_host.pack_submodule("glue.lora_fit")
    targets = comfyui_host.pack_submodule("lora_fit.targets")
    objective = comfyui_host.pack_submodule("lora_fit.objective")
    layers = targets.select_targets(list(glue.linear_layers(model)), targets.DEFAULT_TARGETS)
    mean = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(0))
    positive = [[torch.randn(1, 77, context_dim, generator=torch.Generator().manual_seed(1)), {}]]
    stamps = []

    def on_loss(step, loss):  # the loop reads the loss every step, so the device is synchronised here
        stamps.append(time.perf_counter())

    started = time.perf_counter()
    glue.fit_style_lora(model, positive, mean, 0.1 * torch.ones_like(mean), layers, 16, 16.0,
                        objective.FitSettings(steps=steps), on_loss=on_loss)
    synchronize()
    total = time.perf_counter() - started
    return statistics.median(b - a for a, b in zip(stamps, stamps[1:])), total


def sampling_step_seconds(model, context_dim, side, steps):
    latent = torch.zeros(1, 4, side, side)
    positive = [[torch.randn(1, 77, context_dim), {}]]
    noise = comfy.sample.prepare_noise(latent, 0)
    best = float("inf")
    for _ in range(2):  # the first run warms up
        synchronize()
        started = time.perf_counter()
        comfy.sample.sample(model, noise, steps, 1.0, "euler", "normal", positive, positive, latent, disable_pbar=True,
                            seed=0)
        synchronize()
        best = min(best, time.perf_counter() - started)
    return best / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="200 fit steps at 512x512 on SD1.5 shapes, CUDA")
    options = parser.parse_args()
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    runs = [("sd15", 200, 20)] if options.gpu else [("tiny", 30, 10), ("sd15", 4, 2)]
    device = f"GPU {torch.cuda.get_device_name()}" if GPU else f"CPU ({torch.get_num_threads()} threads)"
    print(f"FitStyleLoRA, rank 16 on q/k/v/out of every attention layer, batch 1, 64x64 latents, {device}")
    for name, fit_steps, sample_steps in runs:
        model, context_dim = build(name)
        sample = sampling_step_seconds(model, context_dim, 64, sample_steps)
        step, total = fit_step_seconds(model, context_dim, 64, fit_steps)
        print(f"  {name:5s} fit step {step:8.3f} s   sampling step {sample:8.3f} s   ratio {step / sample:5.2f} "
              f"(a forward + backward is about 3.0)   {fit_steps}-step fit {total:7.1f} s")
        comfy.model_management.unload_all_models()


if __name__ == "__main__":
    main()
