"""Masked Style Blend against plain sampling in one run: wall time for n = 1 and 2 styles (each a
LoRA of rank 16 on the attention projections, as Fit Style LoRA fits), and the memory the weights
take against one loaded UNet.

One image with cfg (2 images per model call), from noise. Configurations:
- plain: the base model;
- one LoRA (stock merge): the base with one LoRA merged into its weights (what sampling one style costs);
- blend, n styles: the base and n LoRA branches, each mask a vertical band (n + 1 evaluations per step).
Ratios are (time) / (plain time), best of --repeats after a warm-up. Weights: the UNet's parameters
plus the branches' LoRA matrices (shared layers are counted once), against the UNet's parameters;
on a GPU also the peak allocated memory of a run against plain's.

    make bench                          # tiny UNet at 64x64 and full-size random SD1.5 at 256x256 on CPU
    python bench/masked_blend.py --gpu  # SD1.5 at 512x512, SDXL at 1024x1024 on a GPU
"""

import sys
from pathlib import Path

GPU = "--gpu" in sys.argv
sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (prepares the ComfyUI host the same way)

import torch  # noqa: E402

import comfy.lora  # noqa: E402
import comfy.model_management  # noqa: E402
import comfy.sample  # noqa: E402
from helpers import run_node  # noqa: E402

RANK = 16
TARGETS = ("attn1_to_q", "attn1_to_k", "attn1_to_v", "attn1_to_out_0", "attn2_to_q", "attn2_to_k", "attn2_to_v",
           "attn2_to_out_0")


def with_random_lora(model, seed):
    """The model with a random LoRA on every attention projection, applied as LoraLoader applies a file."""
    generator = torch.Generator().manual_seed(seed)
    state = model.model.state_dict()
    tensors = {}
    for name, key in comfy.lora.model_lora_keys_unet(model.model, {}).items():
        if isinstance(key, str) and name.startswith("lora_unet_") and name.endswith(TARGETS):
            out_features, in_features = state[key].shape[:2]
            tensors[f"{name}.lora_down.weight"] = torch.randn(RANK, in_features, generator=generator) * 0.01
            tensors[f"{name}.lora_up.weight"] = torch.randn(out_features, RANK, generator=generator) * 0.01
            tensors[f"{name}.alpha"] = torch.tensor(float(RANK))
    patched = model.clone()
    patched.add_patches(comfy.lora.load_lora(tensors, comfy.lora.model_lora_keys_unet(model.model, {})), 1.0)
    return patched


def bands(count, side):
    """count vertical bands of equal width, with a plain band left of them."""
    width = side // (count + 1)
    masks = []
    for index in range(1, count + 1):
        mask = torch.zeros(1, side, side)
        mask[:, :, index * width:(index + 1) * width] = 1.0
        masks.append(mask)
    return masks


def blend(model, styles, side):
    inputs = {}
    for index, (styled, mask) in enumerate(zip(styles, bands(len(styles), side)), start=1):
        inputs[f"styled_model_{index}"], inputs[f"mask_{index}"] = styled, mask
    (blended,) = run_node("MaskedStyleBlend", model=model, mask_edges="coverage", **inputs)
    return blended


def weight_bytes(model) -> int:
    seen, total = set(), 0
    for parameter in model.model.diffusion_model.parameters():
        if parameter.data_ptr() not in seen:
            seen.add(parameter.data_ptr())
            total += parameter.numel() * parameter.element_size()
    return total


def delta_bytes(blended) -> int:
    total = 0
    for patch in blended.object_patches.values():
        for behaviour in getattr(patch, "stand_in_behaviours", ()):
            for terms in getattr(behaviour, "deltas", {}).values():
                total += sum(t.numel() * t.element_size() for d in terms for t in (d.up, d.down))
    return total


def run(name, side, steps, repeats):
    model, context_dim, pooled_dim = bench.build(name)
    styles = [with_random_lora(model, seed) for seed in (1, 2)]
    positive, negative = bench.conditioning(context_dim, pooled_dim, 1, 1), bench.conditioning(context_dim, pooled_dim, 1, 2)
    latent = torch.zeros(1, 4, side // 8, side // 8)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
    configurations = {
        "plain": model,
        "one LoRA (stock merge)": styles[0],
        "blend, 1 style": blend(model, styles[:1], side),
        "blend, 2 styles": blend(model, styles, side),
    }
    peaks = {}

    def sample(label, m):
        if GPU:
            torch.cuda.reset_peak_memory_stats()
        comfy.sample.sample(m, noise, steps, 7.0, "euler", "normal", positive, negative, latent, seed=0,
                            disable_pbar=True)
        if GPU:
            peaks[label] = torch.cuda.max_memory_allocated()

    times = {label: bench.timed(lambda label=label, m=m: sample(label, m), repeats)
             for label, m in configurations.items()}
    device = bench.device_name()
    bench.print_table(f"{name} UNet, {side}x{side}, one image with cfg, {steps} steps, {device}: Masked Style Blend "
                      f"with rank-{RANK} attention LoRAs", times, "plain")
    unet = weight_bytes(model)
    state = model.model.state_dict()
    patched_bytes = sum(state[key].numel() * state[key].element_size() for key in styles[0].patches)
    swap = bench.timed(lambda: [comfy.lora.calculate_weight(styles[0].patches[key], state[key].clone(), key)
                                for key in styles[0].patches], repeats)
    print(f"  for comparison, ComfyUI's hooks swap weights per branch: MaxSpeed caches the patched layers per style "
          f"(+{patched_bytes / 2**20:.1f} MiB = {patched_bytes / unet:.3f}x one UNet each); MinVram recomputes them, "
          f"{swap:.3f} s per branch and step here (plain takes {times['plain'] / steps:.3f} s per step)")
    for label in ("blend, 1 style", "blend, 2 styles"):
        held = unet + delta_bytes(configurations[label])
        line = f"  {label}: weights {held / 2**20:.1f} MiB = {held / unet:.3f}x one UNet ({unet / 2**20:.1f} MiB)"
        if GPU:
            line += f"; peak allocated {peaks[label] / peaks['plain']:.3f}x plain"
        print(line)
    comfy.model_management.unload_all_models()


def main():
    def gpu(repeats):
        run("sd15", 512, 20, repeats)
        run("sdxl", 1024, 20, repeats)

    def cpu(repeats):
        run("tiny", 64, 10, max(repeats, 5))
        run("sd15", 256, 4, repeats)

    bench.bench_main(__doc__, gpu, cpu)


if __name__ == "__main__":
    main()
