"""Wall time of Visual Style Prompting and StyleAligned on Flux against plain sampling, in one run.

Full-width Flux.1 blocks (hidden 3072, 24 heads, RoPE axes 16+56+56, T5 and CLIP-L widths), few of them
(Flux.1 has 19 double and 38 single): every block is styled (layers all_blocks), so the ratio is the
per-block cost, which a 57-block model shares. Flux dev's way: cfg 1, item 0 of the batch the in-batch
reference. Ratios are (time) / (plain time), best of --repeats after a warm-up (which also records a
cached reference). The timing is bench/run.py's dit_style_ratios, shared with sd3.py and qwen_image.py.

    make bench                   # CPU: 256x256 (256 image tokens) + 64 text tokens, batch 2, 1 double + 1 single
                                 # block, 1 step (one full-width forward takes ~10 s on 2 cores)
    python bench/flux.py --gpu   # 1024x1024 (4096 image tokens) + 256 text tokens (ComfyUI pads Flux's T5
                                 # prompt to 256), batch 3, 1 double + 2 single blocks, 20 steps, bf16
    python bench/flux.py --dry-run   # the --gpu models and batch on the CPU at 64x64, 1 step: checks that path
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (prepares the ComfyUI host the same way)

import torch  # noqa: E402

import comfy.supported_models  # noqa: E402
import random_dits  # noqa: E402
import random_models  # noqa: E402

T5, CLIP_L = 4096, 768
SIZE = bench.dit_sizes(gpu={"side": 1024, "steps": 20, "text": 256, "batch": 3, "single": 2},
                       cpu={"side": 256, "steps": 1, "text": 64, "batch": 2, "single": 1})


def full_width_flux():
    config = random_dits.tiny_flux_config(hidden_size=3072, num_heads=24, axes_dim=[16, 56, 56], depth=1,
                                          depth_single_blocks=SIZE["single"], context_in_dim=T5, vec_in_dim=CLIP_L)
    return random_models.model_patcher(comfy.supported_models.Flux(config), 0, SIZE["dtype"], None)


def conditioning(batch, seed):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(batch, SIZE["text"], T5, generator=g),
             {"pooled_output": torch.randn(batch, CLIP_L, generator=g), "guidance": 3.5}]]


def measure(repeats):
    side, steps, batch = SIZE["side"], SIZE["steps"], SIZE["batch"]
    bench.dit_style_ratios(full_width_flux(), (batch, 16, side // 8, side // 8), conditioning, steps, 1.0, repeats,
                           f"Flux, full width, 1 double + {SIZE['single']} single blocks (all styled), {side}x{side} "
                           f"({side // 16}x{side // 16} image tokens + {SIZE['text']} text), batch {batch} at cfg 1, "
                           f"{steps} steps")


def main():
    bench.bench_main(__doc__, measure, measure, gpu_help="1024x1024 in bfloat16 on CUDA", dry_run=True)


if __name__ == "__main__":
    main()
