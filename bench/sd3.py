"""Wall time of Visual Style Prompting and StyleAligned on SD3.5 (ComfyUI's MMDiT) against plain sampling, in one run.

Full-width SD3.5 blocks, few of them, every block styled (layers all_blocks), so the ratio is the per-block
cost, which the whole model shares: SD3.5 Large (hidden 2432 = 38 heads of 64, QK RMSNorm; 38 blocks in the
real model) and SD3.5 Medium (hidden 1536 = 24 heads of 64, its second, image-only attention in every block
here as in its first 13 of 24, styled too). MMDiT derives its width from depth, so the model is built with the
real depth and fewer blocks (its num_blocks), the last one pre-only on the text side as the real last block.
Text: T5-XXL width (4096) and the CLIP-L+G pooled output (2048). SD3.5's way: cfg 4.5 (the uncond half runs),
item 0 of the batch the in-batch reference. The position table is cropped from pos_embed_max_size (192 and 384
on the real ones); here it is the image's size, which crops the same. Ratios are (time) / (plain time), best of
--repeats after a warm-up (which also records a cached reference): bench/run.py's dit_style_ratios, as flux.py.

    make bench                  # CPU: 256x256 (256 image tokens) + 64 text tokens, batch 2 with cfg, 2 blocks, 1 step
    python bench/sd3.py --gpu   # 1024x1024 (4096 image tokens) + 154 text tokens (77 CLIP + 77 T5, ComfyUI's
                                # minimum lengths), batch 3 with cfg, 2 blocks, 20 steps, bf16
    python bench/sd3.py --dry-run   # the --gpu models and batch on the CPU at 64x64, 1 step: checks that path
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (prepares the ComfyUI host the same way)

import torch  # noqa: E402

import comfy.supported_models  # noqa: E402
import random_dits  # noqa: E402
import random_models  # noqa: E402

T5, POOLED, CFG = 4096, 2048, 4.5
SIZE = bench.dit_sizes(gpu={"side": 1024, "steps": 20, "text": 154, "batch": 3, "blocks": 2},
                       cpu={"side": 256, "steps": 1, "text": 64, "batch": 2, "blocks": 2})
MODELS = {"SD3.5 Large": {"depth": 38}, "SD3.5 Medium": {"depth": 24, "dual_attention": True}}


def full_width_sd35(depth, dual_attention=False):
    """SD3.5's unet_config as ComfyUI's detection writes it (depth sets the width) with SIZE's blocks, random weights,
    the position table filled as a real file's (random_dits._mmdit_filled)."""
    patches = SIZE["side"] // 16
    blocks = SIZE["blocks"]
    config = random_dits.tiny_sd3_config(
        depth=depth, num_blocks=blocks, qk_norm="rms", adm_in_channels=POOLED, pos_embed_max_size=patches,
        num_patches=patches * patches, x_block_self_attn_layers=list(range(blocks)) if dual_attention else [],
        context_embedder_config={"target": "torch.nn.Linear",
                                 "params": {"in_features": T5, "out_features": 64 * depth}})
    patcher = random_models.model_patcher(comfy.supported_models.SD3(config), 0, SIZE["dtype"], None)
    return random_dits._mmdit_filled(patcher, 0)


def conditioning(batch, seed):
    g = torch.Generator().manual_seed(seed)
    context = torch.randn(batch, SIZE["text"], T5, generator=g)
    return [[context, {"pooled_output": torch.randn(batch, POOLED, generator=g)}]]


def measure(repeats):
    side, steps, batch, blocks = SIZE["side"], SIZE["steps"], SIZE["batch"], SIZE["blocks"]
    for name, shape in MODELS.items():
        model = full_width_sd35(**shape)
        dual = ", with the image-only attention" if shape.get("dual_attention") else ""
        bench.dit_style_ratios(model, (batch, 16, side // 8, side // 8), conditioning, steps, CFG, repeats,
                               f"{name}, full width ({64 * shape['depth']}), {blocks} blocks{dual} (all styled), "
                               f"{side}x{side} ({side // 16}x{side // 16} image tokens + {SIZE['text']} text), "
                               f"batch {batch} with cfg {CFG}, {steps} steps")
        del model


def main():
    bench.bench_main(__doc__, measure, measure, gpu_help="1024x1024 in bfloat16 on CUDA", dry_run=True)


if __name__ == "__main__":
    main()
