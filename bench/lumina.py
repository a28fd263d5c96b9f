"""Wall time of Visual Style Prompting and StyleAligned on Z-Image and Lumina Image 2.0 against plain sampling, in one run.

Full-width blocks, few of them, every main layer styled (layers all_blocks), so the ratio is the per-block cost,
which the whole model shares: Z-Image (hidden 3840 = 30 heads of 128, axes 32+48+48, caption and image padded to
multiples of 32, Qwen3-4B's 2560-wide text; 30 layers in the real model) and Lumina Image 2.0 (hidden 2304 = 24
heads of 128 with 8 key/value heads, Gemma 2's 2304-wide text; 26 layers). Each has one context and one noise
refiner layer here (two of each on the real ones; they run unstyled in both the plain and the styled runs).
Z-Image Turbo's way: cfg 1 (the cond half alone); Lumina 2's: cfg 4. Item 0 of the batch is the in-batch reference.
Ratios are (time) / (plain time), best of --repeats after a warm-up (which also records a cached reference):
bench/run.py's dit_style_ratios, as flux.py. Needs ComfyUI 0.8.0 (0.3.75's Lumina gives no block index: skipped).

    make bench                     # CPU: 256x256 (256 image tokens) + 64 text tokens, batch 2, 2 layers, 1 step
    python bench/lumina.py --gpu   # 1024x1024 (4096 image tokens) + 128 text tokens, batch 3, 2 layers, 20 steps, bf16
    python bench/lumina.py --dry-run   # the --gpu models and batch on the CPU at 64x64, 1 step: checks that path
"""

import inspect
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (prepares the ComfyUI host the same way)

import torch  # noqa: E402

import comfy.ldm.lumina.model  # noqa: E402
import comfy.supported_models  # noqa: E402
import random_dits  # noqa: E402
import random_models  # noqa: E402

SIZE = bench.dit_sizes(gpu={"side": 1024, "steps": 20, "text": 128, "batch": 3, "blocks": 2},
                       cpu={"side": 256, "steps": 1, "text": 64, "batch": 2, "blocks": 2})
MODELS = {  # name: (supported model, unet_config beyond tiny_lumina2_config's, text width, cfg)
    "Z-Image": (comfy.supported_models.ZImage, {"dim": 3840, "n_heads": 30, "n_kv_heads": 30,
                                                "axes_lens": [1536, 512, 512]}, 2560, 1.0),
    "Lumina Image 2.0": (comfy.supported_models.Lumina2, {"dim": 2304, "n_heads": 24, "n_kv_heads": 8,
                                                          "axes_dims": [32, 32, 32]}, 2304, 4.0),
}


def full_width(supported, overrides, text_width):
    config = random_dits.tiny_lumina2_config(z_image=supported is comfy.supported_models.ZImage, **overrides,
                                             n_layers=SIZE["blocks"], cap_feat_dim=text_width)
    return random_models.model_patcher(supported(config), 0, SIZE["dtype"], None)


def measure(repeats):
    if "block_index" not in inspect.getsource(comfy.ldm.lumina.model.NextDiT._forward):
        print("\nZ-Image / Lumina 2: skipped, this ComfyUI gives their attention calls no block index (0.8.0 does)")
        return
    side, steps, batch, blocks = SIZE["side"], SIZE["steps"], SIZE["batch"], SIZE["blocks"]
    for name, (supported, overrides, text_width, cfg) in MODELS.items():
        def conditioning(items, seed, width=text_width):
            return [[torch.randn(items, SIZE["text"], width, generator=torch.Generator().manual_seed(seed)), {}]]
        model = full_width(supported, overrides, text_width)
        bench.dit_style_ratios(model, (batch, 16, side // 8, side // 8), conditioning, steps, cfg, repeats,
                               f"{name}, full width ({overrides['dim']}), {blocks} layers (all styled), "
                               f"{side}x{side} ({side // 16}x{side // 16} image tokens + {SIZE['text']} text), "
                               f"batch {batch} with cfg {cfg:g}, {steps} steps")
        del model


def main():
    bench.bench_main(__doc__, measure, measure, gpu_help="1024x1024 in bfloat16 on CUDA", dry_run=True)


if __name__ == "__main__":
    main()
