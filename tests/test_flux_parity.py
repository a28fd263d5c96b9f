"""Parity on Flux: the pack's Visual Style Prompting and StyleAligned nodes sampled through ComfyUI on the
tiny random Flux, against independent implementations (tests/oracles/flux_style.py: Stable Flow's swap,
AlignedGen's shared attention) on a diffusers FluxTransformer2DModel with the same weights, the same
euler steps written out by hand, within 1e-4 relative: one step (one denoiser call per branch) and four,
cfg 1 (Flux dev's) and cfg 3 (cond and uncond batched), in-batch and with an external latent reference."""

import pytest
import torch

import comfy.sample
import comfy.samplers
import random_dits
from helpers import relative_error, run_node, style_aligned, vsp
from oracles.flux_style import record_reference, with_aligned_gen, with_vsp
from support.flux import HEIGHT, WIDTH, conditioning, flux_noise, flux_sample
from support.flux_twin import twin_denoise, twin_from_comfy

TOLERANCE = 1e-4
GUIDANCE = 3.5  # flux_conditioning's
DOUBLE, SINGLE = [("double", 0), ("double", 1)], [("single", 0), ("single", 1)]
REFERENCE_SEED = 3


@pytest.fixture(scope="module")
def flux():
    model = random_dits.tiny_flux(seed=4)
    return model, twin_from_comfy(model)


def reference_latent():
    return torch.randn(1, 16, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(11))


def external_reference():
    (reference,) = run_node("StyleReferenceLatent", latent={"samples": reference_latent()}, clip=None, prompt="",
                            reference_seed=REFERENCE_SEED, cache_megabytes=64, cache_on_cpu=False,
                            conditioning=conditioning(2))
    return reference


def twin_sample(model, twin, install, noise, steps, cfg, external):
    """ComfyUI's euler on the simple schedule, written out, with the twin as the model."""
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", steps)
    (positive, pos_extra), (negative, neg_extra) = conditioning(0)[0], conditioning(1)[0]
    batch = noise.shape[0]
    x = noise.clone()  # sigma 1: the noise alone
    if external:
        (ref_context, ref_extra) = conditioning(2)[0]
        ref_clean = model.model.process_latent_in(reference_latent())
        ref_noise = comfy.sample.prepare_noise(reference_latent(), REFERENCE_SEED)
    for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        branches = [(positive, pos_extra)] + ([(negative, neg_extra)] if cfg != 1.0 else [])
        context = torch.cat([c.expand(batch, -1, -1) for c, _ in branches])
        pooled = torch.cat([e["pooled_output"].expand(batch, -1) for _, e in branches])
        kwargs = {"chunks": len(branches)}
        if external:
            ref_x = sigma * ref_noise + (1 - sigma) * ref_clean
            kwargs = {"reference": record_reference(twin, ALL, lambda: twin_denoise(
                twin, ref_x, sigma, ref_context, ref_extra["pooled_output"], GUIDANCE))}
        with install(**kwargs):
            velocity = twin_denoise(twin, x.repeat(len(branches), 1, 1, 1), sigma, context, pooled, GUIDANCE)
        denoised = (x.repeat(len(branches), 1, 1, 1) - sigma * velocity).chunk(len(branches))
        guided = denoised[0] if cfg == 1.0 else denoised[1] + cfg * (denoised[0] - denoised[1])
        x = x + (sigma_next - sigma) * (x - guided) / sigma
    return model.model.process_latent_out(x)


ALL = DOUBLE + SINGLE
METHODS = {
    # the node on the ComfyUI model, the oracle on the twin (both on their auto preset's blocks)
    "vsp": (lambda m, **kw: vsp(m, layers="auto", **kw), lambda twin: lambda **kw: with_vsp(twin, ALL, **kw)),
    "vsp_strength": (lambda m, **kw: vsp(m, layers="custom", custom_layers="double.1, single", strength=0.7, **kw),
                     lambda twin: lambda **kw: with_vsp(twin, [("double", 1), *SINGLE], strength=0.7, **kw)),
    "style_aligned": (lambda m, **kw: style_aligned(m, layers="auto", shared_score_scale=1.1, **kw),
                      lambda twin: lambda **kw: with_aligned_gen(twin, SINGLE, style_factor=1.1, **kw)),
    "style_aligned_same_positions": (
        lambda m, **kw: run_node("StyleAlignedAttention", model=m, share_attention=True, adain_queries=True,
                                 adain_keys=True, adain_values=False, shared_score_scale=1.0, shared_score_shift=0.0,
                                 shared_group_norm="auto", layers="all_blocks", custom_layers="", start_percent=0.0,
                                 end_percent=1.0, reference_positions="same", **kw)[0],
        lambda twin: lambda **kw: with_aligned_gen(twin, ALL, style_factor=1.0, shift=False, **kw)),
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("steps,cfg", [(1, 1.0), (4, 1.0), (4, 3.0)])
@pytest.mark.parametrize("source", ["in_batch", "external"])
def test_flux_node_matches_the_independent_implementation_on_diffusers(flux, method, steps, cfg, source):
    model, twin = flux
    node, oracle = METHODS[method]
    external = source == "external"
    batch = 2 if external else 3
    noise = flux_noise(batch, seed=1)
    styled = node(model, reference=external_reference()) if external else node(model)
    actual = flux_sample(styled, batch=batch, cfg=cfg, steps=steps, noise=noise)
    expected = twin_sample(model, twin, oracle(twin), noise, steps, cfg, external)
    plain = flux_sample(model, batch=batch, cfg=cfg, steps=steps, noise=noise)
    assert relative_error(actual, expected) <= TOLERANCE
    assert relative_error(actual, plain) > 100 * TOLERANCE  # the style acts: parity is not plain against plain
