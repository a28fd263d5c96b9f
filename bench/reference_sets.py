"""Wall time of Visual Style Prompting and StyleAligned with 1, 2 and 4 weighted references (Combine Style
References) against plain sampling and against the single-reference node, in one run.

Every reference is cached (recorded by the warm-up run), so the time is what the references' keys cost inside
attention: each styled layer attends to all of them. The slope (extra time per extra reference, as a fraction
of plain sampling) is printed for each method. Full-size SD1.5 with random weights, batch 4 with cfg (item 0
no longer special: every item is a target of the external references); the configurations take turns
(bench/run.py's timed_in_turn).

    make bench                           # CPU: SD1.5 at 256x256 (32x32 latents), 2 steps
    python bench/reference_sets.py --gpu # SD1.5 at 512x512 and SDXL at 1024x1024, 20 steps
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (prepares the ComfyUI host the same way)

import torch  # noqa: E402

import comfy.model_management  # noqa: E402
import comfy.sample  # noqa: E402
from helpers import run_node, style_aligned, vsp  # noqa: E402

COUNTS = (1, 2, 4)


def reference_set(references):
    inputs = {}
    for number, reference in enumerate(references, start=1):
        inputs[f"reference_{number}"], inputs[f"weight_{number}"] = reference, 1.0 / len(references)
    if len(references) == 1:  # the node takes two: the second with weight 0 is left out
        inputs.update(reference_2=references[0], weight_2=0.0)
    (combined,) = run_node("CombineStyleReferences", **inputs)
    return combined


def measure(name, side, steps, repeats):
    model, context_dim, pooled_dim = bench.build(name)
    references = [bench.latent_reference((1, 4, side // 8, side // 8), bench.conditioning(context_dim, pooled_dim, 1, 3 + n),
                                         16384) for n in range(max(COUNTS))]
    configurations = {"plain": model}
    for method, label in ((vsp, "VSP"), (style_aligned, "StyleAligned")):
        configurations[f"{label}, the single-reference node"] = method(model, references[0])
        for count in COUNTS:
            configurations[f"{label}, {count} combined"] = method(model, reference_set(references[:count]))
    latent = torch.zeros(bench.BATCH, 4, side // 8, side // 8)
    positive = bench.conditioning(context_dim, pooled_dim, bench.BATCH, 1)
    negative = bench.conditioning(context_dim, pooled_dim, bench.BATCH, 2)
    noise = comfy.sample.prepare_noise(latent, 0)
    jobs = {label: (lambda m=m: comfy.sample.sample(m, noise, steps, 7.0, "euler", "normal", positive, negative, latent,
                                                     disable_pbar=True, seed=0))
            for label, m in configurations.items()}
    times = bench.timed_in_turn(jobs, repeats)
    bench.print_table(f"{name} UNet, {side}x{side}, batch {bench.BATCH} with cfg, {steps} steps, every reference cached, "
                      f"{bench.device_name()}", times, "plain")
    for label in ("VSP", "StyleAligned"):
        slope = (times[f"{label}, {COUNTS[-1]} combined"] - times[f"{label}, 1 combined"]) / (COUNTS[-1] - 1)
        print(f"  {label}: {slope / times['plain']:+.3f}x plain per extra reference (from 1 to {COUNTS[-1]})")
    comfy.model_management.unload_all_models()


def main():
    def gpu(repeats):
        measure("sd15", 512, 20, repeats)
        measure("sdxl", 1024, 20, repeats)

    def cpu(repeats):
        measure("sd15", 256, 2, repeats)

    bench.bench_main(__doc__, gpu, cpu)


if __name__ == "__main__":
    main()
