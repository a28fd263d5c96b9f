"""Attention maps on Flux and Chroma: a block's joint attention [text | image] holds both kinds of map in one
softmax. The captured self-attention map is its image rows' probabilities on the image keys, the
cross-attention map the same rows' probabilities on the text keys, averaged over heads and calls, computed
here by hand from the block's own queries and keys (seen through ComfyUI's code, tests/support/flux.py)."""

import math

import pytest
import torch

import random_dits
from helpers import LAYOUTS, run_node, style_aligned, vsp
from support.flux import HEIGHT, TEXT_TOKENS, WIDTH, conditioning, flux_sample, post_rope

IMAGE = (HEIGHT // 2) * (WIDTH // 2)
SITE = ("single", 1)
TOLERANCE = 1e-5


@pytest.fixture(scope="module", params=["flux", "chroma"])
def flux(request):
    return {"flux": random_dits.tiny_flux, "chroma": random_dits.tiny_chroma}[request.param]()


def capture(model, attention="self_attention", layers="custom", custom_layers="double.1, single.1", max_megabytes=64):
    return run_node("CaptureAttentionMaps", model=model, attention=attention, layers=layers,
                    custom_layers=custom_layers, start_percent=0.0, end_percent=1.0, max_megabytes=max_megabytes)


def heatmap(maps, images, layers="", tokens="0", query_x=0.5, query_y=0.5):
    (image,) = run_node("AttentionMapHeatmap", attention_maps=maps, images=images, layers=layers, tokens=tokens,
                        query_x=query_x, query_y=query_y, opacity=0.6, reference_image=None)
    return image


def probabilities(q, k):
    """softmax(q k^T / sqrt(d)) per head, averaged over heads, float64: (heads, rows, d) x (heads, keys, d)."""
    return torch.softmax(q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1).mean(0)


def cond_rows(call):
    size = call["q"].shape[0] // len(call["cond_or_uncond"])
    start = call["cond_or_uncond"].index(0) * size
    return range(start, start + size)


def close(captured, expected):
    return (captured.double() - expected).abs().max() <= TOLERANCE * expected.abs().max()


def shared_attention(model, positions="same"):
    """StyleAligned without AdaIN: each target row attends to [its joint rows | the reference's image rows]."""
    (styled,) = run_node("StyleAlignedAttention", model=model, share_attention=True, adain_queries=False,
                         adain_keys=False, adain_values=False, shared_score_scale=1.0, shared_score_shift=0.0,
                         shared_group_norm="auto", layers="custom", custom_layers="single.1", start_percent=0.0,
                         end_percent=1.0, reference=None, reference_positions=positions)
    return styled


@pytest.mark.parametrize("layout", ["together", "reversed"])
def test_plain_maps_are_the_joint_softmax_split_into_image_and_text_keys(flux, layout):
    """Two steps at cfg 3: each map is the mean over the calls of the cond images' image-row probabilities; a
    row of the self map and the same row of the cross map together hold all of its attention."""
    site_model, calls = post_rope(LAYOUTS[layout](flux), SITE)
    plain = flux_sample(site_model, batch=2, cfg=3.0, steps=2)
    maps = {}
    for kind in ("self_attention", "cross_attention"):
        captured, maps[kind] = capture(LAYOUTS[layout](flux), attention=kind)
        assert torch.equal(flux_sample(captured, batch=2, cfg=3.0, steps=2), plain), "capture changes no image"
    expected = torch.stack([torch.stack([probabilities(call["q"][i], call["k"][i])[TEXT_TOKENS:]
                                         for i in cond_rows(call)]) for call in calls if 0 in call["cond_or_uncond"]]
                           ).mean(0)
    self_maps, cross_maps = maps["self_attention"].layers[SITE], maps["cross_attention"].layers[SITE]
    assert self_maps.calls == cross_maps.calls == 2
    assert (self_maps.query_grid, self_maps.key_sources, self_maps.first_image) == ((4, 4), ("self",), 0)
    assert cross_maps.key_sources == ("text",)
    assert self_maps.mean.shape == (2, IMAGE, IMAGE) and cross_maps.mean.shape == (2, IMAGE, TEXT_TOKENS)
    assert close(self_maps.mean, expected[..., TEXT_TOKENS:])
    assert close(cross_maps.mean, expected[..., :TEXT_TOKENS])
    total = self_maps.mean.sum(-1) + cross_maps.mean.sum(-1)
    assert torch.allclose(total, torch.ones_like(total), atol=1e-5)
    assert set(maps["self_attention"].layers) == {("double", 1), ("single", 1)}


def test_vsp_maps_show_where_the_targets_look_in_the_reference(flux):
    """In-batch VSP at single.1 (cfg 1, one step: the block sees the plain run's inputs): the keys of a target's
    image rows are the reference's, so its self map is its probabilities on those, its cross map on its text."""
    site_model, calls = post_rope(flux, SITE)
    flux_sample(site_model)
    styled = vsp(flux, layers="custom", custom_layers="single.1")
    maps = {}
    for kind in ("self_attention", "cross_attention"):
        captured, maps[kind] = capture(styled, attention=kind, custom_layers="single.1")
        flux_sample(captured)
    (call,) = calls
    image = slice(TEXT_TOKENS, None)
    expected = []
    for row in (1, 2):
        k = call["k"][row].clone()
        k[:, image] = call["k"][0][:, image]
        expected.append(probabilities(call["q"][row], k)[image])
    expected = torch.stack(expected)
    self_maps, cross_maps = maps["self_attention"].layers[SITE], maps["cross_attention"].layers[SITE]
    assert (self_maps.key_sources, self_maps.first_image) == (("reference",), 1)
    assert close(self_maps.mean, expected[..., TEXT_TOKENS:])
    assert close(cross_maps.mean, expected[..., :TEXT_TOKENS])


def test_style_aligned_maps_have_a_block_for_the_image_and_one_for_the_reference(flux):
    """StyleAligned without AdaIN, the reference's keys on top of the target's positions: each target row
    attends to [text | its image | the reference's image] in one softmax."""
    site_model, calls = post_rope(flux, SITE)
    flux_sample(site_model)
    captured, maps = capture(shared_attention(flux), custom_layers="single.1")
    images = flux_sample(captured)
    (call,) = calls
    image = slice(TEXT_TOKENS, None)
    expected = torch.stack([probabilities(call["q"][row], torch.cat([call["k"][row], call["k"][0][:, image]], 1))[image]
                            for row in (1, 2)])
    layer = maps.layers[SITE]
    assert layer.key_sources == ("self", "reference") and layer.mean.shape == (2, IMAGE, 2 * IMAGE)
    assert close(layer.mean, expected[..., TEXT_TOKENS:])
    # the heatmap draws the query point, then one panel per block of keys, for each target
    drawn = heatmap(maps, images=torch.rand(3, 64, 64, 3))
    assert drawn.shape == (2, 64, 3 * 64, 3)


def test_kontexts_extra_rows_are_left_out_of_the_maps():
    """Kontext's reference-image rows (after the image's own) are neither query rows nor key columns of the maps,
    plain or with StyleAligned's reference keys after them."""
    flux = random_dits.tiny_flux()
    kontext = [[c, {**extra, "reference_latents": [torch.randn(1, 16, 4, 6, generator=torch.Generator().manual_seed(8))]}]
               for c, extra in conditioning(0)]
    site_model, calls = post_rope(flux, SITE)
    flux_sample(site_model, batch=2, positive=kontext)
    (call,) = calls
    assert call["k"].shape[2] == TEXT_TOKENS + IMAGE + 6
    image, extra = slice(TEXT_TOKENS, TEXT_TOKENS + IMAGE), slice(TEXT_TOKENS + IMAGE, None)
    captured, maps = capture(flux, custom_layers="single.1")
    flux_sample(captured, batch=2, positive=kontext)
    assert close(maps.layers[SITE].mean, torch.stack([probabilities(call["q"][i], call["k"][i])[image, image]
                                                      for i in (0, 1)]))
    captured, maps = capture(shared_attention(flux), custom_layers="single.1")
    flux_sample(captured, batch=2, positive=kontext)
    joint = probabilities(call["q"][1], torch.cat([call["k"][1], call["k"][0][:, image]], 1))[image]
    assert close(maps.layers[SITE].mean[0], torch.cat([joint[:, image], joint[:, -IMAGE:]], 1))
    assert joint[:, extra][:, :6].sum() > 0.05, "the extra rows take attention the maps leave out"


def test_heatmaps_read_flux_block_names_and_prompt_tokens(flux):
    captured, maps = capture(flux, attention="cross_attention")
    images = flux_sample(captured, batch=2)
    assert heatmap(maps, torch.rand(2, 64, 64, 3), layers="double.1", tokens="0, 1").shape == (2, 64, 64, 3)
    assert heatmap(maps, torch.rand(2, 64, 64, 3), layers="single").shape == (2, 64, 64, 3)
    with pytest.raises(Exception, match=r"layers: double\.0 was not captured \(captured: double\.1, single\.1\)"):
        heatmap(maps, images, layers="double.0")
    with pytest.raises(Exception, match=r"layers: cannot read 'output\.3'"):
        heatmap(maps, images, layers="output.3")
    with pytest.raises(Exception, match=f"tokens: {TEXT_TOKENS} is past the prompt's {TEXT_TOKENS} tokens"):
        heatmap(maps, images, tokens=str(TEXT_TOKENS))


def test_layers_captured_differently_are_drawn_apart_and_named_when_mixed(flux):
    """StyleAligned (auto: the single blocks) under a capture of every block: the double blocks' maps have one block
    of keys, the single blocks' two; drawing them together is refused naming each group."""
    styled = style_aligned(flux, layers="auto")
    captured, maps = capture(styled, layers="auto")
    flux_sample(captured)
    images = torch.rand(3, 32, 32, 3)
    with pytest.raises(Exception, match=r"layers: the chosen layers were captured differently .*: double\.0, double\.1 "
                                        r"\(keys: self\); single\.0, single\.1 \(keys: self, reference, an in-batch "
                                        r"reference\); choose layers captured alike, e\.g\. single\.0, single\.1"):
        heatmap(maps, images)
    assert heatmap(maps, images, layers="single").shape == (2, 32, 96, 3)
    assert heatmap(maps, images, layers="double").shape == (3, 32, 64, 3)


def test_auto_captures_the_vital_blocks_and_styled_blocks_record_either_way(flux):
    """auto on Flux is vital_blocks (every block of the tiny model); a capture placed before or after a style
    node at its blocks leaves them to it, and they record the styled attention."""
    captured, maps = capture(flux, layers="auto")
    flux_sample(captured)
    assert set(maps.layers) == {("double", 0), ("double", 1), ("single", 0), ("single", 1)}
    after_model, after = capture(vsp(flux, layers="custom", custom_layers="single.1"), custom_layers="single.1")
    flux_sample(after_model)
    assert after.layers[SITE].key_sources == ("reference",)
    before_model, before = capture(flux, custom_layers="single.1")
    flux_sample(vsp(before_model, layers="custom", custom_layers="single.1"))
    assert before.layers[SITE].key_sources == ("reference",)


def test_a_foreign_block_replacement_and_a_mask_are_refused_by_name(flux):
    foreign = flux.clone()
    foreign.set_model_patch_replace(lambda args, extra: extra["original_block"](args), "dit", "single_block", 1)
    with pytest.raises(ValueError, match=r"layers: single\.1 already has its joint attention replaced by another "
                                         r"node \(function\)"):
        capture(foreign, custom_layers="single.1")
    masked = [[c, {**extra, "attention_mask": torch.zeros(1, TEXT_TOKENS + IMAGE, TEXT_TOKENS + IMAGE),
                   "attention_mask_img_shape": (HEIGHT // 2, WIDTH // 2)}] for c, extra in conditioning(0)]
    captured, _ = capture(flux, custom_layers="single.1")
    with pytest.raises(ValueError, match="CaptureAttentionMaps: this model's attention has a mask"):
        flux_sample(captured, positive=masked)


@pytest.mark.one_host
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_maps_of_a_half_precision_flux_match_float32(dtype):
    """As ComfyUI loads Flux on a GPU: the maps are computed in float32 from the half-precision q/k, so they are the
    float32 model's maps up to the model's own rounding (bf16's 8-bit mantissa moves these sharp scores most:
    measured 0.002 of the maps' norm in fp16, 0.07 in bf16), and each image row's two maps still sum to 1."""
    maps = {}
    for name, model in (("float32", random_dits.tiny_flux()), ("half", random_dits.tiny_flux(dtype=dtype))):
        for kind in ("self_attention", "cross_attention"):
            captured, maps[name, kind] = capture(model, attention=kind, custom_layers="single.1")
            flux_sample(captured, batch=2)
    for kind in ("self_attention", "cross_attention"):
        half, full = maps["half", kind].layers[SITE].mean, maps["float32", kind].layers[SITE].mean
        bound = 0.15 if dtype == torch.bfloat16 else 0.01
        assert half.dtype == torch.float32 and float((half - full).norm() / full.norm()) < bound
    total = maps["half", "self_attention"].layers[SITE].mean.sum(-1) + maps["half", "cross_attention"].layers[SITE].mean.sum(-1)
    assert torch.allclose(total, torch.ones_like(total), atol=1e-5)
