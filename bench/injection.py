"""Wall time of DiffStyler's content injection against plain sampling of the same image, in one run.

One content image, inverted, sampled back from its inverted latent with cfg (2 images per model call)
on the inversion's schedule, with the default fractions (features 0.6, attention 0.5 of the steps):
- plain: the same model, no injection;
- source live: the content's source branch runs at every injected step (one more image per call);
- source cached: the node's cache replays what the warm-up run recorded;
- content features: recorded once by Record Content Features (on the CPU, or on the device), replayed.
Ratios are (time) / (plain time), best of --repeats after a warm-up.

    make bench                       # tiny UNet at 64x64 and full-size random SD1.5 at 256x256 on CPU
    python bench/injection.py --gpu  # SD1.5 at 512x512, SDXL at 1024x1024 on a GPU
"""

import sys
from pathlib import Path

GPU = "--gpu" in sys.argv
sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (prepares the ComfyUI host the same way)

import torch  # noqa: E402

import comfy.model_management  # noqa: E402
import comfy.sample  # noqa: E402
from helpers import run_node  # noqa: E402

SITES = {"attention_sites": "plug_and_play", "custom_attention_sites": "", "feature_sites": "plug_and_play",
         "custom_feature_sites": "", "cross_attention": False}


def injected(model, source, trajectory=None, features=None, cache_megabytes=0):
    (patched,) = run_node("StyleInjection", model=model, feature_fraction=0.6, attention_fraction=0.5, **SITES,
                          source_prompt="", cache_megabytes=cache_megabytes, cache_on_cpu=False, inversion=trajectory,
                          content_features=features, clip=None, conditioning=source)
    return patched


def run(name, side, steps, repeats):
    model, context_dim, pooled_dim = bench.build(name)
    content = torch.randn(1, 4, side // 8, side // 8, generator=torch.Generator().manual_seed(0))
    source = bench.conditioning(context_dim, pooled_dim, 1, 3)
    positive, negative = bench.conditioning(context_dim, pooled_dim, 1, 1), bench.conditioning(context_dim, pooled_dim, 1, 2)
    (inverted, trajectory) = run_node("DDIMInversion", model=model, latent={"samples": content}, positive=source,
                                      negative=source, steps=steps, cfg=1.0, scheduler="ddim_uniform")
    start = inverted["samples"]

    def record(keep_on_cpu):
        (features,) = run_node("RecordContentFeatures", model=model, inversion=trajectory, steps=steps,
                               scheduler="ddim_uniform", fraction=0.6, **SITES, source_prompt="", max_megabytes=1 << 16,
                               keep_on_cpu=keep_on_cpu, clip=None, conditioning=source)
        return features

    configurations = {
        "plain": model,
        "source live": injected(model, source, trajectory),
        "source cached": injected(model, source, trajectory, cache_megabytes=1 << 16),
        "content features on the CPU": injected(model, source, features=record(True)),
        "content features on the device": injected(model, source, features=record(False)),
    }

    def sample(m):
        return comfy.sample.sample(m, torch.zeros_like(start), steps, 10.5, "euler", "ddim_uniform", positive, negative,
                                   start, disable_noise=True, disable_pbar=True, seed=0)

    times = {label: bench.timed(lambda m=m: sample(m), repeats) for label, m in configurations.items()}
    device = bench.device_name()
    bench.print_table(f"{name} UNet, {side}x{side}, one content image with cfg, {steps} steps, {device}: injection "
                      "(features 0.6, attention 0.5) from the inverted latent", times, "plain")
    comfy.model_management.unload_all_models()


def main():
    def gpu(repeats):
        run("sd15", 512, 50, repeats)
        run("sdxl", 1024, 50, repeats)

    def cpu(repeats):
        run("tiny", 64, 10, max(repeats, 5))
        run("sd15", 256, 4, repeats)

    bench.bench_main(__doc__, gpu, cpu)


if __name__ == "__main__":
    main()
