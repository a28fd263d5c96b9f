"""Visual Style Prompting and StyleAligned on SD3, SD3.5 Medium and Qwen-Image: at a block, each attention's
output equals the method computed by hand from the block's own queries, keys and values (seen through
ComfyUI's code, tests/support/joint_blocks.py), in every cond/uncond layout and at cfg 1.

VSP: each target's image keys and values are its reference's, its text rows keep their own; in SD3.5
Medium's second, image-only attention all of its keys and values are the reference's. StyleAligned: AdaIN of
the image queries and keys toward the reference's (on Qwen-Image before RoPE), then the reference's image
keys (times the style factor; on Qwen-Image placed one image width to the right, or on its own positions)
and values appended; the reference row attends as it would alone."""

import pytest
import torch

from helpers import LAYOUTS, run_node, style_aligned, vsp
from support.joint_blocks import (HEIGHT, IMAGE, TEXT_TOKENS, WIDTH, attention_calls, attention_outputs, block_of,
                                  conditioning, dit_noise, dit_sample, qwen_pre_rope, shared_by_hand, tiny, vsp_by_hand)

TOLERANCE = 1e-5  # float32 model against the float64 formula
SITE = ("double", 0)  # SD3.5 Medium: a block with both attentions; SD3: its text side has a projection
CASES = [("together", 1.0), ("together", 3.0), ("separate", 3.0), ("reversed", 3.0)]


@pytest.fixture(scope="module", params=["sd3", "sd35_medium", "qwen_image"])
def dit(request):
    return tiny(request.param)


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


def assert_outputs(calls, outputs, by_hand):
    """Each block call's attention outputs (image rows, text rows where projected, the image-only call's) equal
    by_hand(call) of the matching recorded call."""
    joint = [call for call in calls if call["index"] == 0]
    image_only = [call for call in calls if call["index"] == 1]
    assert len(joint) == len(outputs["image"]) > 0 and len(image_only) == len(outputs["image_only"])
    checked = 0
    for call, image, text in zip(joint, outputs["image"], outputs["text"] or [None] * len(joint)):
        expected = by_hand(call)
        pairs = [(image, expected[:, TEXT_TOKENS:])] + ([] if text is None else [(text, expected[:, :TEXT_TOKENS])])
        for got, want in pairs:
            assert (got.double() - want).abs().max() <= TOLERANCE * want.abs().max()
            checked += 1
    for call, got in zip(image_only, outputs["image_only"]):
        want = by_hand(call)
        assert (got.double() - want).abs().max() <= TOLERANCE * want.abs().max()
        checked += 1
    return checked


@pytest.mark.parametrize("layout,cfg", CASES)
def test_vsp_swaps_the_image_keys_and_values_at_a_block(dit, layout, cfg):
    styled = vsp(dit, layers="custom", custom_layers="double.0")
    calls, outputs = run_plain_and_styled(dit, styled, layout, cfg)
    assert assert_outputs(calls, outputs, vsp_by_hand) >= 1


def qwen_positions(model, width_offset=0):
    """Qwen-Image's RoPE for its image rows as ComfyUI places them (centred on 0), shifted on the width axis."""
    dit = model.get_model_object("diffusion_model")
    h, w = HEIGHT // 2, WIDTH // 2
    rows = torch.arange(h, dtype=torch.float32).repeat_interleave(w) - h // 2
    cols = torch.arange(w, dtype=torch.float32).repeat(h) - w // 2 + width_offset
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1)[None]
    return dit.pe_embedder(ids)[0]


@pytest.mark.parametrize("layout,cfg", CASES)
@pytest.mark.parametrize("positions", ["beside", "same"])
def test_style_aligned_at_a_block(dit, layout, cfg, positions):
    qwen = hasattr(dit.get_model_object("diffusion_model"), "transformer_blocks")
    if positions == "same" and not qwen:
        pytest.skip("SD3 has no rotary positions: beside and same are the same")
    (styled,) = run_node("StyleAlignedAttention", model=dit, share_attention=True, adain_queries=True,
                         adain_keys=True, adain_values=False, shared_score_scale=1.1, shared_score_shift=0.0,
                         shared_group_norm="auto", layers="custom", custom_layers="double.0", start_percent=0.0,
                         end_percent=1.0, reference=None, reference_positions=positions)
    if not qwen:
        calls, outputs = run_plain_and_styled(dit, styled, layout, cfg)
        assert assert_outputs(calls, outputs, lambda call: shared_by_hand(call, 1.1)) >= 1
        return
    with qwen_pre_rope(dit, SITE) as pre:
        calls, outputs = run_plain_and_styled(dit, styled, layout, cfg)
    image = slice(TEXT_TOKENS, None)
    assert torch.allclose(pre[0]["pe"][:, image], qwen_positions(dit)), "the hand-made positions are ComfyUI's"
    shared = qwen_positions(dit, WIDTH // 2) if positions == "beside" else None
    pairs = iter(pre[:len(calls)])
    assert assert_outputs(calls, outputs, lambda call: shared_by_hand(call, 1.1, next(pairs), shared)) >= 1


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


def test_styles_chain_on_disjoint_blocks_and_overlap_is_refused_by_name(dit):
    chained = style_aligned(vsp(dit, layers="custom", custom_layers="double.1"), layers="custom",
                            custom_layers="double.0")
    assert torch.isfinite(dit_sample(chained)).all()
    with pytest.raises(ValueError, match=r"layers: StyleAlignedAttention would restyle double\.1, which "
                                         r"VisualStylePrompting .* already styles"):
        style_aligned(vsp(dit, layers="custom", custom_layers="double.1"), layers="all_blocks")
    foreign = dit.clone()
    foreign.set_model_patch_replace(lambda args, extra: extra["original_block"](args), "dit", "double_block", 1)
    with pytest.raises(ValueError, match=r"double\.1 already have their joint attention replaced by another node"):
        vsp(foreign, layers="all_blocks")


def test_presets_name_the_second_half_and_refuse_other_families(dit):
    depth = len(dit.get_model_object("diffusion_model").joint_blocks
                if hasattr(dit.get_model_object("diffusion_model"), "joint_blocks")
                else dit.get_model_object("diffusion_model").transformer_blocks)
    patched = vsp(dit, layers="auto")
    replaced = set(patched.model_options["transformer_options"]["patches_replace"]["dit"])
    assert replaced == {("double_block", i) for i in range(depth // 2, depth)}
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
    d = call["q"].shape[-1]
    weights = torch.softmax(call["q"].double() @ call["k"].double().transpose(-1, -2) / d ** 0.5, -1).mean(1)
    image = weights[:, TEXT_TOKENS:]
    for kind, columns in (("self_attention", slice(TEXT_TOKENS, None)), ("cross_attention", slice(0, TEXT_TOKENS))):
        got = maps[kind].layers[SITE]
        assert got.calls == 1 and got.mean.shape == (2, IMAGE, image[..., columns].shape[-1])
        assert (got.mean.double() - image[..., columns]).abs().max() <= TOLERANCE
