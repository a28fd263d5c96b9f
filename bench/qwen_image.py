"""Wall time of Visual Style Prompting and StyleAligned on Qwen-Image against plain sampling, in one run.

Full-width Qwen-Image blocks (24 heads of 128 = 3072 wide, RoPE axes 16+56+56, text from Qwen2.5-VL's 3584
width), few of them (the real model has 60), every block styled (layers all_blocks), so the ratio is the
per-block cost, which the whole model shares. Qwen-Image's way: cfg 2.5 (the uncond half runs), item 0 of the
batch the in-batch reference, latents with Qwen-Image's frame axis. Ratios are (time) / (plain time), best of
--repeats after a warm-up (which also records a cached reference): bench/run.py's dit_style_ratios, as flux.py.

    make bench                         # CPU: 256x256 (256 image tokens) + 64 text tokens, batch 2 with cfg,
                                       # 1 block, 1 step
    python bench/qwen_image.py --gpu   # 1024x1024 (4096 image tokens) + 128 text tokens (ComfyUI keeps the
                                       # prompt's own tokens, unpadded: a long prompt), batch 3 with cfg, 2 blocks,
                                       # 20 steps, bf16
    python bench/qwen_image.py --dry-run   # the --gpu model and batch on the CPU at 64x64, 1 step: checks that path
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (prepares the ComfyUI host the same way)

import torch  # noqa: E402

import comfy.supported_models  # noqa: E402
import random_dits  # noqa: E402
import random_models  # noqa: E402

QWEN_VL, CFG = 3584, 2.5
SIZE = bench.dit_sizes(gpu={"side": 1024, "steps": 20, "text": 128, "batch": 3, "blocks": 2},
                       cpu={"side": 256, "steps": 1, "text": 64, "batch": 2, "blocks": 1})


def full_width_qwen_image():
    config = {**random_dits.QWEN_IMAGE_CONFIG, "num_layers": SIZE["blocks"], "attention_head_dim": 128,
              "num_attention_heads": 24, "joint_attention_dim": QWEN_VL, "axes_dims_rope": (16, 56, 56)}
    return random_models.model_patcher(comfy.supported_models.QwenImage(config), 0, SIZE["dtype"], None)


def conditioning(batch, seed):
    return [[torch.randn(batch, SIZE["text"], QWEN_VL, generator=torch.Generator().manual_seed(seed)), {}]]


def measure(repeats):
    side, steps, batch, blocks = SIZE["side"], SIZE["steps"], SIZE["batch"], SIZE["blocks"]
    bench.dit_style_ratios(full_width_qwen_image(), (batch, 16, 1, side // 8, side // 8), conditioning, steps, CFG,
                           repeats, f"Qwen-Image, full width (3072), {blocks} block{'s' * (blocks > 1)} (all styled), "
                           f"{side}x{side} ({side // 16}x{side // 16} image tokens + {SIZE['text']} text), "
                           f"batch {batch} with cfg {CFG}, {steps} steps")


def main():
    bench.bench_main(__doc__, measure, measure, gpu_help="1024x1024 in bfloat16 on CUDA", dry_run=True)


if __name__ == "__main__":
    main()
