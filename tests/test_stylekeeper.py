"""StyleKeeper's options of Visual Style Prompting (issue 17): the swap in the conditional branch only,
the unconditional branch keeping plain self-attention, in every cond/uncond layout ComfyUI uses, and
its parity with an independent implementation on the diffusers twin; colour calibration of the
denoised prediction toward a reference image's latent statistics in a window of timesteps."""

import pytest
import torch

from conftest import pack_submodule
from helpers import (LAYOUTS, assert_relative_close, attention_by_hand, batch_prompts, encode, inversion_reference,
                     invert, latent_reference, record_attention, relative_error, run_node, sample, selected_layers,
                     self_attention_module, vsp)
from oracles import vsp as reference_vsp
from oracles.attention import PlainProcessor, late_up_blocks, self_attention_processor_names
from support.parity import (TOLERANCE, ExternalReferenceCase, comfy_sample, random_prompts, reference_sample,
                            scale_factor, start_noise)
from support.parity import twins  # noqa: F401 (a fixture)


def chunks_by_kind(attn1_calls, attn2_calls, rows):
    """[(kind, attn1 call, rows slice)] of every chunk: an uncond chunk's rows share one prompt ("")."""
    chunks = []
    for self_call, cross_call in zip(attn1_calls, attn2_calls):
        for start in range(0, self_call["q"].shape[0], rows):
            keys = cross_call["k"][start:start + rows]
            kind = "uncond" if all(torch.equal(keys[0], k) for k in keys[1:]) else "cond"
            chunks.append((kind, self_call, slice(start, start + rows)))
    return chunks


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("cfg", [4.0, 1.0])
def test_in_batch_the_uncond_chunk_is_plain_and_the_cond_chunk_swaps(models, layout, cfg):
    positive, negative = batch_prompts(models)
    styled = LAYOUTS[layout](vsp(models.model, cond_only=True))
    layer = selected_layers(vsp(models.model))[0]
    heads = self_attention_module(models.model, layer).attn1.heads
    with record_attention(models.model, layer) as attn1, record_attention(models.model, layer, "attn2") as attn2:
        sample(styled, positive, negative, batch=3, steps=1, cfg=cfg)
    chunks = chunks_by_kind(attn1, attn2, 3)
    assert sorted(kind for kind, _, _ in chunks) == (["cond", "uncond"] if cfg > 1 else ["cond"])
    for kind, call, rows in chunks:
        q, k, v, out = (call[name][rows] for name in ("q", "k", "v", "out"))
        if kind == "uncond":
            expected = attention_by_hand(q, k, v, heads)
        else:
            expected = torch.cat([attention_by_hand(q[:1], k[:1], v[:1], heads),
                                  attention_by_hand(q[1:], k[:1].expand(2, -1, -1), v[:1].expand(2, -1, -1), heads)])
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_with_an_external_reference_only_the_cond_targets_take_its_keys_and_values(models):
    positive, negative = batch_prompts(models)  # three prompts: the cond chunk's rows differ
    styled = vsp(models.model, reference=latent_reference(models), cond_only=True)
    layer = selected_layers(styled)[-1]
    heads = self_attention_module(styled, layer).attn1.heads
    with record_attention(models.model, layer) as attn1, record_attention(models.model, layer, "attn2") as attn2:
        sample(styled, positive, negative, batch=3, steps=1, cfg=4.0)
    (reference_call, target_call), cross = attn1, attn2[1:]
    assert reference_call["q"].shape[0] == 1 and target_call["q"].shape[0] == 6
    chunks = chunks_by_kind([target_call], cross, 3)
    assert sorted(kind for kind, _, _ in chunks) == ["cond", "uncond"]
    for kind, call, rows in chunks:
        q, k, v, out = (call[name][rows] for name in ("q", "k", "v", "out"))
        keys, values = (k, v) if kind == "uncond" else (reference_call["k"].expand(3, -1, -1),
                                                      reference_call["v"].expand(3, -1, -1))
        torch.testing.assert_close(out.double(), attention_by_hand(q, keys, values, heads), rtol=1e-5, atol=1e-5)


def test_off_is_todays_swap_and_on_differs(sd15):
    positive, negative = batch_prompts(sd15)
    both = sample(vsp(sd15.model), positive, negative, batch=3)
    assert torch.equal(sample(vsp(sd15.model, cond_only=False), positive, negative, batch=3), both)
    assert relative_error(sample(vsp(sd15.model, cond_only=True), positive, negative, batch=3), both) > 1e-3


def test_cond_only_in_batch_sampling_parity(twins):
    prompts, noise = random_prompts(twins, batch=3), start_noise(3)
    ours = comfy_sample(vsp(twins.comfy_model, cond_only=True), prompts, 4, 4.0, noise)
    unet = twins.diffusers_unet
    reference_vsp.install(unet, self_attention_processor_names(unet, late_up_blocks(unet)), cond_only=True)
    try:
        expected = reference_sample(twins, prompts, noise)
    finally:
        unet.set_attn_processor(PlainProcessor())
    assert_relative_close(ours * scale_factor(twins), expected, TOLERANCE)
    both = comfy_sample(vsp(twins.comfy_model), prompts, 4, 4.0, noise)
    assert relative_error(both * scale_factor(twins), expected) > 100 * TOLERANCE


def test_cond_only_external_reference_sampling_parity(twins):
    prompts, noise = random_prompts(twins, batch=2), start_noise(2)
    case = ExternalReferenceCase(twins)
    ours = comfy_sample(vsp(twins.comfy_model, reference=case.node_output, cond_only=True), prompts, 4, 4.0, noise)
    unet = twins.diffusers_unet
    external = reference_vsp.ExternalReference()
    reference_vsp.install(unet, self_attention_processor_names(unet, late_up_blocks(unet)), external=external,
                          cond_only=True)
    try:
        expected = reference_sample(twins, prompts, noise, lambda s: case.run_alone_before_each_call(s, external))
    finally:
        unet.set_attn_processor(PlainProcessor())
    assert_relative_close(ours * scale_factor(twins), expected, TOLERANCE)


calibration = pack_submodule("attention_patches.color_calibration")


def test_channel_calibration_gives_the_reference_statistics_by_hand():
    g = torch.Generator().manual_seed(0)
    x0, reference = torch.randn(2, 4, 8, 8, generator=g) * 3 + 1, torch.randn(1, 4, 6, 10, generator=g) * 0.5 - 2
    out = calibration.channel_calibrated(x0, reference)
    torch.testing.assert_close(out.mean((-2, -1)), reference.mean((-2, -1)).expand(2, -1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.std((-2, -1)), reference.std((-2, -1)).expand(2, -1), rtol=1e-4, atol=1e-5)
    # each image keeps its own layout: a per-channel affine map of itself
    standardised = (x0 - x0.mean((-2, -1), keepdim=True)) / x0.std((-2, -1), keepdim=True)
    torch.testing.assert_close((out - out.mean((-2, -1), keepdim=True)) / out.std((-2, -1), keepdim=True), standardised,
                               rtol=1e-4, atol=1e-4)


def recording_post_cfg(model, seen):
    clone = model.clone()
    clone.set_model_sampler_post_cfg_function(
        lambda args: seen.append((float(args["sigma"][0]), args["denoised"].clone())) or args["denoised"])
    return clone


def timestep_of(model, sigma):
    return float(model.get_model_object("model_sampling").timestep(torch.tensor(sigma)))


def test_colour_calibration_acts_inside_its_window_only_and_is_off_by_default(sd15):
    positive, negative = encode(sd15.clip, "a dog"), encode(sd15.clip, "")
    reference = latent_reference(sd15)
    before, after = [], []
    model = recording_post_cfg(sd15.model, before)  # runs before the node's own post-CFG function
    styled = recording_post_cfg(vsp(model, reference=reference, calibrate_colors=True), after)
    sample(styled, positive, negative, batch=2, steps=50, scheduler="ddim_uniform", cfg=4.0)
    clean = reference.clean_latent(styled.model)
    inside = [t for t in (timestep_of(sd15.model, sigma) for sigma, _ in after) if 100 < t < 150]
    assert len(inside) == 3  # 141, 121, 101 of a 50-step DDIM schedule
    for (sigma, ours), (_, given) in zip(after, before):
        if 100 < timestep_of(sd15.model, sigma) < 150:
            torch.testing.assert_close(ours.mean((-2, -1)), clean.mean((-2, -1)).expand(2, -1), rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(ours.std((-2, -1)), clean.std((-2, -1)).expand(2, -1), rtol=1e-4, atol=1e-4)
        else:
            assert torch.equal(ours, given)
    options = vsp(sd15.model, reference=reference).model_options
    assert "sampler_post_cfg_function" not in options  # off by default: nothing installed
    off = vsp(sd15.model, reference=reference, strength=0.0, calibrate_colors=True).model_options
    assert "sampler_post_cfg_function" not in off  # strength 0 is no style at all


def test_colour_calibration_needs_a_reference_image(sd15):
    with pytest.raises(ValueError, match="calibrate_colors: needs a reference image"):
        vsp(sd15.model, calibrate_colors=True)


def test_the_clean_latent_of_either_reference_is_the_image_in_the_models_space(sd15):
    image = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    expected = sd15.model.model.process_latent_in(image)
    (latent_ref,) = run_node("StyleReferenceLatent", latent={"samples": image}, clip=sd15.clip, prompt="",
                             reference_seed=0, cache_megabytes=0, cache_on_cpu=False)
    _, trajectory = invert(sd15.model, image, encode(sd15.clip, ""), encode(sd15.clip, ""), 3)
    inversion_ref = inversion_reference(sd15, trajectory)
    for reference in (latent_ref, inversion_ref):
        torch.testing.assert_close(reference.clean_latent(sd15.model.model), expected, rtol=1e-6, atol=1e-6)


def test_an_empty_step_range_is_plain_sampling_and_calibration_keeps_its_own_window(sd15):
    positive, negative = encode(sd15.clip, "a dog"), encode(sd15.clip, "")
    reference = latent_reference(sd15)
    run = lambda model: sample(model, positive, negative, batch=2, steps=10, scheduler="ddim_uniform", cfg=4.0)  # noqa: E731
    plain = run(sd15.model)  # 10 DDIM steps: timesteps 901, 801, ..., 101, 1
    for start, end in ((0.5, 0.5), (0.0, 0.0)):  # nothing at all, as at strength 0
        styled = vsp(sd15.model, reference=reference, start_percent=start, end_percent=end, cond_only=True,
                     calibrate_colors=True, nvqg_weight=1.0)
        assert "sampler_post_cfg_function" not in styled.model_options
        assert torch.equal(run(styled), plain)
    # the swap stopping at half the schedule leaves the calibration's window (t < 150) to the calibration
    seen = []
    early = recording_post_cfg(vsp(sd15.model, reference=reference, end_percent=0.5, calibrate_colors=True), seen)
    run(early)
    clean = reference.clean_latent(sd15.model.model)
    (last_inside,) = [x0 for sigma, x0 in seen if abs(timestep_of(sd15.model, sigma) - 101) < 1]
    torch.testing.assert_close(last_inside.mean((-2, -1)), clean.mean((-2, -1)).expand(2, -1), rtol=1e-4, atol=1e-4)
