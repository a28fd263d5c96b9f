"""Wall time of Visual Style Prompting and StyleAligned on Flux against plain sampling, in one run.

Full-width Flux.1 blocks (hidden 3072, 24 heads, RoPE axes 16+56+56, T5 and CLIP-L widths), few of them
(Flux.1 has 19 double and 38 single): every block is styled (layers all_blocks), so the ratio is the
per-block cost, which a 57-block model shares. Flux dev's way: cfg 1, item 0 of the batch the in-batch
reference. Ratios are (time) / (plain time), best of --repeats after a warm-up (which also records a
cached reference).

    make bench                   # CPU: 256x256 (256 image tokens) + 64 text tokens, batch 2, 1 double + 1 single
                                 # block, 1 step (one full-width forward takes ~10 s on 2 cores)
    python bench/flux.py --gpu   # 1024x1024 (4096 image tokens) + 256 text tokens (ComfyUI pads Flux's T5
                                 # prompt to 256), batch 3, 1 double + 2 single blocks, 20 steps, bf16
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (prepares the ComfyUI host the same way)

import torch  # noqa: E402

import comfy.model_management  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.supported_models  # noqa: E402
import random_dits  # noqa: E402
import random_models  # noqa: E402
from helpers import run_node, style_aligned, vsp  # noqa: E402

T5, CLIP_L = 4096, 768
SIZES = {"gpu": {"side": 1024, "steps": 20, "text": 256, "batch": 3, "single": 2},
         "cpu": {"side": 256, "steps": 1, "text": 64, "batch": 2, "single": 1}}
SIZE = SIZES["gpu" if bench.GPU else "cpu"]
BATCH, TEXT_TOKENS = SIZE["batch"], SIZE["text"]


def full_width_flux():
    config = random_dits.tiny_flux_config(hidden_size=3072, num_heads=24, axes_dim=[16, 56, 56], depth=1,
                                          depth_single_blocks=SIZE["single"], context_in_dim=T5, vec_in_dim=CLIP_L)
    dtype = torch.bfloat16 if bench.GPU else torch.float32
    return random_models.model_patcher(comfy.supported_models.Flux(config), 0, dtype, None)


def conditioning(batch, seed):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(batch, TEXT_TOKENS, T5, generator=g),
             {"pooled_output": torch.randn(batch, CLIP_L, generator=g), "guidance": 3.5}]]


def reference(side, cache_megabytes):
    (made,) = run_node("StyleReferenceLatent", latent={"samples": torch.randn(1, 16, side // 8, side // 8)}, clip=None,
                       prompt="", reference_seed=0, cache_megabytes=cache_megabytes, cache_on_cpu=False,
                       conditioning=conditioning(1, 3))
    return made


def measure(side, steps, repeats):
    model = full_width_flux()
    latent = torch.zeros(BATCH, 16, side // 8, side // 8)
    positive, negative = conditioning(BATCH, 1), conditioning(BATCH, 2)
    cached, uncached = reference(side, 4096), reference(side, 0)
    blocks = {"layers": "all_blocks"}
    configurations = {
        "plain": model,
        "VSP in-batch": vsp(model, **blocks),
        "VSP reference latent, cached": vsp(model, cached, **blocks),
        "VSP reference latent, uncached": vsp(model, uncached, **blocks),
        "StyleAligned in-batch": style_aligned(model, shared_score_scale=1.1, **blocks),
        "StyleAligned reference latent, cached": style_aligned(model, cached, shared_score_scale=1.1, **blocks),
        "StyleAligned reference latent, uncached": style_aligned(model, uncached, shared_score_scale=1.1, **blocks),
    }
    noise = comfy.sample.prepare_noise(latent, 0)
    times = {label: bench.timed(lambda m=m: comfy.sample.sample(m, noise, steps, 1.0, "euler", "simple", positive,
                                                               negative, latent, disable_pbar=True, seed=0), repeats)
             for label, m in configurations.items()}
    bench.print_table(f"Flux, full width, 1 double + {SIZE['single']} single blocks (all styled), {side}x{side} ({side // 16}x"
                      f"{side // 16} image tokens + {TEXT_TOKENS} text), batch {BATCH} at cfg 1, {steps} steps, "
                      f"{bench.device_name()}; cached runs replay the reference recorded by the warm-up run",
                      times, "plain")
    comfy.model_management.unload_all_models()


def main():
    bench.bench_main(__doc__, *(lambda repeats, size=size: measure(size["side"], size["steps"], repeats)
                                for size in (SIZES["gpu"], SIZES["cpu"])))


if __name__ == "__main__":
    main()
