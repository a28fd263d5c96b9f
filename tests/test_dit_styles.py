"""Visual Style Prompting and StyleAligned on SD3, SD3.5 Medium, Qwen-Image, Lumina 2 and Z-Image: at a block,
each attention's
output equals the method computed by hand from the block's own queries, keys and values (seen through
ComfyUI's code, tests/support/joint_blocks.py), in every cond/uncond layout and at cfg 1.

VSP: each target's image keys and values are its reference's, its text rows keep their own; in SD3.5
Medium's second, image-only attention all of its keys and values are the reference's. StyleAligned: AdaIN of
the image queries and keys toward the reference's (where the model has RoPE, before it), then the reference's
image keys (times the style factor; with RoPE placed one image width to the right, or on its own positions)
and values appended; the reference row attends as it would alone. Padding rows (Z-Image's) keep their own."""

import pytest
import torch

from conftest import pack_submodule
from helpers import LAYOUTS, run_node, style_aligned, vsp
from support.joint_blocks import (HEIGHT, IMAGE, WIDTH, attention_calls, attention_outputs, block_of, conditioning,
                                  dit_noise, dit_sample, family, lumina_pre_rope, lumina_reachable, qwen_pre_rope, shared_by_hand,
                                  text_rows, tiny, vsp_by_hand)

architectures = pack_submodule("glue.architectures")
TOLERANCE = 1e-5  # float32 model against the float64 formula
SITE = ("double", 0)  # SD3.5 Medium: a block with both attentions; SD3: its text side has a projection
CASES = [("together", 1.0), ("together", 3.0), ("separate", 3.0), ("reversed", 3.0)]


@pytest.fixture(scope="module", params=["sd3", "sd35_medium", "qwen_image", "lumina2", "z_image"])
def dit(request):
    if request.param in ("lumina2", "z_image") and not lumina_reachable():
        pytest.skip("this ComfyUI's Lumina 2 gives its attention calls no block index (refused by name: see below)")
    return tiny(request.param)


def test_a_lumina_model_is_refused_by_name_where_comfyui_gives_no_block_index():
    if lumina_reachable():
        pytest.skip("this ComfyUI gives Lumina 2's attention calls a block index")
    with pytest.raises(ValueError, match=r"VisualStylePrompting: this ComfyUI's Lumina 2 / Z-Image model gives its "
                                         r"attention calls no block index, .*update ComfyUI"):
        vsp(tiny("lumina2"), layers="auto")


def run_plain_and_styled(model, styled, layout, cfg):
    """The plain run's calls at SITE and the styled run's attention outputs there, one step (every call sees
    the same block inputs in both runs), and the plain run's images."""
    with attention_calls(LAYOUTS[layout](model), SITE) as (recording, calls):
        plain = dit_sample(recording, cfg=cfg)
    with attention_outputs(model, SITE) as outputs:
        out = dit_sample(LAYOUTS[layout](styled), cfg=cfg)
    assert not torch.equal(out, plain)
    assert torch.equal(dit_sample(LAYOUTS[layout](model), cfg=cfg), plain), "the plain model is untouched"
    return calls, outputs


def assert_outputs(calls, outputs, by_hand, text):
    """Each block call's attention outputs (image rows, text rows where projected, the image-only call's; a
    Lumina layer's every row) equal by_hand(call) of the matching recorded call; text: the call's text rows."""
    joint = [call for call in calls if call["index"] == 0]
    image_only = [call for call in calls if call["index"] == 1]
    assert len(joint) == len(outputs["image"]) + len(outputs["joint"]) > 0
    assert len(image_only) == len(outputs["image_only"])
    pairs = []
    for i, call in enumerate(joint):
        expected = by_hand(call)
        if outputs["joint"]:
            pairs.append((outputs["joint"][i], expected))
            continue
        pairs.append((outputs["image"][i], expected[:, text:]))
        if outputs["text"]:
            pairs.append((outputs["text"][i], expected[:, :text]))
    pairs += [(got, by_hand(call)) for call, got in zip(image_only, outputs["image_only"])]
    for got, want in pairs:
        assert (got.double() - want).abs().max() <= TOLERANCE * want.abs().max()
    return len(pairs)


@pytest.mark.parametrize("layout,cfg", CASES)
def test_vsp_swaps_the_image_keys_and_values_at_a_block(dit, layout, cfg):
    styled = vsp(dit, layers="custom", custom_layers="double.0")
    calls, outputs = run_plain_and_styled(dit, styled, layout, cfg)
    text = text_rows(dit)
    assert assert_outputs(calls, outputs, lambda call: vsp_by_hand(call, text), text) >= 1


def image_positions(model, width_offset=0):
    """The RoPE of the image rows as ComfyUI places them (Qwen-Image: centred on 0; Lumina: after the caption on
    the first axis), shifted on the width axis: (1, image rows, d / 2, 2, 2)."""
    dit = model.get_model_object("diffusion_model")
    h, w = HEIGHT // 2, WIDTH // 2
    rows = torch.arange(h, dtype=torch.float32).repeat_interleave(w)
    cols = torch.arange(w, dtype=torch.float32).repeat(h) + width_offset
    if family(model) == "qwen":
        first, rows, cols = torch.zeros_like(rows), rows - h // 2, cols - w // 2
        embed = dit.pe_embedder
    else:
        first, embed = torch.full_like(rows, text_rows(model) + 1), dit.rope_embedder
    return embed(torch.stack([first, rows, cols], dim=-1)[None])[0]


@pytest.mark.parametrize("layout,cfg", CASES)
@pytest.mark.parametrize("positions", ["beside", "same"])
def test_style_aligned_at_a_block(dit, layout, cfg, positions):
    rotary = family(dit) in ("qwen", "lumina")
    if positions == "same" and not rotary:
        pytest.skip("SD3 has no rotary positions: beside and same are the same")
    (styled,) = run_node("StyleAlignedAttention", model=dit, share_attention=True, adain_queries=True,
                         adain_keys=True, adain_values=False, shared_score_scale=1.1, shared_score_shift=0.0,
                         shared_group_norm="auto", layers="custom", custom_layers="double.0", start_percent=0.0,
                         end_percent=1.0, reference=None, reference_positions=positions)
    text = text_rows(dit)
    if not rotary:
        calls, outputs = run_plain_and_styled(dit, styled, layout, cfg)
        assert assert_outputs(calls, outputs, lambda call: shared_by_hand(call, 1.1, text=text), text) >= 1
        return
    with (qwen_pre_rope if family(dit) == "qwen" else lumina_pre_rope)(dit, SITE) as pre:
        calls, outputs = run_plain_and_styled(dit, styled, layout, cfg)
    image = slice(text, text + IMAGE)
    assert torch.allclose(pre[0]["pe"][:, image], image_positions(dit), atol=1e-6), "the hand-made positions are ComfyUI's"
    shared = image_positions(dit, WIDTH // 2) if positions == "beside" else None
    pairs = iter(pre[:len(calls)])
    assert assert_outputs(calls, outputs, lambda call: shared_by_hand(call, 1.1, next(pairs), shared, text), text) >= 1


@pytest.mark.parametrize("node", ["vsp", "style_aligned"])
def test_an_external_reference_is_the_in_batch_reference_run_alone(dit, node):
    """At one step from sigma 1 a latent reference (4-D, as VAE Encode gives SD3 and Empty Latent gives every
    model) with batch item 0's noise and prompt is item 0: the targets come out as in-batch, twice (the cache)."""
    style = {"vsp": lambda **kw: vsp(dit, layers="all_blocks", **kw),
             "style_aligned": lambda **kw: style_aligned(dit, layers="all_blocks", shared_score_scale=1.1, **kw)}[node]
    (reference,) = run_node("StyleReferenceLatent", latent={"samples": torch.zeros(1, 16, HEIGHT, WIDTH)}, clip=None,
                            prompt="", reference_seed=0, cache_megabytes=64, cache_on_cpu=False,
                            conditioning=conditioning(dit, 0))
    noise = dit_noise(dit, 3)
    in_batch = dit_sample(style(), noise=noise)[1:]
    styled = style(reference=reference)
    external = dit_sample(styled, batch=2, noise=noise[1:])
    assert (external - in_batch).abs().max() <= 1e-5 * in_batch.abs().max()
    assert torch.equal(dit_sample(styled, batch=2, noise=noise[1:]), external)
    assert not torch.equal(in_batch, dit_sample(dit, noise=noise)[1:])


@pytest.mark.one_host  # the same pack code on both hosts; 20-step runs on every family
def test_colour_calibration_and_nvqg_act(dit):
    """Calibration acts in its window of 1000 * sigma (100 < t < 300 here: Lumina 2's shift 6 leaves no step of 20
    in the default 100 < t < 150); negative visual query guidance runs the uncond branch itself, at cfg 1 and 3."""
    (reference,) = run_node("StyleReferenceLatent", latent={"samples": torch.randn(1, 16, HEIGHT, WIDTH)}, clip=None,
                            prompt="", reference_seed=0, cache_megabytes=64, cache_on_cpu=False,
                            conditioning=conditioning(dit, 2))
    swapped = dit_sample(vsp(dit, layers="auto", reference=reference), batch=2, steps=20)
    calibrated = vsp(dit, layers="auto", reference=reference, calibrate_colors=True, calibration_timestep=300,
                     calibration_length=200)
    assert not torch.equal(dit_sample(calibrated, batch=2, steps=20), swapped)
    outside = vsp(dit, layers="auto", reference=reference, calibrate_colors=True, calibration_timestep=5,
                  calibration_length=4)  # 1 < 1000 * sigma < 5: no step of a 20-step schedule
    assert torch.equal(dit_sample(outside, batch=2, steps=20), swapped)
    for cfg in (1.0, 3.0):
        plain = dit_sample(vsp(dit, layers="auto", reference=reference), batch=2, steps=2, cfg=cfg)
        guided = dit_sample(vsp(dit, layers="auto", reference=reference, nvqg_weight=1.0), batch=2, steps=2, cfg=cfg)
        assert torch.isfinite(guided).all() and float((guided - plain).norm() / plain.norm()) > 1e-3


def test_styles_chain_on_disjoint_blocks_and_overlap_is_refused_by_name(dit):
    chained = style_aligned(vsp(dit, layers="custom", custom_layers="double.1"), layers="custom",
                            custom_layers="double.0")
    assert torch.isfinite(dit_sample(chained)).all()
    with pytest.raises(ValueError, match=r"layers: StyleAlignedAttention would restyle double\.1, which "
                                         r"VisualStylePrompting .* already styles"):
        style_aligned(vsp(dit, layers="custom", custom_layers="double.1"), layers="all_blocks")
    if family(dit) == "lumina":
        return  # no block replacement there: another pack cannot claim a layer
    foreign = dit.clone()
    foreign.set_model_patch_replace(lambda args, extra: extra["original_block"](args), "dit", "double_block", 1)
    with pytest.raises(ValueError, match=r"double\.1 already have their joint attention replaced by another node"):
        vsp(foreign, layers="all_blocks")


def test_presets_name_the_second_half_and_refuse_other_families(dit):
    dit_model = dit.get_model_object("diffusion_model")
    depth = len({"sd3": lambda: dit_model.joint_blocks, "qwen": lambda: dit_model.transformer_blocks,
                 "lumina": lambda: dit_model.layers}[family(dit)]())
    patched = vsp(dit, layers="auto")
    adapter = architectures.adapter_for(patched, "test", architectures.ADAPTERS)
    assert [site for site in adapter.sites if adapter.installed(patched, site, "attn1") is not None] == [
        ("double", i) for i in range(depth // 2, depth)]
    assert all(adapter.installed(dit, site, "attn1") is None for site in adapter.sites)
    with pytest.raises(ValueError, match=r"layers: 'vital_blocks' is a preset of another model family"):
        vsp(dit, layers="vital_blocks")
    with pytest.raises(ValueError, match=r"custom_layers: cannot read 'single\.0'; on .* expected double\.N, double"):
        vsp(dit, layers="custom", custom_layers="single.0")
    with pytest.raises(ValueError, match=rf"custom_layers: this model has no double\.{depth} \({depth} double blocks\)"):
        vsp(dit, layers="custom", custom_layers=f"double.{depth}")
    assert block_of(dit, SITE) is not None


def test_attention_maps_are_the_joint_softmax(dit):
    """Plain capture at cfg 1: the self map is the image rows' probabilities on the image keys, the cross map on
    the text keys (SD3.5 Medium's image-only attention is not captured)."""
    with attention_calls(dit, SITE) as (recording, calls):
        dit_sample(recording, batch=2)
    maps = {}
    for kind in ("self_attention", "cross_attention"):
        captured, maps[kind] = run_node("CaptureAttentionMaps", model=dit, attention=kind, layers="custom",
                                        custom_layers="double.0", start_percent=0.0, end_percent=1.0, max_megabytes=8)
        dit_sample(captured, batch=2)
    (call,) = [call for call in calls if call["index"] == 0]
    d, text = call["q"].shape[-1], text_rows(dit)
    weights = torch.softmax(call["q"].double() @ call["k"].double().transpose(-1, -2) / d ** 0.5, -1).mean(1)
    image = weights[:, text:text + IMAGE]  # the image rows; padding rows (Z-Image's) are neither rows nor columns
    for kind, columns in (("self_attention", slice(text, text + IMAGE)), ("cross_attention", slice(0, text))):
        got = maps[kind].layers[SITE]
        assert got.calls == 1 and got.mean.shape == (2, IMAGE, image[..., columns].shape[-1])
        assert (got.mean.double() - image[..., columns]).abs().max() <= TOLERANCE
