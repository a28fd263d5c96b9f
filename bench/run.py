"""Wall time of the style nodes against plain sampling of the same images, in one run.

Each configuration samples a batch of 4 (item 0 is the in-batch reference) with cfg, so every model
call carries 8 images. Ratios are (style time) / (plain time), best of --repeats after a warm-up.
Then DDIM inversion of one image against sampling it with the same steps at cfg 1.

    make bench                       # tiny UNet at 64x64 and full-size random SD1.5 at 256x256 on CPU
    python bench/run.py --gpu        # real sizes on a GPU: SD1.5 at 512x512, SDXL at 1024x1024

The other benches import this one for what they share: the host's preparation, timed, print_table, bench_main,
and for the DiTs (flux.py, sd3.py, qwen_image.py) dit_sizes and dit_style_ratios.
"""

import argparse
import copy
import sys
import time
from pathlib import Path

DRY_RUN = "--dry-run" in sys.argv  # the DiT benches: the --gpu run's models and batch on the CPU, at a tiny image
GPU = "--gpu" in sys.argv and not DRY_RUN
REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "scripts"), str(REPO / "tests")]  # the tests' node helpers drive the nodes here too
import comfyui_host  # noqa: E402

comfyui_host.prepare(cpu=not GPU)

import asyncio  # noqa: E402

import torch  # noqa: E402

import comfy.model_management  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.supported_models  # noqa: E402
import nodes  # noqa: E402
import random_models  # noqa: E402
from helpers import run_node, style_aligned, vsp  # noqa: E402

BATCH = 4


def build(name):
    """(model patcher, context dim, pooled dim) with random weights; no text encoder is needed."""
    if name == "tiny":
        return random_models.tiny_sd15(seed=0).model, 32, None
    if name == "sd15":
        config = comfy.supported_models.SD15(copy.deepcopy(random_models.FULL_SD15_UNET))
        return random_models.model_patcher(config, seed=0), 768, None
    config = comfy.supported_models.SDXL(copy.deepcopy(random_models.FULL_SDXL_UNET))
    return random_models.model_patcher(config, seed=0), 2048, 1280


def conditioning(context_dim, pooled_dim, batch, seed):
    g = torch.Generator().manual_seed(seed)
    extras = {} if pooled_dim is None else {"pooled_output": torch.randn(batch, pooled_dim, generator=g)}
    return [[torch.randn(batch, 77, context_dim, generator=g), extras]]


def timed(job, repeats):
    best = float("inf")
    for _ in range(repeats + 1):  # the first run warms up (loading, allocator, kernels, reference recording)
        if GPU:
            torch.cuda.synchronize()
        started = time.perf_counter()
        job()
        if GPU:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return best


def timed_in_turn(jobs: dict, repeats: int) -> dict:
    """Best of repeats per job after one warm-up each, the jobs taking turns (plain, styled, ..., plain, styled, ...):
    a slow spell of the machine then falls on every configuration alike rather than on whichever ran during it."""
    for job in jobs.values():  # the warm-ups (loading, allocator, kernels, a cached reference's recording)
        job()
    times = dict.fromkeys(jobs, float("inf"))
    for _ in range(repeats):
        for label, job in jobs.items():
            times[label] = min(times[label], timed(job, 0))
    return times


def timed_sample(model, positive, negative, latent, steps, repeats, cfg=7.0):
    noise = comfy.sample.prepare_noise(latent, 0)
    return timed(lambda: comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", positive, negative, latent,
                                             disable_pbar=True, seed=0), repeats)


def reference_latent(side, context_dim, pooled_dim, cache_megabytes):
    return latent_reference((1, 4, side // 8, side // 8), conditioning(context_dim, pooled_dim, 1, 3), cache_megabytes)


def latent_reference(shape, reference_conditioning, cache_megabytes):
    """A Style Reference (Latent) of a random latent of shape: cached (recorded by its first run) or not (0 MB)."""
    (reference,) = run_node("StyleReferenceLatent", latent={"samples": torch.randn(shape)}, clip=None, prompt="",
                            reference_seed=0, cache_megabytes=cache_megabytes, cache_on_cpu=False,
                            conditioning=reference_conditioning)
    return reference


def style_configurations(model, cached, uncached, vsp_options=None, aligned_options=None):
    """Plain, then VSP and StyleAligned in-batch and from the cached and the uncached reference."""
    vsp_options, aligned_options = vsp_options or {}, aligned_options or {}
    return {
        "plain": model,
        "VSP in-batch": vsp(model, **vsp_options),
        "VSP reference latent, cached": vsp(model, cached, **vsp_options),
        "VSP reference latent, uncached": vsp(model, uncached, **vsp_options),
        "StyleAligned in-batch": style_aligned(model, **aligned_options),
        "StyleAligned reference latent, cached": style_aligned(model, cached, **aligned_options),
        "StyleAligned reference latent, uncached": style_aligned(model, uncached, **aligned_options),
    }


def device_name() -> str:
    return f"GPU {torch.cuda.get_device_name()}" if GPU else f"CPU ({torch.get_num_threads()} threads)"


def bench_main(description: str, gpu_runs, cpu_runs, gpu_help="real sizes on CUDA: SD1.5 512x512, SDXL 1024x1024",
               dry_run=False) -> None:
    """The benches' command line: --gpu runs gpu_runs(repeats), else cpu_runs(repeats), after the nodes load.
    With dry_run the bench takes --dry-run: gpu_runs(0) on the CPU, its sizes from dit_sizes."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help=gpu_help)
    parser.add_argument("--repeats", type=int, default=2)
    if dry_run:
        parser.add_argument("--dry-run", action="store_true", help="the --gpu run's models (width, blocks, bfloat16) "
                            "and batch on the CPU at a 64x64 image, 8 text tokens, 1 step, each configuration "
                            "once (a cached one twice): checks the GPU path without a GPU (minutes: bfloat16 is slow "
                            "on a CPU)")
    options = parser.parse_args()
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    if DRY_RUN:
        gpu_runs(0)
    else:
        (gpu_runs if options.gpu else cpu_runs)(options.repeats)


def dit_sizes(gpu: dict, cpu: dict) -> dict:
    """This run's sizes (side, steps, text tokens, batch, blocks...): cpu's, gpu's with --gpu (plus bfloat16), and
    with --dry-run gpu's at a 64x64 image, 8 text tokens and 1 step."""
    if DRY_RUN:
        return {**gpu, "side": 64, "text": 8, "steps": 1, "dtype": torch.bfloat16}
    return {**gpu, "dtype": torch.bfloat16} if GPU else {**cpu, "dtype": torch.float32}


def dit_style_ratios(model, latent_shape, conditioning_of, steps, cfg, repeats, title):
    """VSP and StyleAligned (shared_score_scale 1.1) on every block of a DiT (layers all_blocks: the ratio is the
    per-block cost) against plain sampling of zeros of latent_shape, euler on the simple schedule at cfg, best of
    repeats after a warm-up run (which also records the cached reference, a latent of one item's shape), the
    configurations taking turns (timed_in_turn);
    conditioning_of(batch, seed). Prints the table under title, the device added."""
    reference_shape, batch = (1, *latent_shape[1:]), latent_shape[0]
    # a budget that keeps every step's recording at --gpu sizes (Flux's: 3 sites x 20 steps x ~80 MB; 4096 MB did not)
    cached, uncached = (latent_reference(reference_shape, conditioning_of(1, 3), mb) for mb in (16384, 0))
    blocks = {"layers": "all_blocks"}
    configurations = style_configurations(model, cached, uncached, blocks, {**blocks, "shared_score_scale": 1.1})
    latent = torch.zeros(latent_shape)
    positive, negative = conditioning_of(batch, 1), conditioning_of(batch, 2)
    noise = comfy.sample.prepare_noise(latent, 0)
    jobs = {label: (lambda m=m: comfy.sample.sample(m, noise, steps, cfg, "euler", "simple", positive, negative, latent,
                                                     disable_pbar=True, seed=0))
            for label, m in configurations.items()}
    if DRY_RUN:  # each once, a cached one twice (records, replays)
        times = {label: timed(job, int(label.endswith(", cached"))) for label, job in jobs.items()}
    else:
        times = timed_in_turn(jobs, repeats)
    note = "dry run of --gpu, each run once, a cached one twice (records, replays): the times mean nothing" \
        if DRY_RUN else "cached runs replay the reference recorded by the warm-up run"
    print_table(f"{title}, {device_name()}; {note}", times, "plain")
    comfy.model_management.unload_all_models()


def print_table(title, times, baseline):
    print(f"\n{title}")
    for label, seconds in times.items():
        print(f"  {label:44s} {seconds:8.2f} s   {seconds / times[baseline]:5.2f}x {baseline}")


def run(name, side, steps, inversion_steps, repeats):
    model, context_dim, pooled_dim = build(name)
    latent = torch.zeros(BATCH, 4, side // 8, side // 8)
    positive = conditioning(context_dim, pooled_dim, BATCH, 1)
    negative = conditioning(context_dim, pooled_dim, BATCH, 2)
    cached = reference_latent(side, context_dim, pooled_dim, 2048)
    uncached = reference_latent(side, context_dim, pooled_dim, 0)
    configurations = style_configurations(model, cached, uncached)
    times = {label: timed_sample(m, positive, negative, latent, steps, repeats) for label, m in configurations.items()}
    print_table(f"{name} UNet, {side}x{side} ({side // 8}x{side // 8} latents), batch {BATCH} with cfg, {steps} steps, "
                f"{device_name()}; cached runs replay the reference recorded by the warm-up run", times, "plain")

    one = torch.randn(1, 4, side // 8, side // 8)
    single_positive, single_negative = conditioning(context_dim, pooled_dim, 1, 4), conditioning(context_dim, pooled_dim, 1, 5)
    inversion_times = {
        "sampling, cfg 1": timed_sample(model, single_positive, single_negative, torch.zeros_like(one), inversion_steps,
                                        repeats, cfg=1.0),
        "DDIM inversion, cfg 1": timed(lambda: run_node("DDIMInversion", model=model, latent={"samples": one},
                                                         positive=single_positive, negative=single_negative,
                                                         steps=inversion_steps, cfg=1.0, scheduler="normal"), repeats),
    }
    print_table(f"{name} UNet, one image, {inversion_steps} steps", inversion_times, "sampling, cfg 1")
    comfy.model_management.unload_all_models()


def main():
    def gpu(repeats):
        run("sd15", 512, 20, 50, repeats)
        run("sdxl", 1024, 20, 50, repeats)

    def cpu(repeats):
        run("tiny", 64, 10, 50, max(repeats, 5))  # fast enough to take the best of more runs
        run("sd15", 256, 3, 10, repeats)

    bench_main(__doc__, gpu, cpu)


if __name__ == "__main__":
    main()
