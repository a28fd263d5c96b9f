"""Parity on Lumina 2 and Z-Image: the pack's Visual Style Prompting and StyleAligned nodes sampled through ComfyUI on
the tiny random Lumina 2 (grouped-query attention) and Z-Image (caption and image padded to 32 tokens), against
independent implementations (tests/oracles/lumina_style.py: Stable Flow's swap, AlignedGen's shared attention at
ComfyUI's positions) on the diffusers twins with the same weights (tests/support/lumina_twin.py), the same euler steps
written out by hand, within 1e-4 relative: one step and four, cfg 1 and cfg 3, in-batch and with an external latent
reference. ComfyUI 0.3.75 gives NextDiT's attention calls no block index, and the nodes refuse Lumina there."""

import pytest
import torch

import comfy.sample
import random_dits
from support.dit_parity import (SIZE, TOLERANCE, external_reference, oracle_reference, same_positions,
                                sample)
from helpers import relative_error, style_aligned, vsp
from oracles.lumina_style import twin_sample, with_style_aligned, with_vsp
from support.joint_blocks import lumina_reachable
from support.lumina_twin import build

LAYERS = [0, 1]
# comfy.supported_models.Lumina2 / ZImage (checked in test_lumina_twin); lumina2_grouped: 4 heads on 2 key/value heads
SHIFTS = {"lumina2": 6.0, "z_image": 3.0, "lumina2_grouped": 6.0}
pytestmark = [pytest.mark.one_host,
              pytest.mark.skipif(not lumina_reachable(), reason="this ComfyUI's NextDiT gives no block index")]


METHODS = {
    "vsp": (lambda m, **kw: vsp(m, layers="all_blocks", **kw), lambda twin: lambda **kw: with_vsp(twin, LAYERS, **kw)),
    "vsp_strength": (lambda m, **kw: vsp(m, layers="custom", custom_layers="double.1", strength=0.7, **kw),
                     lambda twin: lambda **kw: with_vsp(twin, [1], strength=0.7, **kw)),
    "style_aligned": (lambda m, **kw: style_aligned(m, layers="auto", shared_score_scale=1.1, **kw),
                      lambda twin: lambda **kw: with_style_aligned(twin, LAYERS, style_factor=1.1, **kw)),
    "style_aligned_same_positions": (same_positions,
                                     lambda twin: lambda **kw: with_style_aligned(twin, LAYERS, shift=False, **kw)),
}


@pytest.mark.parametrize("name", SHIFTS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("steps,cfg", [(1, 1.0), (4, 1.0), (4, 3.0)])
@pytest.mark.parametrize("source", ["in_batch", "external"])
def test_lumina_node_matches_the_independent_implementation_on_diffusers(name, method, steps, cfg, source):
    model, twin = build(name)
    node, oracle = METHODS[method]
    external = source == "external"
    noise = comfy.sample.prepare_noise(torch.zeros(2 if external else 3, 16, SIZE, SIZE), 1)
    styled = node(model, reference=external_reference(random_dits.lumina2_conditioning(2))) if external else node(model)
    actual = sample(styled, noise, steps, cfg, random_dits.lumina2_conditioning(0), random_dits.lumina2_conditioning(1))
    reference = oracle_reference(model, random_dits.lumina2_conditioning(2)) if external else None
    expected = model.model.process_latent_out(twin_sample(twin, noise, steps, cfg, random_dits.lumina2_conditioning(0),
                                                          random_dits.lumina2_conditioning(1), oracle(twin),
                                                          SHIFTS[name], reference=reference))
    plain = sample(model, noise, steps, cfg, random_dits.lumina2_conditioning(0), random_dits.lumina2_conditioning(1))
    error, gap = relative_error(actual, expected), relative_error(actual, plain)
    print(f"{name} {method} {steps} steps cfg {cfg} {source}: error {error:.2e}, styled vs plain {gap:.2e}")
    assert error <= TOLERANCE
    assert gap > 30 * TOLERANCE  # the style acts: parity is not plain against plain
