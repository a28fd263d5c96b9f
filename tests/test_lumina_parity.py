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
from helpers import relative_error, run_node, style_aligned, vsp
from oracles.lumina_style import twin_sample, with_style_aligned, with_vsp
from support.joint_blocks import lumina_reachable
from support.lumina_twin import build

TOLERANCE = 1e-4
SIZE = 8
REFERENCE_SEED = 3
LAYERS = [0, 1]
# comfy.supported_models.Lumina2 / ZImage (checked in test_lumina_twin); lumina2_grouped: 4 heads on 2 key/value heads
SHIFTS = {"lumina2": 6.0, "z_image": 3.0, "lumina2_grouped": 6.0}
pytestmark = [pytest.mark.one_host,
              pytest.mark.skipif(not lumina_reachable(), reason="this ComfyUI's NextDiT gives no block index")]


def reference_latent():
    return torch.randn(1, 16, SIZE, SIZE, generator=torch.Generator().manual_seed(11))


def external_reference():
    (reference,) = run_node("StyleReferenceLatent", latent={"samples": reference_latent()}, clip=None, prompt="",
                            reference_seed=REFERENCE_SEED, cache_megabytes=64, cache_on_cpu=False,
                            conditioning=random_dits.lumina2_conditioning(2))
    return reference


def same_positions(model, **kwargs):
    (styled,) = run_node("StyleAlignedAttention", model=model, share_attention=True, adain_queries=True,
                         adain_keys=True, adain_values=False, shared_score_scale=1.0, shared_score_shift=0.0,
                         shared_group_norm="auto", layers="all_blocks", custom_layers="", start_percent=0.0,
                         end_percent=1.0, reference_positions="same", **kwargs)
    return styled


METHODS = {
    "vsp": (lambda m, **kw: vsp(m, layers="all_blocks", **kw), lambda twin: lambda **kw: with_vsp(twin, LAYERS, **kw)),
    "vsp_strength": (lambda m, **kw: vsp(m, layers="custom", custom_layers="double.1", strength=0.7, **kw),
                     lambda twin: lambda **kw: with_vsp(twin, [1], strength=0.7, **kw)),
    "style_aligned": (lambda m, **kw: style_aligned(m, layers="auto", shared_score_scale=1.1, **kw),
                      lambda twin: lambda **kw: with_style_aligned(twin, LAYERS, style_factor=1.1, **kw)),
    "style_aligned_same_positions": (same_positions,
                                     lambda twin: lambda **kw: with_style_aligned(twin, LAYERS, shift=False, **kw)),
}


def sample(model, noise, steps, cfg):
    positive, negative = random_dits.lumina2_conditioning(0), random_dits.lumina2_conditioning(1)
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", positive, negative, torch.zeros_like(noise),
                               seed=1, disable_pbar=True)


@pytest.mark.parametrize("name", SHIFTS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("steps,cfg", [(1, 1.0), (4, 1.0), (4, 3.0)])
@pytest.mark.parametrize("source", ["in_batch", "external"])
def test_lumina_node_matches_the_independent_implementation_on_diffusers(name, method, steps, cfg, source):
    model, twin = build(name)
    node, oracle = METHODS[method]
    external = source == "external"
    noise = comfy.sample.prepare_noise(torch.zeros(2 if external else 3, 16, SIZE, SIZE), 1)
    styled = node(model, reference=external_reference()) if external else node(model)
    actual = sample(styled, noise, steps, cfg)
    reference = None
    if external:
        latent = reference_latent()
        reference = (model.model.process_latent_in(latent), comfy.sample.prepare_noise(latent, REFERENCE_SEED),
                     random_dits.lumina2_conditioning(2))
    expected = model.model.process_latent_out(twin_sample(twin, noise, steps, cfg, random_dits.lumina2_conditioning(0),
                                                          random_dits.lumina2_conditioning(1), oracle(twin),
                                                          SHIFTS[name], reference=reference))
    plain = sample(model, noise, steps, cfg)
    error, gap = relative_error(actual, expected), relative_error(actual, plain)
    print(f"{name} {method} {steps} steps cfg {cfg} {source}: error {error:.2e}, styled vs plain {gap:.2e}")
    assert error <= TOLERANCE
    assert gap > 30 * TOLERANCE  # the style acts: parity is not plain against plain
