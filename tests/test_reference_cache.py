"""The reference K/V cache: the reference branch runs once per sigma, replays give the same images,
memory stays within its budget and is released."""

import pytest
import torch

import comfy.model_management
from conftest import pack_submodule
from helpers import assert_relative_close, encode, inversion_reference, invert, latent_reference, sample, style_aligned, vsp
from support.reference_cache import counting_reference_passes, reference_pass_of

reference_module = pack_submodule("attention_patches.reference")

STEPS = 4


def styled_with(node, models, reference):
    if node == "vsp":
        return vsp(models.model, reference=reference)
    return style_aligned(models.model, reference=reference, shared_group_norm="on", shared_score_shift=0.5)


def run(model, models):
    return sample(model, encode(models.clip, "a dog"), encode(models.clip, ""), batch=2, steps=STEPS)


@pytest.mark.parametrize("node", ["vsp", "style_aligned"])
def test_cached_runs_replay_the_reference_and_equal_the_uncached_run(models, node):
    uncached = run(styled_with(node, models, latent_reference(models, cache_megabytes=0)), models)
    styled = styled_with(node, models, latent_reference(models))
    calls, handle = counting_reference_passes(styled)
    try:
        first = run(styled, models)
        passes_first = len(calls)
        second = run(styled, models)
    finally:
        handle.remove()
    assert passes_first == STEPS and len(calls) == STEPS  # the second run never runs the reference
    assert len(reference_pass_of(styled).cache) == STEPS
    assert_relative_close(first, uncached)
    assert_relative_close(second, uncached)


def test_an_inversion_reference_is_cached_too(sd15):
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    positive, negative = encode(sd15.clip, "a painting"), encode(sd15.clip, "")
    _, trajectory = invert(sd15.model, latent, positive, negative, steps=STEPS)
    results = []
    for megabytes in (0, 64):
        reference = inversion_reference(sd15, trajectory, cache_megabytes=megabytes, cache_on_cpu=True)
        styled = vsp(sd15.model, reference=reference)
        results.append([run(styled, sd15), run(styled, sd15)])
    (uncached, _), (cached_first, cached_second) = results
    assert_relative_close(cached_first, uncached)
    assert_relative_close(cached_second, uncached)


def test_memory_stays_within_the_budget_and_results_do_not_change(sd15):
    styled = vsp(sd15.model, reference=latent_reference(sd15))
    run(styled, sd15)
    one_sigma = reference_pass_of(styled).cache.bytes // STEPS
    small = vsp(sd15.model, reference=latent_reference(sd15, cache_megabytes=1))
    cache = reference_pass_of(small).cache
    cache.max_bytes = 2 * one_sigma + one_sigma // 2  # room for two recordings
    calls, handle = counting_reference_passes(small)
    try:
        first, second = run(small, sd15), run(small, sd15)
    finally:
        handle.remove()
    assert len(cache) == 2 and cache.bytes <= cache.max_bytes
    assert len(calls) == STEPS + (STEPS - 2)
    assert_relative_close(second, first)


def test_unloading_the_model_releases_the_cache(sd15):
    styled = vsp(sd15.model, reference=latent_reference(sd15))
    run(styled, sd15)
    cache = reference_pass_of(styled).cache
    assert len(cache) == STEPS and cache.bytes > 0
    comfy.model_management.unload_all_models()
    assert len(cache) == 0 and cache.bytes == 0


def test_other_weights_are_recorded_anew(sd15):
    styled = vsp(sd15.model, reference=latent_reference(sd15))
    run(styled, sd15)
    key = "diffusion_model.output_blocks.4.1.transformer_blocks.0.attn1.to_k.weight"
    weight = sd15.model.get_model_object(key)
    diff = 0.5 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(8))
    lora_like = styled.clone()
    lora_like.add_patches({key: (diff,)}, 1.0)  # what a LoRA loader does after the style node
    calls, handle = counting_reference_passes(lora_like)
    try:
        patched = run(lora_like, sd15)
    finally:
        handle.remove()
    assert len(calls) == STEPS
    fresh = sd15.model.clone()
    fresh.add_patches({key: (diff,)}, 1.0)
    uncached = run(vsp(fresh, reference=latent_reference(sd15, cache_megabytes=0)), sd15)
    assert_relative_close(patched, uncached)
