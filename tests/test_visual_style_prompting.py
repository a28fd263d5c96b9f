"""Visual Style Prompting inside the real ComfyUI sampler, checked against formulas computed here."""

import pytest
import torch

from helpers import (assert_relative_close, attention_by_hand, batch_prompts, encode, latent_reference, record_attention,
                     sample, selected_layers, self_attention_module, vsp, with_separate_cond_batches)

import comfy.sample


def test_in_batch_swap_equals_formula_at_a_selected_layer(models):
    positive, negative = batch_prompts(models)
    styled = vsp(models.model)
    layer = selected_layers(styled)[0]
    heads = self_attention_module(styled, layer).attn1.heads
    with record_attention(styled, layer) as calls:
        sample(styled, positive, negative, batch=3, steps=1, cfg=4.0)
    (call,) = calls  # cond and uncond in one model call
    q, k, v, out = call["q"], call["k"], call["v"], call["out"]
    assert q.shape[0] == 6
    for start in (0, 3):  # one reference per cond/uncond chunk
        ref, targets = slice(start, start + 1), slice(start + 1, start + 3)
        expected_targets = attention_by_hand(q[targets], k[ref].expand(2, -1, -1), v[ref].expand(2, -1, -1), heads)
        torch.testing.assert_close(out[targets].double(), expected_targets, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[ref].double(), attention_by_hand(q[ref], k[ref], v[ref], heads), rtol=1e-5,
                                   atol=1e-5)
    own = attention_by_hand(q[1:3], k[1:3], v[1:3], heads)
    assert not torch.allclose(out[1:3].double(), own, atol=1e-3), "the targets' own attention came out"


def test_unselected_self_attention_and_all_cross_attention_run_comfyui_code(models):
    positive, negative = batch_prompts(models)
    styled = vsp(models.model)
    selected = set(selected_layers(styled))
    assert selected and all(key[0] == "output" for key in selected)
    unet = models.model.get_model_object("diffusion_model")
    ran_default = {"attn1": set(), "attn2": set()}
    handles = []
    for name, module in unet.named_modules():
        for kind in ("attn1", "attn2"):
            if name.endswith(kind):
                handles.append(module.register_forward_hook(
                    lambda m, i, o, name=name, kind=kind: ran_default[kind].add(name)))
    try:
        sample(styled, positive, negative, batch=3, steps=1)
    finally:
        for handle in handles:
            handle.remove()
    all_attn1 = {name for name, _ in unet.named_modules() if name.endswith("attn1")}
    all_attn2 = {name for name, _ in unet.named_modules() if name.endswith("attn2")}
    assert len(all_attn1 - ran_default["attn1"]) == len(selected)
    assert ran_default["attn2"] == all_attn2


def test_external_reference_swap_equals_formula(models):
    positive, negative = encode(models.clip, "a dog"), encode(models.clip, "")
    reference = latent_reference(models)
    styled = vsp(models.model, reference=reference)
    layer = selected_layers(styled)[-1]
    heads = self_attention_module(styled, layer).attn1.heads
    with record_attention(styled, layer) as calls:
        sample(styled, positive, negative, batch=2, steps=1, cfg=4.0)
    reference_call, target_call = calls
    assert reference_call["q"].shape[0] == 1 and target_call["q"].shape[0] == 4
    expected = attention_by_hand(target_call["q"], reference_call["k"].expand(4, -1, -1),
                                 reference_call["v"].expand(4, -1, -1), heads)
    torch.testing.assert_close(target_call["out"].double(), expected, rtol=1e-5, atol=1e-5)


def test_external_reference_is_the_forward_noised_latent(models):
    reference = latent_reference(models)
    styled = vsp(models.model, reference=reference)
    unet = styled.get_model_object("diffusion_model")
    inputs = []
    handle = unet.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach().clone()))
    try:
        sample(styled, encode(models.clip, "a dog"), encode(models.clip, ""), batch=2, steps=1)
    finally:
        handle.remove()
    base = styled.model
    sigma = base.model_sampling.sigma_max
    expected_x = base.process_latent_in(reference.latent) + sigma * comfy.sample.prepare_noise(reference.latent, 3)
    expected_unet_input = expected_x / (sigma ** 2 + 1) ** 0.5  # eps models scale the input by 1/sqrt(sigma^2+1)
    torch.testing.assert_close(inputs[0], expected_unet_input, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["in_batch", "external"])
def test_styled_run_leaves_no_trace_on_the_model(models, mode):
    positive, negative = batch_prompts(models)
    fresh = sample(models.model, positive, negative)
    reference = latent_reference(models) if mode == "external" else None
    styled = sample(vsp(models.model, reference=reference), positive, negative)
    after = sample(models.model, positive, negative)
    assert not torch.allclose(styled, fresh, atol=1e-3)
    assert torch.equal(after, fresh)


@pytest.mark.parametrize("mode", ["in_batch", "external"])
def test_cond_and_uncond_together_equal_separately_in_either_order(models, mode):
    positive, negative = batch_prompts(models)
    reference = latent_reference(models) if mode == "external" else None
    styled = vsp(models.model, reference=reference)
    together = sample(styled, positive, negative)
    separately = sample(with_separate_cond_batches(styled), positive, negative)
    reversed_order = sample(with_separate_cond_batches(styled, reverse=True), positive, negative)
    assert_relative_close(separately, together)
    assert_relative_close(reversed_order, together)


def test_cfg_one_runs_cond_alone(models):
    positive, negative = batch_prompts(models)
    styled = vsp(models.model)
    layer = selected_layers(styled)[0]
    with record_attention(styled, layer) as calls:
        sample(styled, positive, negative, steps=1, cfg=1.0)
    assert calls[0]["q"].shape[0] == 3
    heads = self_attention_module(styled, layer).attn1.heads
    q, k, v = calls[0]["q"], calls[0]["k"], calls[0]["v"]
    expected = attention_by_hand(q[1:], k[:1].expand(2, -1, -1), v[:1].expand(2, -1, -1), heads)
    torch.testing.assert_close(calls[0]["out"][1:].double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sampler,scheduler", [("dpmpp_2m", "karras"), ("ddim", "ddim_uniform"), ("euler_ancestral", "normal")])
def test_any_sampler_and_scheduler(sd15, sampler, scheduler):
    positive, negative = batch_prompts(sd15)
    plain = sample(sd15.model, positive, negative, sampler=sampler, scheduler=scheduler)
    styled = sample(vsp(sd15.model), positive, negative, sampler=sampler, scheduler=scheduler)
    assert torch.isfinite(styled).all()
    assert_relative_close(styled[0], plain[0])  # the reference itself is unchanged
    assert not torch.allclose(styled[1:], plain[1:], atol=1e-3)


def test_strength_zero_and_an_empty_range_equal_the_unstyled_run(models):
    positive, negative = batch_prompts(models)
    plain = sample(models.model, positive, negative)
    assert torch.equal(sample(vsp(models.model, strength=0.0), positive, negative), plain)
    assert torch.equal(sample(vsp(models.model, start_percent=0.4, end_percent=0.4), positive, negative), plain)
    reference = latent_reference(models)
    assert torch.equal(sample(vsp(models.model, reference=reference, start_percent=0.0, end_percent=0.0),
                              positive, negative), plain)


def test_strength_blends_toward_the_targets_own_attention(sd15):
    positive, negative = batch_prompts(sd15)
    styled = vsp(sd15.model, strength=0.25)
    layer = selected_layers(styled)[0]
    heads = self_attention_module(styled, layer).attn1.heads
    with record_attention(styled, layer) as calls:
        sample(styled, positive, negative, steps=1, cfg=1.0)
    q, k, v, out = (calls[0][name] for name in ("q", "k", "v", "out"))
    swapped = attention_by_hand(q[1:], k[:1].expand(2, -1, -1), v[:1].expand(2, -1, -1), heads)
    own = attention_by_hand(q[1:], k[1:], v[1:], heads)
    torch.testing.assert_close(out[1:].double(), 0.75 * own + 0.25 * swapped, rtol=1e-5, atol=1e-5)


def test_active_range_limits_the_swap_to_its_steps(sd15):
    positive, negative = batch_prompts(sd15)
    plain = vsp(sd15.model, strength=0.0)
    late_only = vsp(sd15.model, start_percent=0.5, end_percent=1.0)
    layer = selected_layers(late_only)[0]
    outputs = {}
    for name, model in (("plain", plain), ("late_only", late_only)):
        with record_attention(model, layer) as calls:
            sample(model, positive, negative, steps=4, cfg=1.0)
        outputs[name] = calls
    torch.testing.assert_close(outputs["late_only"][0]["out"], outputs["plain"][0]["out"])  # first step: off
    heads = self_attention_module(sd15.model, layer).attn1.heads
    last = outputs["late_only"][-1]
    expected = attention_by_hand(last["q"][1:], last["k"][:1].expand(2, -1, -1), last["v"][:1].expand(2, -1, -1),
                                 heads)
    torch.testing.assert_close(last["out"][1:].double(), expected, rtol=1e-5, atol=1e-5)  # last step: on
