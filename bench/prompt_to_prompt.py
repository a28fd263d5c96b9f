"""Wall time of StyleDiffusion's prompt-to-prompt edit against plain sampling, in one run.

The edit samples the source/target pair from the inverted latent on the inversion's steps at its cfg,
every attention layer controlled (defaults: tau_v .5, tau_c .6, tau_s .6, tau_u .5 so the uncond
branch is controlled too), with and without the local blend. Baselines on the same steps and cfg:
plain sampling of one image and of a plain pair (batch 2). A hand-made inversion (random learned
values) times the same work as a real one. Ratios are (time) / (plain one image), best of --repeats
after a warm-up.

    make bench                             # tiny UNet at 64x64 (30 steps), full-size SD1.5 at 256x256 (4 steps) on CPU
    python bench/prompt_to_prompt.py --gpu # SD1.5 at 512x512 and SDXL at 1024x1024, 30 steps
"""

import sys
from pathlib import Path

GPU = "--gpu" in sys.argv
sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (prepares the ComfyUI host the same way)

import importlib  # noqa: E402

import torch  # noqa: E402

import comfy.ldm.modules.attention  # noqa: E402
import comfy.model_management  # noqa: E402
import comfy.samplers  # noqa: E402
import comfyui_host  # noqa: E402

CFG = 7.5


def pack_module(name):
    return importlib.import_module(f"{comfyui_host.pack_module().__name__}.{name}")


def hand_made_inversion(model, side, steps, context_dim):
    value_inversion, style_inversion = pack_module("glue.value_inversion"), pack_module("inversion.style_inversion")
    ddim = pack_module("inversion.ddim")
    sigmas = value_inversion.inversion_sigmas(model, "ddim_uniform", steps)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(len(sigmas), 1, 4, side // 8, side // 8, generator=g)
    n = len(sigmas) - 1
    scales = 1 + 0.1 * torch.randn(n, 77, context_dim, generator=g)
    shifts = 0.1 * torch.randn(n, 77, context_dim, generator=g)
    settings = {"steps": steps, "scheduler": "ddim_uniform", "guidance": CFG, "prediction": "eps"}
    return style_inversion.StyleInversion(ddim.InversionTrajectory(sigmas, latents), scales, shifts, "bench", settings)


def run(name, side, steps, repeats):
    p2p, glue = pack_module("attention_patches.prompt_to_prompt"), pack_module("glue.prompt_to_prompt")
    layers, architectures, owners = (pack_module("attention_patches.layers"), pack_module("glue.architectures"),
                                     pack_module("nodes.style_inputs"))
    model, context_dim, pooled_dim = bench.build(name)
    inversion = hand_made_inversion(model, side, steps, context_dim)
    sites = list(architectures.adapter_for(model, "bench").sites)
    attention = pack_module("attention_patches.attention").KernelAttention.of(
        comfy.ldm.modules.attention.optimized_attention)
    edit = p2p.CrossAttentionEdit.refine(torch.arange(77), torch.ones(77), torch.ones(77))
    schedule = p2p.EditSchedule(inversion.steps, 0.5, 0.6, 0.6, 0.5)
    words = torch.zeros(2, 77)
    words[:, 2] = 1
    blend = glue.LocalBlend(words, tuple(layers.coarsest_level_layers(sites)))
    pair = bench.conditioning(context_dim, pooled_dim, 2, 1)
    one, empty = bench.conditioning(context_dim, pooled_dim, 1, 1), bench.conditioning(context_dim, pooled_dim, 1, 2)
    latent_format = model.get_model_object("latent_format")
    top = latent_format.process_out(inversion.trajectory.top)
    sigmas = inversion.sampling_sigmas()

    def plain(batch):
        positive = one if batch == 1 else pair
        latent = top.repeat(batch, 1, 1, 1)
        sampler = comfy.samplers.KSampler(model, steps=len(sigmas) - 1, device=comfy.model_management.get_torch_device(),
                                          sampler="euler", scheduler="ddim_uniform")
        return lambda: sampler.sample(torch.zeros_like(latent), positive, empty, cfg=CFG, latent_image=latent,
                                      sigmas=sigmas, disable_pbar=True, seed=0)

    def edited(with_blend):
        def job():
            patched, maps = glue.edit_model(model, inversion, schedule, edit, sites, owners.new_owner("bench"), attention,
                                            blend if with_blend else None)
            glue.run_edit(patched, inversion, pair, empty, blend if with_blend else None, maps, latent_format)
        return job

    times = {"plain sampling, one image": bench.timed(plain(1), repeats),
             "plain sampling, a pair (batch 2)": bench.timed(plain(2), repeats),
             "Prompt-to-Prompt Edit (the pair)": bench.timed(edited(False), repeats),
             "Prompt-to-Prompt Edit + local blend": bench.timed(edited(True), repeats)}
    bench.print_table(f"{name} UNet, {side}x{side}, {inversion.steps} steps, cfg {CFG}, {bench.device_name()}",
                      times, "plain sampling, one image")
    comfy.model_management.unload_all_models()


def main():
    def gpu(repeats):
        run("sd15", 512, 30, repeats)
        run("sdxl", 1024, 30, repeats)

    def cpu(repeats):
        run("tiny", 64, 30, max(repeats, 3))
        run("sd15", 256, 4, 1)

    bench.bench_main(__doc__, gpu, cpu)


if __name__ == "__main__":
    main()
