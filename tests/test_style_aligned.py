"""StyleAligned inside the real ComfyUI sampler, checked against the method's formulas computed here."""

import pytest
import torch

from helpers import (adain_by_hand, assert_relative_close, attention_by_hand, batch_prompts, encode, group_norm_by_hand,
                     latent_reference, record_attention, sample, selected_layers, self_attention_module,
                     shared_attention_by_hand, style_aligned, with_separate_cond_batches)


@pytest.mark.parametrize("adain_values,scale,shift", [(False, 1.0, 0.0), (False, 1.0, 0.693), (True, 0.8, 0.5)])
def test_shared_attention_equals_formula_at_a_selected_layer(models, adain_values, scale, shift):
    positive, negative = batch_prompts(models)
    styled = style_aligned(models.model, adain_values=adain_values, shared_score_scale=scale,
                           shared_score_shift=shift)
    layer = selected_layers(styled)[len(selected_layers(styled)) // 2]
    heads = self_attention_module(styled, layer).attn1.heads
    with record_attention(styled, layer) as calls:
        sample(styled, positive, negative, batch=3, steps=1, cfg=4.0)
    (call,) = calls
    q, k, v, out = call["q"], call["k"], call["v"], call["out"]
    for start in (0, 3):
        ref, targets = slice(start, start + 1), slice(start + 1, start + 3)
        expected = shared_attention_by_hand(q[targets], k[targets], v[targets], q[ref], k[ref], v[ref], heads,
                                            adain_values=adain_values, scale=scale, shift=shift)
        torch.testing.assert_close(out[targets].double(), expected, rtol=1e-4, atol=1e-5)
        own = shared_attention_by_hand(q[ref], k[ref], v[ref], q[ref], k[ref], v[ref], heads)
        torch.testing.assert_close(out[ref].double(), own, rtol=1e-4, atol=1e-5)


def test_adain_only_when_attention_is_not_shared(sd15):
    positive, negative = batch_prompts(sd15)
    styled = style_aligned(sd15.model, share_attention=False)
    layer = selected_layers(styled)[0]
    heads = self_attention_module(styled, layer).attn1.heads
    with record_attention(styled, layer) as calls:
        sample(styled, positive, negative, steps=1, cfg=1.0)
    q, k, v, out = (calls[0][name] for name in ("q", "k", "v", "out"))
    expected = attention_by_hand(adain_by_hand(q[1:], q[:1]).float(), adain_by_hand(k[1:], k[:1]).float(), v[1:],
                                 heads)
    torch.testing.assert_close(out[1:].double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("batch", [2, 3, 4])
def test_the_reference_equals_its_prompt_sampled_alone(models, batch):
    positive, negative = batch_prompts(models, batch)
    styled = sample(style_aligned(models.model, shared_group_norm="on"), positive, negative, batch=batch)
    reference_alone = sample(models.model, [[positive[0][0][:1], {k: v[:1] for k, v in positive[0][1].items()}]],
                             negative, batch=1)
    assert_relative_close(styled[:1], reference_alone)
    plain = sample(models.model, positive, negative, batch=batch)
    assert not torch.allclose(styled[1:], plain[1:], atol=1e-3)


def test_shared_group_norm_uses_joint_statistics_with_the_reference(sd15):
    positive, negative = batch_prompts(sd15)
    styled = style_aligned(sd15.model, shared_group_norm="on")
    key = "diffusion_model.input_blocks.1.0.in_layers.0"
    shared, norm = styled.object_patches[key], sd15.model.get_model_object(key)
    seen = []
    handle = shared.register_forward_hook(lambda m, i, o: seen.append((i[0].detach().clone(), o.detach().clone())))
    try:
        sample(styled, positive, negative, steps=1, cfg=1.0)
    finally:
        handle.remove()
    ((x, out),) = seen
    torch.testing.assert_close(out[:1].double(), group_norm_by_hand(norm, x[:1]), rtol=1e-4, atol=1e-5)
    expected = group_norm_by_hand(norm, x[1:], x[:1])
    torch.testing.assert_close(out[1:].double(), expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(expected, group_norm_by_hand(norm, x[1:]), atol=1e-3)


def test_norm_sharing_follows_the_architecture_by_default(sd15, sdxl):
    def shared_norms(model):
        return [k for k, v in model.object_patches.items()
                if [type(b).__name__ for b in getattr(v, "stand_in_behaviours", ())] == ["SharedGroupNorm"]]

    assert shared_norms(style_aligned(sd15.model))
    assert not shared_norms(style_aligned(sdxl.model))
    assert shared_norms(style_aligned(sdxl.model, shared_group_norm="on"))
    assert not shared_norms(style_aligned(sd15.model, shared_group_norm="off"))


@pytest.mark.parametrize("mode", ["in_batch", "external"])
def test_styled_run_leaves_the_model_and_its_norms_as_they_were(models, mode):
    positive, negative = batch_prompts(models)
    fresh = sample(models.model, positive, negative)  # loads the plain model: its own modules in place
    unet = models.model.get_model_object("diffusion_model")
    norm = unet.input_blocks[1][0].in_layers[0]
    probe = torch.randn(2, norm.num_channels, 4, 4)
    norm_before = norm(probe)
    reference = latent_reference(models) if mode == "external" else None
    styled = sample(style_aligned(models.model, reference=reference, shared_group_norm="on"), positive, negative)
    assert not torch.allclose(styled, fresh, atol=1e-3)
    assert torch.equal(sample(models.model, positive, negative), fresh)
    assert unet.input_blocks[1][0].in_layers[0] is norm and torch.equal(norm(probe), norm_before)


@pytest.mark.parametrize("mode", ["in_batch", "external"])
def test_cond_and_uncond_together_equal_separately_in_either_order(models, mode):
    positive, negative = batch_prompts(models)
    reference = latent_reference(models) if mode == "external" else None
    styled = style_aligned(models.model, reference=reference, shared_group_norm="on", shared_score_shift=0.5)
    together = sample(styled, positive, negative)
    assert_relative_close(sample(with_separate_cond_batches(styled), positive, negative), together)
    assert_relative_close(sample(with_separate_cond_batches(styled, reverse=True), positive, negative), together)


def test_external_reference_attention_and_norms_use_the_reference_pass(sd15):
    positive, negative = encode(sd15.clip, "a dog"), encode(sd15.clip, "")
    styled = style_aligned(sd15.model, reference=latent_reference(sd15), shared_group_norm="on",
                           shared_score_shift=0.693)
    layer = selected_layers(styled)[0]
    heads = self_attention_module(styled, layer).attn1.heads
    with record_attention(styled, layer) as calls:
        sample(styled, positive, negative, batch=2, steps=1, cfg=4.0)
    reference_call, target_call = calls
    expected = shared_attention_by_hand(target_call["q"], target_call["k"], target_call["v"], reference_call["q"],
                                        reference_call["k"], reference_call["v"], heads, shift=0.693)
    torch.testing.assert_close(target_call["out"].double(), expected, rtol=1e-4, atol=1e-5)


def test_bad_inputs_name_the_input(sd15):
    with pytest.raises(ValueError, match=r"start_percent \(0.9\) must not be greater than end_percent \(0.1\)"):
        style_aligned(sd15.model, start_percent=0.9, end_percent=0.1)
    with pytest.raises(ValueError, match="custom_layers: empty"):
        style_aligned(sd15.model, layers="custom")
    reference = latent_reference(sd15, size=6)
    with pytest.raises(ValueError, match="reference: the reference latent is 6x6"):
        style_aligned(sd15.model, reference=reference)
    with pytest.raises(ValueError, match="in-batch reference needs a latent batch of at least 2"):
        sample(style_aligned(sd15.model), encode(sd15.clip, "a"), encode(sd15.clip, ""), batch=1)


def test_an_empty_active_range_equals_the_unstyled_run(models):
    positive, negative = batch_prompts(models)
    plain = sample(models.model, positive, negative)
    styled = style_aligned(models.model, shared_group_norm="on", start_percent=0.3, end_percent=0.3)
    assert torch.equal(sample(styled, positive, negative), plain)
