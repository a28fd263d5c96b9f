"""The precision matrix (issue 26): every node's main path on tiny SD1.5 and SDXL with the UNet in
bfloat16, float16, float8_e4m3fn weights cast per layer to bfloat16 (ComfyUI's manual cast), and float32
partially loaded (--lowvram: part of the weights cast and patched per layer during the forward), each
against the same node on the float32 model fully loaded, with the same weights (rounded) and seeds.

The error is ||x - x_float32|| / ||x_float32|| of the node's output (a sampled or inverted latent, the
attention maps, the fitted LoRA); tolerance() states the bound per path and variant and why. The matrix runs on
one host (the newest, the one that runs the end-to-end tests); scripts/gpu_check.py runs the same cells
on CUDA through run_cell() and reports every error.
"""

import importlib
import os
import tempfile
from functools import cache

import pytest
import torch

import comfy.lora
import comfy.model_management
import comfy.sample
import comfy.utils
import folder_paths
import random_models
from comfyui_host import pack_module
from helpers import (batch_prompts, encode, invert, latent_reference, partial_loading, relative_error, run_node, sample,
                     style_aligned, vsp)

_HOST, _MATRIX_HOST = os.environ.get("STYLE_ATTENTION_HOST"), os.environ.get("STYLE_ATTENTION_END_TO_END_HOST")
pytestmark = pytest.mark.skipif(
    _MATRIX_HOST is not None and _MATRIX_HOST != _HOST,
    reason=f"precision matrix: make test runs it on ComfyUI {_MATRIX_HOST} only (CI time)")

# How each variant loads the UNet: random_models' dtype arguments, and whether it is partially loaded.
VARIANTS = {
    "bf16": {"dtype": torch.bfloat16},
    "fp16": {"dtype": torch.float16},
    "fp8": {"dtype": torch.float8_e4m3fn, "manual_cast_dtype": torch.bfloat16},
    "lowvram": {"partial": 0.5},
}

# The largest relative error measured per node path and variant (over SD1.5 and SDXL, and over the path's
# outputs) on CPU with ComfyUI 0.8.0, torch 2.14.1 (run `pytest tests/test_precision_matrix.py -s` to print
# each cell's). These are latents of a random tiny UNet, not decoded images: 3 sampling steps carry the
# rounding of every layer into the result, so they sit above the image-level errors of issue 26.
# Per element, fp16 keeps 11 significant bits (rounding up to 4.9e-4), bf16 8 (3.9e-3), float8_e4m3fn 4 (6.3e-2,
# weights only: activations are bf16). The sampled latents land at about 4x the rounding in fp16 and bf16
# (~2e-3, ~1.5e-2) and below it in fp8 (~4e-2); an inversion's latent far below (its steps move it little),
# attention maps (a softmax of the first layers) in between.
MEASURED = {
    "vsp_in_batch": {"fp16": 1.9e-03, "bf16": 1.6e-02, "fp8": 3.9e-02},
    "vsp_reference": {"fp16": 2.0e-03, "bf16": 1.3e-02, "fp8": 3.7e-02},
    "style_aligned_in_batch": {"fp16": 1.9e-03, "bf16": 1.6e-02, "fp8": 3.9e-02},
    "style_injection": {"fp16": 4.1e-03, "bf16": 3.1e-02, "fp8": 6.9e-02},
    "masked_style_blend": {"fp16": 2.2e-03, "bf16": 1.8e-02, "fp8": 3.9e-02},
    "ddim_inversion": {"fp16": 2.5e-05, "bf16": 2.2e-04, "fp8": 2.6e-03},
    "prompt_embedding_inversion_and_edit": {"fp16": 3.0e-03, "bf16": 1.5e-02, "fp8": 3.0e-02},
    "capture_attention_maps": {"fp16": 5.7e-04, "bf16": 3.8e-03, "fp8": 2.4e-02},
    "fit_style_lora": {"fp16": 1.1e-02, "bf16": 5.8e-02, "fp8": 5.2e-01},
}
HEADROOM = 3.0  # another CPU, kernel or batch layout rounds differently; a NaN, a dropped branch or patch does not fit
LOWVRAM_TOLERANCE = 1e-5  # float32 partially loaded computes the same products (measured: 0.0): summation order only
# Four Adam steps move each LoRA weight by about lr * sign(gradient): where fp8 weights (6% apart) turn a small
# gradient's sign, the step turns too, so the fitted delta is ~50% away from float32's. The bound only says the
# fit learned along float32's direction: a fit that learns nothing (zero gradients, issue 26) is exactly 1.0 away.
FIT_FP8_TOLERANCE = 0.9


def tolerance(path: str, variant: str) -> float:
    if variant == "lowvram":
        return LOWVRAM_TOLERANCE
    if (path, variant) == ("fit_style_lora", "fp8"):
        return FIT_FP8_TOLERANCE
    return HEADROOM * MEASURED[path][variant]

ARCHITECTURES = ("sd15", "sdxl")
SIZE = 8  # latent side: 64 x 64 images
STEPS = 3


def _pack(name):
    return importlib.import_module(f"{pack_module().__name__}.{name}")


@cache
def tiny_models(architecture: str, variant: str = "float32"):
    """The tiny model of an architecture with its UNet in the variant's dtype (float32 for lowvram):
    one build per process, shared by the test and scripts/gpu_check.py."""
    settings = {} if variant in ("float32", "lowvram") else VARIANTS[variant]
    build = random_models.tiny_sd15 if architecture == "sd15" else random_models.tiny_sdxl
    models = build(seed=0, **settings)
    models.model = tamed(models.model)
    return models


def tamed(model):
    """A clone whose eps is scaled by 0.02 (a random UNet predicts eps of std ~100; real models ~1), so an
    inversion's ODE is as smooth as a real model's. A unet wrapper rather than scaled weights: 0.02 x the
    out conv's weights underflows in float8."""

    def scaled(apply_model, args):
        return apply_model(args["input"], args["timestep"], **args["c"]) * 0.02

    clone = model.clone()
    clone.set_model_unet_function_wrapper(scaled)
    return clone


def _generator(seed):
    return torch.Generator().manual_seed(seed)


def _prompts(models, text="a dog"):
    return encode(models.clip, text), encode(models.clip, "")


def _from_latent(model, start, positive, negative, steps=STEPS, cfg=4.0):
    """KSampler (Advanced) without added noise from an inverted latent on the inversion's schedule."""
    return comfy.sample.sample(model, torch.zeros_like(start), steps, cfg, "euler", "ddim_uniform", positive, negative,
                               start, disable_noise=True, disable_pbar=True, seed=0)


def _random_lora(model, seed=1, rank=2, scale=0.3, pattern=("attn1_to_q", "attn2_to_v", "in_layers_2")):
    """A LoRA file's tensors (kohya names, float32) on some attention projections and ResBlock convolutions."""
    generator = _generator(seed)
    names = comfy.lora.model_lora_keys_unet(model.model, {})
    state = model.model.state_dict()
    tensors = {}
    for name, key in sorted((n, k) for n, k in names.items() if isinstance(k, str)):
        if not (name.startswith("lora_unet_") and any(p in name for p in pattern)):
            continue
        weight = state[key]
        down_shape = (rank, *weight.shape[1:])
        up_shape = (weight.shape[0], rank) + ((1, 1) if weight.ndim == 4 else ())
        tensors[f"{name}.lora_down.weight"] = torch.randn(down_shape, generator=generator) * scale
        tensors[f"{name}.lora_up.weight"] = torch.randn(up_shape, generator=generator) * scale
        tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    return tensors


def _image(seed=0, height=48, width=64):
    coarse = torch.rand(1, 3, height // 8, width // 8, generator=_generator(seed))
    return torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear").movedim(1, -1)


# The main path of each node: (models) -> {output name: tensor}, deterministic under its seeds.

def vsp_in_batch(models):
    positive, negative = batch_prompts(models)
    styled = vsp(models.model, cond_only=True, nvqg_weight=1.0)
    return {"latent": sample(styled, positive, negative, batch=3, size=SIZE, steps=STEPS)}


def vsp_reference(models):
    """A latent reference with StyleKeeper's cond_only, negative visual query guidance and colour
    calibration (its window widened to the run's few steps)."""
    positive, negative = _prompts(models)
    reference = latent_reference(models, size=SIZE)
    styled = vsp(models.model, reference=reference, cond_only=True, nvqg_weight=1.0, calibrate_colors=True,
                 calibration_timestep=999, calibration_length=999)
    return {"latent": sample(styled, positive, negative, batch=2, size=SIZE, steps=STEPS)}


def style_aligned_in_batch(models):
    """Shared attention with AdaIN, and shared GroupNorm where the architecture's default has it (SD1.5)."""
    positive, negative = batch_prompts(models)
    styled = style_aligned(models.model, shared_group_norm="auto")
    return {"latent": sample(styled, positive, negative, batch=3, size=SIZE, steps=STEPS)}


def _content(models, seed=11):
    model = models.model
    latent = torch.randn(1, 4, SIZE, SIZE, generator=_generator(seed))
    empty = encode(models.clip, "")
    inverted, trajectory = invert(model, latent, empty, empty, steps=STEPS + 1, scheduler="ddim_uniform")
    return model, inverted["samples"], trajectory


def ddim_inversion(models):
    _, inverted, trajectory = _content(models)
    return {"inverted": inverted}


def style_injection(models):
    model, start, trajectory = _content(models)
    (injected,) = run_node("StyleInjection", model=model, inversion=trajectory, content_features=None, clip=models.clip,
                           source_prompt="", feature_fraction=0.6, attention_fraction=0.5,
                           attention_sites="plug_and_play", custom_attention_sites="", feature_sites="plug_and_play",
                           custom_feature_sites="", cross_attention=False, cache_megabytes=0, cache_on_cpu=False,
                           conditioning=None)
    return {"latent": _from_latent(injected, start, *_prompts(models), steps=STEPS + 1)}


def masked_style_blend(models):
    """A LoRA branch on the left half and a VSP branch (latent reference) on the top right quarter."""
    positive, negative = _prompts(models, "a house by a lake")
    lora = _pack("glue.lora_fit").with_lora(models.model, _random_lora(models.model))
    styled = vsp(models.model, latent_reference(models, size=SIZE))
    left, top_right = torch.zeros(1, SIZE * 8, SIZE * 8), torch.zeros(1, SIZE * 8, SIZE * 8)
    left[:, :, :SIZE * 4] = 1.0
    top_right[:, :SIZE * 4, SIZE * 4:] = 1.0
    (blended,) = run_node("MaskedStyleBlend", model=models.model, mask_edges="coverage", styled_model_1=lora,
                          mask_1=left, styled_model_2=styled, mask_2=top_right)
    return {"latent": sample(blended, positive, negative, batch=1, size=SIZE, steps=2, seed=3)}


def prompt_embedding_inversion_and_edit(models):
    """A short value-input inversion (3 steps, 2 inner iterations) and a prompt-to-prompt replace edit."""
    model = models.model
    latent = {"samples": torch.randn(1, 4, SIZE, SIZE, generator=_generator(1)) * 5}
    inversion, reconstruction, _ = run_node(
        "PromptEmbeddingInversion", model=model, clip=models.clip, latent=latent, source_prompt="a cat on a wall",
        steps=STEPS, scheduler="ddim_uniform", guidance=7.5, inner_iterations=2, learning_rate=0.01,
        attention_weight=1.0, attention_target=_pack("inversion.value_input").ATTENTION_TARGETS[0], early_stop=False,
        max_megabytes=64)
    edited, _ = run_node("PromptToPromptEdit", model=model, clip=models.clip, style_inversion=inversion,
                         target_prompt="a dog on a wall", edit_mode="replace", reweight="", tau_v=0.5, tau_c=0.6,
                         tau_s=0.6, tau_u=0.0, blend_source_words="", blend_target_words="", blend_threshold=0.3)
    return {"reconstruction": reconstruction["samples"], "edited": edited["samples"]}


def capture_attention_maps(models):
    positive, negative = _prompts(models)
    captured, maps = run_node("CaptureAttentionMaps", model=models.model, attention="self_attention", layers="custom",
                              custom_layers="output.3.0", start_percent=0.0, end_percent=1.0, max_megabytes=64)
    sample(captured, positive, negative, batch=2, size=SIZE, steps=2)
    (layer,) = maps.layers.values()
    return {"maps": layer.mean.float().clone()}


def fit_style_lora(models):
    """Four fit steps: the losses and the fitted LoRA's weight change (up @ down of every layer)."""
    with tempfile.TemporaryDirectory() as folder:
        saved = folder_paths.folder_names_and_paths.get("loras")
        folder_paths.folder_names_and_paths["loras"] = ([folder], {".safetensors"})
        try:
            with torch.inference_mode():  # as ComfyUI's executor runs nodes
                fitted, lora_name, _ = run_node(
                    "FitStyleLoRA", model=models.model, clip=models.clip, vae=models.vae, image=_image(),
                    prompt="painting of <sss>, girl", resolution=0, rank=4, alpha=4.0, steps=4, learning_rate=1e-3,
                    batch_size=1, target_modules=_pack("lora_fit.targets").DEFAULT_TARGETS, target_pattern="",
                    latent_sampling="sample each step (authors' code)", training_dtype="auto", seed=0,
                    filename_prefix="matrix/lora")
            tensors = comfy.utils.load_torch_file(os.path.join(folder, lora_name))
        finally:
            if saved is None:
                folder_paths.folder_names_and_paths.pop("loras")
            else:
                folder_paths.folder_names_and_paths["loras"] = saved
    deltas = []
    for key in sorted(k for k in tensors if k.endswith(".lora_up.weight")):
        up, down = tensors[key].float(), tensors[key.replace("lora_up", "lora_down")].float()
        deltas.append((up.flatten(1) @ down.flatten(1)).flatten())
    return {"lora_delta": torch.cat(deltas)}


PATHS = {function.__name__: function for function in (
    vsp_in_batch, vsp_reference, style_aligned_in_batch, style_injection, masked_style_blend, ddim_inversion,
    prompt_embedding_inversion_and_edit, capture_attention_maps, fit_style_lora)}


def _run(architecture, path, variant):
    torch.manual_seed(0)
    models = tiny_models(architecture, variant)
    if "partial" in VARIANTS.get(variant, {}):
        with partial_loading(VARIANTS[variant]["partial"]):
            outputs = PATHS[path](models)
            loaded = models.model.model
            assert loaded.model_lowvram and models.model.loaded_size() < models.model.model_size(), \
                "partial_loading did not load the model partially"
    else:
        outputs = PATHS[path](models)
    comfy.model_management.unload_all_models()
    return {name: tensor.detach().float().cpu() for name, tensor in outputs.items()}


@cache
def float32_outputs(architecture, path):
    return _run(architecture, path, "float32")


def run_cell(architecture, path, variant):
    """{output name: relative error against float32} of one cell; NaN where the output is not finite."""
    expected = float32_outputs(architecture, path)
    actual = _run(architecture, path, variant)
    return {name: (relative_error(actual[name], expected[name]) if torch.isfinite(actual[name]).all()
                   else float("nan")) for name in expected}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_the_node_in_this_precision_is_within_its_tolerance_of_float32(architecture, path, variant):
    errors = run_cell(architecture, path, variant)
    print(f"\nPRECISION {architecture} {path} {variant} " + " ".join(f"{k}={v:.2e}" for k, v in errors.items()))
    bound = tolerance(path, variant)
    for name, error in errors.items():
        assert error == error, f"{path} on {architecture} in {variant}: {name} is not finite (NaN or inf)"
        assert error <= bound, f"{path} on {architecture} in {variant}: {name} {error:.2e} > {bound:.1e}"
