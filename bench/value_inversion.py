"""Wall time of StyleDiffusion's inversion (Prompt Embedding Inversion) against plain DDIM inversion of
the same image and steps, in one run, and its inner iterations against null-text-style optimisation's.

The inversion is a plain DDIM inversion (cfg 1, kept as the targets) plus, per step, ceil(N e^-0.1i)
iterations of one cond forward and backward (the uncond prediction once per step). Ratios are
(time) / (plain DDIM inversion time), best of --repeats after a warm-up.

    make bench                            # tiny UNet at 64x64 (30 steps, N 20), full-size SD1.5 at 256x256 (4 steps, N 2) on CPU
    python bench/value_inversion.py --gpu # SD1.5 at 512x512, 30 steps, N 20 (the issue's goal: under 30 s on an H100)
"""

import sys
from pathlib import Path

GPU = "--gpu" in sys.argv
sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (prepares the ComfyUI host the same way)

import importlib  # noqa: E402

import torch  # noqa: E402

import comfy.model_management  # noqa: E402
import comfyui_host  # noqa: E402
from helpers import run_node  # noqa: E402


def pack_module(name):
    """A module of the pack as ComfyUI loaded it (after bench_main has loaded the nodes)."""
    return importlib.import_module(f"{comfyui_host.pack_module().__name__}.{name}")

NULL_TEXT_ITERATIONS = 10  # null-text inversion optimises 10 iterations at each of 50 steps


def run(name, side, steps, inner_iterations, repeats):
    value_input, value_inversion = pack_module("inversion.value_input"), pack_module("glue.value_inversion")
    layers_module, architectures = pack_module("attention_patches.layers"), pack_module("glue.architectures")
    model, context_dim, pooled_dim = bench.build(name)
    content = torch.randn(1, 4, side // 8, side // 8, generator=torch.Generator().manual_seed(0))
    source, empty = bench.conditioning(context_dim, pooled_dim, 1, 3), bench.conditioning(context_dim, pooled_dim, 1, 2)
    settings = value_input.ValueInversionSettings(inner_iterations=inner_iterations, early_stop=False)
    layers = layers_module.coarsest_level_layers(list(architectures.adapter_for(model, "bench").sites))
    results = {}

    def plain():
        run_node("DDIMInversion", model=model, latent={"samples": content}, positive=source, negative=source,
                 steps=steps, cfg=1.0, scheduler="ddim_uniform")

    def inversion():
        _, results["inversion"] = value_inversion.prompt_embedding_inversion(
            model, source, empty, content, steps, "ddim_uniform", 7.5, layers, settings, "bench", 1 << 40)

    times = {"plain DDIM inversion": bench.timed(plain, repeats),
             "Prompt Embedding Inversion": bench.timed(inversion, repeats)}
    iterations = sum(map(len, results["inversion"].losses))
    bench.print_table(f"{name} UNet, {side}x{side}, {len(results['inversion'].losses)} steps, N {inner_iterations} "
                      f"(early stop off: {iterations} iterations; null-text inversion runs "
                      f"{NULL_TEXT_ITERATIONS * 50} at 50 steps), {bench.device_name()}", times, "plain DDIM inversion")
    print(f"  per inner iteration: {(times['Prompt Embedding Inversion'] - times['plain DDIM inversion']) / iterations:.3f} s"
          f" = {(times['Prompt Embedding Inversion'] - times['plain DDIM inversion']) / iterations / (times['plain DDIM inversion'] / len(results['inversion'].losses)):.2f}x a DDIM inversion step")
    comfy.model_management.unload_all_models()


def main():
    def gpu(repeats):
        run("sd15", 512, 30, 20, repeats)

    def cpu(repeats):
        run("tiny", 64, 30, 20, max(repeats, 2))
        run("sd15", 256, 4, 2, 1)

    bench.bench_main(__doc__, gpu, cpu)


if __name__ == "__main__":
    main()
