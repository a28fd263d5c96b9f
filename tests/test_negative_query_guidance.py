"""StyleKeeper's negative visual query guidance on Visual Style Prompting (issue 17): the guided
prediction against the stated formula computed from three branches the test runs itself, weight 0
bit-identical to the node without it, the query swap by hand at a layer, where it acts, its errors,
and sampling parity with an independent implementation on the diffusers twin."""

import pytest
import torch

import comfy.samplers

from conftest import pack_submodule
from helpers import (LAYOUTS, assert_relative_close, attention_by_hand, batch_prompts, latent_reference,
                     record_attention, relative_error, sample, selected_layers, self_attention_module, style_aligned,
                     vsp, with_separate_cond_batches)
from oracles import vsp as reference_vsp
from oracles.attention import PlainProcessor, late_up_blocks, self_attention_processor_names
from oracles.sampling import ddim_sample, sd_scheduler, sigma_of_timestep
from support.parity import TOLERANCE as PARITY
from support.parity import (ExternalReferenceCase, all_self_attention, comfy_sample, random_prompts, scale_factor,
                            start_noise, twins)  # noqa: F401  (twins: the fixture)
from support.reference_cache import counting_reference_passes, reference_pass_of

WEIGHT = 1.5


def recorder(model, seen: list, compute=lambda args: args["denoised"]):
    """A clone whose post-CFG function records compute(args) (installed before a node's own: runs first)."""
    clone = model.clone()
    clone.set_model_sampler_post_cfg_function(lambda args: seen.append(compute(args)) or args["denoised"])
    return clone


def by_hand(layers: dict, heads: dict):
    """Test-side attn1 replace patches: per layer, fn(q, k, v) of each cond/uncond chunk in float64."""

    def patch(layer):
        def replace(q, k, v, extra_options):
            chunks = len(extra_options["cond_or_uncond"])
            size = q.shape[0] // chunks
            out = [layers[layer](q[i:i + size], k[i:i + size], v[i:i + size], heads[layer])
                   for i in range(0, q.shape[0], size)]
            return torch.cat(out).to(q.dtype)
        return replace

    return {"transformer_options": {"patches_replace": {"attn1": {layer: patch(layer) for layer in layers}}}}


def key_value_swap(q, k, v, heads):  # item 0 of the chunk is the reference: plain; the others take its k, v
    rest = q.shape[0] - 1
    return torch.cat([attention_by_hand(q[:1], k[:1], v[:1], heads),
                      attention_by_hand(q[1:], k[:1].expand(rest, -1, -1), v[:1].expand(rest, -1, -1), heads)])


def query_swap(q, k, v, heads):  # the others take item 0's queries and keep their own keys and values
    rest = q.shape[0] - 1
    return torch.cat([attention_by_hand(q[:1], k[:1], v[:1], heads),
                      attention_by_hand(q[:1].expand(rest, -1, -1), k[1:], v[1:], heads)])


def branch(args, index, options):
    """One branch run alone by the test: the positive (0) or the unconditional prompt (1)."""
    conds = [args["cond"], None] if index == 0 else [None, args["uncond"]]
    return comfy.samplers.calc_cond_batch(args["model"], conds, args["input"], args["sigma"], options)[index]


@pytest.mark.parametrize("cfg, nvqg_layers, cond_only, layout", [
    (4.0, "style_layers", True, "together"), (1.0, "style_layers", True, "together"),
    (4.0, "other_layers", True, "together"), (1.0, "other_layers", True, "together"),
    (4.0, "style_layers", False, "together"), (1.0, "style_layers", False, "together"),
    (4.0, "other_layers", False, "together"), (1.0, "other_layers", False, "together"),
    (4.0, "style_layers", True, "separate"), (4.0, "other_layers", False, "reversed")])
def test_the_guided_prediction_is_the_formula_of_three_separately_run_branches(models, cfg, nvqg_layers, cond_only,
                                                                                layout):
    positive, negative = batch_prompts(models)
    swapped = selected_layers(vsp(models.model))
    every = selected_layers(vsp(models.model, nvqg_weight=WEIGHT, nvqg_layers="all_layers"))
    queried = swapped if nvqg_layers == "style_layers" else [layer for layer in every if layer not in swapped]
    heads = {layer: self_attention_module(models.model, layer).attn1.heads for layer in every}
    kv_swapped = {layer: key_value_swap for layer in swapped}
    # the unconditional branch: plain (cond_only) or swapped like the positive one; the negative branch
    # is the unconditional one with the queries swapped in its layers
    unconditional = {} if cond_only else kv_swapped
    negative_branch = {**unconditional, **{layer: query_swap for layer in queried}}

    def three_branches(args):  # run by the test during sampling, before the node's own post-CFG function
        positive_pred = branch(args, 0, by_hand(kv_swapped, heads))
        empty_pred = branch(args, 1, by_hand(unconditional, heads))
        negative_pred = branch(args, 1, by_hand(negative_branch, heads))
        guided = empty_pred + cfg * (positive_pred - empty_pred)
        expected = guided - WEIGHT * (negative_pred - empty_pred)
        expected[:1] = guided[:1]  # the in-batch reference row keeps plain guidance
        return expected, relative_error(expected, guided)

    before, after = [], []
    styled = recorder(vsp(recorder(LAYOUTS[layout](models.model), before, three_branches), cond_only=cond_only,
                          nvqg_weight=WEIGHT, nvqg_layers=nvqg_layers), after)
    sample(styled, positive, negative, batch=3, steps=2, cfg=cfg)
    assert len(before) == len(after) == 2
    for (expected, _), result in zip(before, after):
        for row in range(3):  # float32 batch layout alone moves these by ~1e-6
            assert_relative_close(result[row], expected[row], 1e-5)
    assert before[0][1] > 1e-3  # at the first (noisiest) step the negative term is a hundred times the tolerance


def test_weight_zero_is_bit_identical_to_the_node_without_it(sd15):
    positive, negative = batch_prompts(sd15)
    for options in ({}, {"cond_only": True}):
        without = vsp(sd15.model, **options)
        zero = vsp(sd15.model, nvqg_weight=0.0, nvqg_layers="all_layers", **options)
        assert "sampler_post_cfg_function" not in zero.model_options
        assert selected_layers(zero) == selected_layers(without)
        assert torch.equal(sample(zero, positive, negative), sample(without, positive, negative))
        assert relative_error(sample(vsp(sd15.model, nvqg_weight=WEIGHT, **options), positive, negative),
                              sample(without, positive, negative)) > 1e-4


def test_with_an_external_reference_the_negative_branch_takes_its_queries(models):
    positive, negative = batch_prompts(models)
    reference = latent_reference(models)
    styled = vsp(models.model, reference=reference, cond_only=True, nvqg_weight=WEIGHT, nvqg_layers="other_layers")
    swapped, every = selected_layers(vsp(models.model)), selected_layers(styled)
    queried, kept = [layer for layer in every if layer not in swapped][-1], swapped[-1]
    heads = self_attention_module(models.model, queried).attn1.heads
    with record_attention(models.model, queried) as calls, record_attention(models.model, kept) as kept_calls:
        sample(styled, positive, negative, batch=3, steps=1, cfg=4.0)
    reference_call, main_call, negative_call = calls  # the reference alone, [cond; uncond], the negative branch
    assert [c["q"].shape[0] for c in calls] == [1, 6, 3]
    expected = attention_by_hand(reference_call["q"].expand(3, -1, -1), negative_call["k"], negative_call["v"], heads)
    torch.testing.assert_close(negative_call["out"].double(), expected, rtol=1e-5, atol=1e-5)
    # a layer the negative branch does not query-swap acts there as in the unconditional branch (plain here)
    _, _, kept_negative = kept_calls
    q, k, v = kept_negative["q"], kept_negative["k"], kept_negative["v"]
    torch.testing.assert_close(kept_negative["out"].double(), attention_by_hand(q, k, v, heads), rtol=1e-5, atol=1e-5)
    # outside the negative branch the other layers are plain
    q, k, v = main_call["q"], main_call["k"], main_call["v"]
    torch.testing.assert_close(main_call["out"].double(), attention_by_hand(q, k, v, heads), rtol=1e-5, atol=1e-5)


def test_the_layer_choices(sd15):
    every = selected_layers(vsp(sd15.model, layers="all_self_attention"))
    swapped = selected_layers(vsp(sd15.model))
    assert selected_layers(vsp(sd15.model, nvqg_weight=1.0)) == swapped
    assert sorted(selected_layers(vsp(sd15.model, nvqg_weight=1.0, nvqg_layers="all_layers"))) == sorted(every)
    assert sorted(selected_layers(vsp(sd15.model, nvqg_weight=1.0, nvqg_layers="other_layers"))) == sorted(every)
    with pytest.raises(ValueError, match="nvqg_layers: other_layers is empty"):
        vsp(sd15.model, layers="all_self_attention", nvqg_weight=1.0, nvqg_layers="other_layers")
    with pytest.raises(ValueError, match="nvqg_layers: unknown choice 'early'"):
        vsp(sd15.model, nvqg_weight=1.0, nvqg_layers="early")
    # the layers it takes for the negative branch alone are named as such to a node chained after it
    others = vsp(sd15.model, nvqg_weight=1.0, nvqg_layers="other_layers")
    first = [layer for layer in every if layer not in swapped][0]
    with pytest.raises(ValueError, match=r"for its negative visual query guidance: see its nvqg_layers"):
        style_aligned(others, layers="custom", custom_layers=".".join(map(str, first)), shared_group_norm="off")
    style_aligned(vsp(sd15.model, nvqg_weight=1.0), layers="custom", custom_layers=".".join(map(str, first)),
                  shared_group_norm="off")
    # and the other way round: a layer styled earlier is refused to the negative branch by its own input
    with pytest.raises(ValueError, match=r"nvqg_layers: VisualStylePrompting would restyle .*StyleAlignedAttention "
                                         r"earlier .*set nvqg_layers to style_layers"):
        vsp(style_aligned(sd15.model, layers="custom", custom_layers=".".join(map(str, first)),
                          shared_group_norm="off"), nvqg_weight=1.0, nvqg_layers="all_layers")


def test_an_external_reference_of_another_size_is_refused_by_name(sd15):
    positive, negative = batch_prompts(sd15)
    styled = vsp(sd15.model, reference=latent_reference(sd15, size=16), nvqg_weight=WEIGHT)
    with pytest.raises(ValueError, match=r"nvqg_weight: the reference latent is 16x16 and the generated latent 8x8"):
        sample(styled, positive, negative, size=8)
    sample(vsp(sd15.model, reference=latent_reference(sd15, size=16)), positive, negative, size=8)  # fine without


def test_a_guider_without_an_unconditional_branch_is_refused_by_name(sd15):
    guidance = pack_submodule("glue.negative_query_guidance")
    styled = vsp(sd15.model, nvqg_weight=WEIGHT)
    (function,) = styled.model_options["sampler_post_cfg_function"]
    assert isinstance(function, guidance.NegativeVisualQueryGuidance)
    args = {"denoised": torch.zeros(3, 4, 8, 8), "sigma": torch.tensor([1.0] * 3), "uncond": None}
    with pytest.raises(ValueError, match="nvqg_weight: VisualStylePrompting's negative visual query guidance needs "
                                         "the unconditional branch"):
        function(args)


def test_outside_the_styles_steps_the_negative_branch_does_not_run(sd15):
    positive, negative = batch_prompts(sd15)
    layer = selected_layers(vsp(sd15.model))[0]
    styled = vsp(sd15.model, nvqg_weight=WEIGHT, start_percent=0.5)
    with record_attention(sd15.model, layer) as calls:
        sample(styled, positive, negative, steps=4)
    assert 4 < len(calls) < 8  # one call per step, plus the negative branch inside the style's steps only


def reference_nvqg_sample(twins, prompts, noise, swapped, queried, cond_only, case=None):
    """The same run by the diffusers twin with the reference processors and the three-branch guide."""
    scheduler = sd_scheduler()
    scheduler.set_timesteps(4)
    start = noise * sigma_of_timestep(scheduler, int(scheduler.timesteps[0]))
    unet, negative = twins.diffusers_unet, reference_vsp.NegativeBranch()
    external = None if case is None else reference_vsp.ExternalReference()
    reference_vsp.install(unet, swapped, external=external, cond_only=cond_only, query_names=queried,
                          negative=negative)
    before_call = None if case is None else case.run_alone_before_each_call(scheduler, external)
    try:
        return ddim_sample(unet, scheduler, start, 4, prompts, 4.0, before_call,
                           reference_vsp.nvqg_guide(negative, WEIGHT, in_batch=case is None))
    finally:
        unet.set_attn_processor(PlainProcessor())


def test_in_batch_sampling_parity(twins):
    prompts, noise = random_prompts(twins, batch=3), start_noise(3)
    ours = comfy_sample(vsp(twins.comfy_model, cond_only=True, nvqg_weight=WEIGHT), prompts, 4, 4.0, noise)
    unet = twins.diffusers_unet
    swapped = self_attention_processor_names(unet, late_up_blocks(unet))
    expected = reference_nvqg_sample(twins, prompts, noise, swapped, swapped, cond_only=True)
    assert_relative_close(ours * scale_factor(twins), expected, PARITY)
    without = comfy_sample(vsp(twins.comfy_model, cond_only=True), prompts, 4, 4.0, noise)
    assert relative_error(without * scale_factor(twins), expected) > 10 * PARITY


def test_external_reference_sampling_parity_with_the_other_layers_and_both_branches_swapped(twins):
    prompts, noise = random_prompts(twins, batch=2), start_noise(2)
    case = ExternalReferenceCase(twins)
    styled = vsp(twins.comfy_model, reference=case.node_output, nvqg_weight=WEIGHT, nvqg_layers="other_layers")
    ours = comfy_sample(styled, prompts, 4, 4.0, noise)
    unet = twins.diffusers_unet
    swapped = self_attention_processor_names(unet, late_up_blocks(unet))
    others = [name for name in all_self_attention(unet) if name not in swapped]
    expected = reference_nvqg_sample(twins, prompts, noise, swapped, others, cond_only=False, case=case)
    assert_relative_close(ours * scale_factor(twins), expected, PARITY)


@pytest.mark.parametrize("cache_megabytes", [0, 2048])
def test_the_reference_runs_once_per_step_for_all_its_calls_whatever_the_cache(sd15, cache_megabytes):
    positive, negative = batch_prompts(sd15)
    reference = latent_reference(sd15, cache_megabytes=cache_megabytes)
    styled = with_separate_cond_batches(vsp(sd15.model, reference=reference, nvqg_weight=WEIGHT))
    calls, handle = counting_reference_passes(styled)
    try:
        sample(styled, positive, negative, steps=3)  # per step: cond, uncond and the negative branch apart
    finally:
        handle.remove()
    assert len(calls) == 3
    assert reference_pass_of(styled).memory.features is None  # the last step's features are dropped after sampling
