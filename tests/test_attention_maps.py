"""Attention-map capture inside the real ComfyUI sampler, and the heatmap node."""

import math

import pytest
import torch

from helpers import (attention_weights_by_hand, encode, latent_reference, record_attention, run_node, sample,
                     self_attention_module, style_aligned, vsp, with_separate_cond_batches)

LAYER = ("output", 3, 0)
CUSTOM = "output.3.0"


def capture(model, attention="self_attention", layers="custom", custom_layers=CUSTOM, max_megabytes=64,
            start_percent=0.0, end_percent=1.0):
    return run_node("CaptureAttentionMaps", model=model, attention=attention, layers=layers,
                    custom_layers=custom_layers, start_percent=start_percent, end_percent=end_percent,
                    max_megabytes=max_megabytes)


def heatmap(maps, images, layers="", tokens="1", query_x=0.5, query_y=0.5, opacity=0.6, reference_image=None):
    (image,) = run_node("AttentionMapHeatmap", attention_maps=maps, images=images, layers=layers, tokens=tokens,
                        query_x=query_x, query_y=query_y, opacity=opacity, reference_image=reference_image)
    return image


def probabilities_by_hand(q, k, heads):
    """softmax(q k^T / sqrt(d)) per head, averaged over heads, in float64: (batch, queries, keys)."""
    return attention_weights_by_hand(q, k, heads).mean(dim=1)


def prompts(models):
    return encode(models.clip, "a dog"), encode(models.clip, "")


@pytest.mark.parametrize("kind", ["self_attention", "cross_attention"])
def test_captured_maps_equal_the_softmax_of_the_layer_and_rows_sum_to_one(models, kind):
    positive, negative = prompts(models)
    captured, maps = capture(models.model, attention=kind)
    which = "attn1" if kind == "self_attention" else "attn2"
    module = getattr(self_attention_module(models.model, LAYER), which)
    with record_attention(models.model, LAYER, which) as calls:
        sample(captured, positive, negative, batch=2, steps=3, cfg=1.0)  # cfg 1: every call is the cond batch
    assert len(calls) == 3
    expected = torch.stack([probabilities_by_hand(c["q"], c["k"], module.heads) for c in calls]).mean(dim=0)
    (layer,) = maps.layers.values()
    assert layer.calls == 3 and layer.first_image == 0
    assert layer.key_sources == (("self",) if kind == "self_attention" else ("text",))
    assert layer.total.shape == expected.shape and layer.total.shape[0] == 2
    assert layer.query_grid[0] * layer.query_grid[1] == expected.shape[1]
    torch.testing.assert_close(layer.mean.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.mean.sum(dim=-1), torch.ones(expected.shape[:2]), rtol=0, atol=1e-5)


def test_only_the_cond_images_are_captured_whatever_the_batch_layout(sd15):
    positive, negative = prompts(sd15)
    captured, maps = capture(sd15.model)
    heads = self_attention_module(sd15.model, LAYER).attn1.heads
    with record_attention(sd15.model, LAYER) as calls:
        sample(with_separate_cond_batches(captured), positive, negative, batch=2, steps=2, cfg=4.0)
    cond_calls = calls[0::2]  # separate calls, cond first
    expected = torch.stack([probabilities_by_hand(c["q"], c["k"], heads) for c in cond_calls]).mean(dim=0)
    torch.testing.assert_close(maps.layers[LAYER].mean.double(), expected, rtol=1e-5, atol=1e-6)

    together = maps.layers[LAYER].mean.clone()
    sample(captured, positive, negative, batch=2, steps=2, cfg=4.0)  # cond and uncond in one call
    assert maps.layers[LAYER].calls == 2, "a new sampling run starts from empty maps"
    torch.testing.assert_close(maps.layers[LAYER].mean, together, rtol=1e-4, atol=1e-6)


def test_vsp_maps_show_where_targets_look_in_the_in_batch_reference(sd15):
    positive, negative = prompts(sd15)
    captured, maps = capture(vsp(sd15.model, layers="custom", custom_layers=CUSTOM))
    heads = self_attention_module(sd15.model, LAYER).attn1.heads
    with record_attention(sd15.model, LAYER) as calls:
        sample(captured, positive, negative, batch=3, steps=1, cfg=1.0)
    (call,) = calls
    layer = maps.layers[LAYER]
    assert layer.first_image == 1 and layer.key_sources == ("reference",)
    expected = probabilities_by_hand(call["q"][1:], call["k"][:1].expand(2, -1, -1), heads)
    torch.testing.assert_close(layer.mean.double(), expected, rtol=1e-5, atol=1e-6)


def test_style_aligned_maps_cover_own_and_reference_keys_with_an_external_reference(sd15):
    positive, negative = prompts(sd15)
    styled = style_aligned(sd15.model, reference=latent_reference(sd15), shared_score_shift=math.log(2))
    captured, maps = capture(styled)
    sample(captured, positive, negative, batch=2, steps=2, cfg=4.0)
    layer = maps.layers[LAYER]
    queries = layer.query_grid[0] * layer.query_grid[1]
    assert layer.key_sources == ("self", "reference") and layer.first_image == 0
    assert layer.total.shape == (2, queries, 2 * queries)
    assert layer.calls == 2, "the reference's own pass is not captured"
    torch.testing.assert_close(layer.mean.sum(dim=-1), torch.ones(2, queries), rtol=0, atol=1e-5)


def test_capture_changes_no_image_and_leaves_no_trace(models):
    positive, negative = prompts(models)
    fresh = sample(models.model, positive, negative)
    captured, maps = capture(models.model, layers="all_self_attention")
    assert torch.equal(sample(captured, positive, negative), fresh)
    assert maps.layers
    styled = vsp(models.model)
    captured_styled, _ = capture(styled)
    assert torch.equal(sample(captured_styled, positive, negative), sample(styled, positive, negative))
    assert torch.equal(sample(models.model, positive, negative), fresh)


def test_memory_budget_is_a_clear_error_and_the_model_stays_clean(sd15):
    positive, negative = prompts(sd15)
    fresh = sample(sd15.model, positive, negative)
    captured, _ = capture(sd15.model, layers="all_self_attention", max_megabytes=1)
    with pytest.raises(Exception, match="max_megabytes"):
        sample(captured, positive, negative, batch=2, size=32)
    assert torch.equal(sample(sd15.model, positive, negative), fresh)


def test_capture_respects_the_schedule_range(sd15):
    positive, negative = prompts(sd15)
    captured, maps = capture(sd15.model, start_percent=0.5, end_percent=1.0)
    sample(captured, positive, negative, steps=4, cfg=1.0)
    assert 0 < maps.layers[LAYER].calls < 4


def test_heatmaps_have_the_images_size_and_draw_the_hot_spot(sd15):
    positive, negative = prompts(sd15)
    images = torch.rand(3, 48, 40, 3)

    captured, cross_maps = capture(sd15.model, attention="cross_attention", layers="late_self_attention")
    sample(captured, positive, negative, batch=3, steps=2)
    cross = heatmap(cross_maps, images, tokens="1, 2")
    assert cross.shape == (3, 48, 40, 3) and 0.0 <= float(cross.min()) and float(cross.max()) <= 1.0
    assert not torch.equal(cross, images)
    assert torch.equal(heatmap(cross_maps, images, opacity=0.0), images)

    captured, self_maps = capture(vsp(sd15.model, layers="custom", custom_layers=CUSTOM))
    sample(captured, positive, negative, batch=3, steps=2)
    drawn = heatmap(self_maps, images, layers="output.3", query_x=0.1, query_y=0.9)
    assert drawn.shape == (2, 48, 80, 3), "targets only: [marked image | where it looks in the reference]"
    assert torch.equal(drawn[:, 43, 4], torch.ones(2, 3)), "the query point is marked white"
    faint = heatmap(self_maps, images, query_x=0.1, query_y=0.9, opacity=0.0)
    assert torch.equal(faint[:, :, 40:], images[:1].expand(2, -1, -1, -1)), "the in-batch reference under its keys"

    styled, sa_maps = capture(style_aligned(sd15.model, reference=latent_reference(sd15)))
    sample(styled, positive, negative, batch=2, steps=2)
    reference_image = torch.rand(1, 16, 16, 3)
    drawn = heatmap(sa_maps, images[:2], reference_image=reference_image)
    assert drawn.shape == (2, 48, 120, 3), "[marked image | own keys | reference keys]"


def test_heatmap_renders_a_known_map_where_it_is_hot():
    from conftest import pack_submodule
    maps = pack_submodule("attention_patches.attention_maps")
    heatmaps = pack_submodule("attention_patches.heatmaps")
    total = torch.zeros(1, 4, 2)
    total[0, 3, 1] = 1.0  # bottom-right position attends to token 1
    layer = maps.LayerMaps(total, 1, (2, 2), 0, ("text",))
    heat = heatmaps.cross_attention_heat([layer], [1], (4, 4))
    assert heat.shape == (1, 4, 4)
    assert float(heat[0, 3, 3]) == 1.0 and float(heat[0, 0, 0]) == 0.0
    colours = heatmaps.colormap(torch.tensor([0.0, 1.0]))
    assert colours[0].argmax() == 2 and colours[1].argmax() == 0, "low is blue, high is red"


def test_bad_inputs_are_named(sd15):
    positive, negative = prompts(sd15)
    captured, maps = capture(sd15.model, attention="cross_attention")
    images = torch.rand(2, 16, 16, 3)
    with pytest.raises(Exception, match="nothing was captured"):
        heatmap(maps, images)
    sample(captured, positive, negative, batch=2, steps=1)
    with pytest.raises(ValueError, match="tokens"):
        heatmap(maps, images, tokens="dog")
    with pytest.raises(Exception, match="not captured"):
        heatmap(maps, images, layers="output.4")
    with pytest.raises(ValueError, match="images"):
        heatmap(maps, images[:1])
    with pytest.raises(ValueError, match="attention"):
        capture(sd15.model, attention="both")


def test_capture_placed_before_a_style_node_records_the_styled_attention(sd15):
    positive, negative = prompts(sd15)
    captured, maps = capture(sd15.model)
    styled = vsp(captured, layers="custom", custom_layers=CUSTOM)
    sample(styled, positive, negative, batch=3, steps=2, cfg=1.0)
    layer = maps.layers[LAYER]
    assert layer.key_sources == ("reference",) and layer.first_image == 1 and layer.calls == 2


def test_a_layer_replaced_by_another_pack_is_named(sd15):
    foreign = sd15.model.clone()
    foreign.set_model_attn2_replace(lambda q, k, v, extra_options: q, "output", 3, 0)
    with pytest.raises(ValueError, match="output.3.0 already has its cross-attention replaced"):
        capture(foreign, attention="cross_attention")


def test_cross_attention_maps_of_a_styled_layer_hold_every_step_and_only_cross_attention(sd15):
    # the styled self-attention of a layer shares the layer's name with its cross-attention
    captured, maps = capture(vsp(sd15.model), attention="cross_attention", layers="late_self_attention")
    sample(captured, encode(sd15.clip, "a dog"), encode(sd15.clip, ""), batch=3, steps=3)
    assert maps.layers
    for layer_maps in maps.layers.values():
        assert layer_maps.calls == 3 and layer_maps.key_sources == ("text",) and layer_maps.total.shape[-1] == 77
