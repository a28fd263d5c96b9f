"""Parity on Qwen-Image: the pack's Visual Style Prompting and StyleAligned nodes sampled through ComfyUI on the
tiny random Qwen-Image, against independent implementations (tests/oracles/qwen_style.py: Stable Flow's swap,
AlignedGen's shared attention with ComfyUI's positions) on a diffusers QwenImageTransformer2DModel with the
same weights, the same euler steps written out by hand, within 1e-4 relative: one step and four, cfg 1 and
cfg 3, in-batch and with an external latent reference (4-D, as an empty or VAE-encoded latent may come)."""

import pytest
import torch

import comfy.sample
import random_dits
from support.dit_parity import (SIZE, TOLERANCE, external_reference, oracle_reference, same_positions,
                                sample)
from helpers import relative_error, style_aligned, vsp
from oracles.qwen_style import twin_sample, with_style_aligned, with_vsp
from support.qwen_twin import twin_from_comfy

BLOCKS = [0, 1]
# ComfyUI's Qwen-Image computes the same on 0.3.75 and 0.8.0 for one frame (checked by the twin test on both)
pytestmark = pytest.mark.one_host


@pytest.fixture(scope="module")
def qwen():
    model = random_dits.tiny_qwen_image(seed=4)
    return model, twin_from_comfy(model)


METHODS = {
    "vsp": (lambda m, **kw: vsp(m, layers="all_blocks", **kw), lambda twin: lambda **kw: with_vsp(twin, BLOCKS, **kw)),
    "vsp_strength": (lambda m, **kw: vsp(m, layers="custom", custom_layers="double.1", strength=0.7, **kw),
                     lambda twin: lambda **kw: with_vsp(twin, [1], strength=0.7, **kw)),
    "style_aligned": (lambda m, **kw: style_aligned(m, layers="auto", shared_score_scale=1.1, **kw),
                      lambda twin: lambda **kw: with_style_aligned(twin, BLOCKS, style_factor=1.1, **kw)),
    "style_aligned_same_positions": (same_positions,
                                     lambda twin: lambda **kw: with_style_aligned(twin, BLOCKS, shift=False, **kw)),
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("steps,cfg", [(1, 1.0), (4, 1.0), (4, 3.0)])
@pytest.mark.parametrize("source", ["in_batch", "external"])
def test_qwen_image_node_matches_the_independent_implementation_on_diffusers(qwen, method, steps, cfg, source):
    model, twin = qwen
    node, oracle = METHODS[method]
    external = source == "external"
    noise = comfy.sample.prepare_noise(torch.zeros(2 if external else 3, 16, 1, SIZE, SIZE), 1)
    styled = node(model, reference=external_reference(random_dits.qwen_conditioning(2))) if external else node(model)
    actual = sample(styled, noise, steps, cfg, random_dits.qwen_conditioning(0), random_dits.qwen_conditioning(1))
    reference = oracle_reference(model, random_dits.qwen_conditioning(2), frames=True) if external else None
    expected = model.model.process_latent_out(twin_sample(twin, noise, steps, cfg, random_dits.qwen_conditioning(0),
                                                          random_dits.qwen_conditioning(1), oracle(twin),
                                                          reference=reference))
    plain = sample(model, noise, steps, cfg, random_dits.qwen_conditioning(0), random_dits.qwen_conditioning(1))
    assert relative_error(actual, expected) <= TOLERANCE
    assert relative_error(actual, plain) > 30 * TOLERANCE  # the style acts: parity is not plain against plain
