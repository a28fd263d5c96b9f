"""Flux in the precisions and memory modes ComfyUI runs it in: the tiny Flux in bfloat16, float16 and
float8_e4m3fn weights cast per layer to bfloat16 (manual cast), and float32 loaded partially (--lowvram:
weights cast and patched per layer during the forward), with a weight patch (a LoRA's diff) on a styled
block's weights.

The bound: a styled run's error against the same run in float32 stays within 1.5x the plain model's own
error in that precision (plus 1e-4): the style adds no rounding of its own beyond the model's (measured:
bf16 1.4e-2 plain, 1.5e-2 VSP, 1.7e-2 StyleAligned at cfg 3; fp16 2.8e-4 / 2.8e-4 / 8.3e-4 against 9.2e-4
plain at cfg 3; fp8 2.4e-2 for all)."""

import pytest
import torch

import random_dits
from helpers import partial_loading, run_node, style_aligned, vsp
from support.flux import HEIGHT, WIDTH, conditioning, flux_sample

pytestmark = pytest.mark.one_host

VARIANTS = {"bf16": {"dtype": torch.bfloat16}, "fp16": {"dtype": torch.float16},
            "fp8": {"dtype": torch.float8_e4m3fn, "manual_cast_dtype": torch.bfloat16}}
PATCHED_WEIGHT = "diffusion_model.single_blocks.1.linear1.weight"


def error(actual, expected) -> float:
    return float((actual.float() - expected).norm() / expected.norm())


def latent_reference():
    (reference,) = run_node("StyleReferenceLatent", latent={"samples": torch.randn(1, 16, HEIGHT, WIDTH,
                                                                                     generator=torch.Generator().manual_seed(5))},
                            clip=None, prompt="", reference_seed=3, cache_megabytes=64, cache_on_cpu=False,
                            conditioning=conditioning(2))
    return reference


PATHS = {
    "vsp_in_batch": (lambda m: vsp(m, layers="auto"), 1.0),
    "vsp_reference": (lambda m: vsp(m, layers="auto", reference=latent_reference()), 1.0),
    "style_aligned_in_batch": (lambda m: style_aligned(m, layers="auto", shared_score_scale=1.1), 3.0),
}


@pytest.fixture(scope="module")
def float32_runs():
    model = random_dits.tiny_flux()
    return {path: (flux_sample(style(model), cfg=cfg, steps=2), flux_sample(model, cfg=cfg, steps=2))
            for path, (style, cfg) in PATHS.items()}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("path", PATHS)
def test_a_style_adds_no_error_of_its_own_in_low_precision(float32_runs, variant, path):
    model = random_dits.tiny_flux(**VARIANTS[variant])
    style, cfg = PATHS[path]
    styled, plain = flux_sample(style(model), cfg=cfg, steps=2), flux_sample(model, cfg=cfg, steps=2)
    styled32, plain32 = float32_runs[path]
    assert torch.isfinite(styled).all()
    assert error(styled, styled32) <= 1.5 * error(plain, plain32) + 1e-4
    assert error(styled, plain) > 1e-3  # the style acts in this precision too
    assert torch.equal(flux_sample(model, cfg=cfg, steps=2), plain)  # and leaves the model as it was


def with_weight_patch(model):
    clone = model.clone()
    weight = model.get_model_object(PATCHED_WEIGHT.removesuffix(".weight")).weight
    diff = 0.05 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(9))
    clone.add_patches({PATCHED_WEIGHT: (diff,)}, 1.0)
    return clone


@pytest.mark.parametrize("path", ["vsp_in_batch", "style_aligned_in_batch"])
def test_a_weight_patch_acts_inside_styled_blocks_fully_and_partially_loaded(path):
    model = random_dits.tiny_flux()
    style, cfg = PATHS[path]
    patched = with_weight_patch(model)
    plain = flux_sample(patched, cfg=cfg, steps=2)
    full = flux_sample(style(patched), cfg=cfg, steps=2)
    assert error(full, flux_sample(style(model), cfg=cfg, steps=2)) > 1e-3  # the patch reaches the styled block
    with partial_loading(0.5):
        partial = flux_sample(style(patched), cfg=cfg, steps=2)
        assert error(partial, full) < 1e-6
    assert torch.equal(flux_sample(patched, cfg=cfg, steps=2), plain)  # the patched model as it was, patch included
