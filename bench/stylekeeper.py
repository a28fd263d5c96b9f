"""Wall time of Visual Style Prompting with StyleKeeper's options against plain sampling, in one run.

A batch of 4 targets with cfg (8 images per model call) and a reference latent of the same size
recorded once (the node's cache: the warm-up run records it). Negative visual query guidance adds
one unconditional-sized batch per step (4 images), so its floor is 1.5x plain's UNet work. Ratios are
(time) / (plain time), best of --repeats after a warm-up.

    make bench                         # tiny UNet at 64x64 (10 steps), full-size SD1.5 at 256x256 (3 steps) on CPU
    python bench/stylekeeper.py --gpu  # SD1.5 at 512x512 and SDXL at 1024x1024, 20 steps
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (prepares the ComfyUI host the same way)

import torch  # noqa: E402

import comfy.model_management  # noqa: E402
from helpers import vsp  # noqa: E402

WEIGHT = 1.0


def measure(name, side, steps, repeats):
    model, context_dim, pooled_dim = bench.build(name)
    latent = torch.zeros(bench.BATCH, 4, side // 8, side // 8)
    positive = bench.conditioning(context_dim, pooled_dim, bench.BATCH, 1)
    negative = bench.conditioning(context_dim, pooled_dim, bench.BATCH, 2)
    reference = bench.reference_latent(side, context_dim, pooled_dim, 2048)
    configurations = {
        "plain": model,
        "VSP cond-only, reference latent": vsp(model, reference, cond_only=True),
        "  + NVQG (style layers)": vsp(model, reference, cond_only=True, nvqg_weight=WEIGHT),
        "  + NVQG + colour calibration": vsp(model, reference, cond_only=True, nvqg_weight=WEIGHT,
                                             calibrate_colors=True, calibration_timestep=999,
                                             calibration_length=998),
        "  + NVQG (all layers)": vsp(model, reference, cond_only=True, nvqg_weight=WEIGHT, nvqg_layers="all_layers"),
        "VSP cond-only in-batch + NVQG": vsp(model, cond_only=True, nvqg_weight=WEIGHT),
    }
    times = {label: bench.timed_sample(m, positive, negative, latent, steps, repeats)
             for label, m in configurations.items()}
    bench.print_table(f"{name} UNet, {side}x{side}, batch {bench.BATCH} with cfg, {steps} steps, {bench.device_name()}; "
                      "the reference recorded by the warm-up run (calibration on at every step)", times, "plain")
    comfy.model_management.unload_all_models()


def main():
    def gpu(repeats):
        measure("sd15", 512, 20, repeats)
        measure("sdxl", 1024, 20, repeats)

    def cpu(repeats):
        measure("tiny", 64, 10, max(repeats, 5))
        measure("sd15", 256, 3, repeats)

    bench.bench_main(__doc__, gpu, cpu)


if __name__ == "__main__":
    main()
