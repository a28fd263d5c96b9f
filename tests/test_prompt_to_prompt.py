"""StyleDiffusion's editing (issue 16): prompt-to-prompt on the source/target pair sampled from a real
image's value-input inversion, through the real sampler and model patcher."""

import pytest
import torch

import comfy.model_management
import comfy.samplers
import random_models
from conftest import pack_submodule
from helpers import (attention_by_hand, attention_weights_by_hand, encode, record_attention, relative_error, run_node,
                     self_attention_module, with_separate_cond_batches)
from support.inversion import PROMPT, invert, sample_from_top
from support.inversion import tame  # noqa: F401 (a fixture)

p2p = pack_submodule("attention_patches.prompt_to_prompt")
local_blend = pack_submodule("attention_patches.local_blend")

TARGET = "a dog on a wall"


@pytest.fixture(scope="module")
def inversion(tame):
    inversion, reconstruction, _ = invert(tame, steps=4, inner_iterations=3)
    return inversion, reconstruction


def edit(models, style_inversion, target_prompt=TARGET, edit_mode="replace", reweight="", tau_v=0.5, tau_c=0.6,
         tau_s=0.6, tau_u=0.0, blend_source_words="", blend_target_words="", blend_threshold=0.3, model=None):
    return run_node("PromptToPromptEdit", model=model or models.model, clip=models.clip,
                    style_inversion=style_inversion, target_prompt=target_prompt, edit_mode=edit_mode,
                    reweight=reweight, tau_v=tau_v, tau_c=tau_c, tau_s=tau_s, tau_u=tau_u,
                    blend_source_words=blend_source_words, blend_target_words=blend_target_words,
                    blend_threshold=blend_threshold)


def test_the_schedule_follows_the_authors_bounds():
    schedule = p2p.EditSchedule(30, tau_v=0.5, tau_c=0.6, tau_s=0.6, tau_u=0.5)
    assert [schedule.at(i).target_values for i in (14, 15)] == [True, False]
    assert [schedule.at(i).cross for i in (17, 18)] == [True, False]  # int(0.6 * 31) = 18
    assert [schedule.at(i).self_cond for i in (17, 18)] == [True, False]
    assert [schedule.at(i).self_uncond for i in (14, 15)] == [True, False]
    nothing = p2p.EditSchedule(30, 0.0, 0.0, 0.0, 0.0).at(0)
    assert not (nothing.target_values or nothing.cross or nothing.self_cond or nothing.self_uncond)


def test_the_source_row_is_the_inversions_reconstruction_and_the_source_prompt_reconstructs(tame, inversion):
    style_inversion, reconstruction = inversion
    edited, source = edit(tame, style_inversion, target_prompt=PROMPT, tau_v=1.0)
    assert relative_error(source["samples"], reconstruction["samples"]) < 1e-5
    assert relative_error(edited["samples"], reconstruction["samples"]) < 1e-5


def test_all_taus_zero_is_plain_sampling_of_the_target_from_the_inverted_latent(tame, inversion):
    style_inversion, _ = inversion
    edited, _ = edit(tame, style_inversion, tau_v=0.0, tau_c=0.0, tau_s=0.0, tau_u=0.0)
    plain = sample_from_top(tame.model, style_inversion, encode(tame.clip, TARGET), encode(tame.clip, ""),
                            style_inversion.guidance)
    assert relative_error(edited["samples"], plain) < 1e-5
    assert relative_error(edit(tame, style_inversion)[0]["samples"], plain) > 1e-3  # the defaults do edit


alignment = pack_submodule("attention_patches.token_alignment")
tokens = pack_submodule("attention_patches.prompt_tokens")
CROSS_LAYER = ("output", 3, 0)  # a layer at the tiny UNet's coarser level
LAYERS = {"fine": ("input", 1, 0), "coarse": ("output", 3, 0)}


def token_ids(clip, text):
    chunk = tokens.chunk_ids(clip.tokenize(text)["l"])[0]
    end = tokens.chunk_ids(clip.tokenize("")["l"])[0][1]
    return chunk[:chunk.index(end, 1) + 1]


def word_ids(clip, text):
    empty = tokens.chunk_ids(clip.tokenize("")["l"])[0]
    return [tokens.content_ids(tokens.chunk_ids(clip.tokenize(word)["l"]), empty) for word in text.split()]


def expected_source_map(clip, mode, target, reweight):
    """(A, b): the target's maps are P_s A + P_t diag(b), from the prompts' own tokens."""
    weights = torch.ones(77)
    if reweight:
        word, weight = reweight.split(":")
        weights[tokens.word_positions([token_ids(clip, target)], word_ids(clip, word)[0])] = float(weight)
    if mode == "replace":
        return alignment.replacement_mapper(word_ids(clip, PROMPT), word_ids(clip, target), 77) * weights, None
    indices, alphas = alignment.refinement_mapper(token_ids(clip, PROMPT), token_ids(clip, target), 77)
    select = torch.zeros(77, 77)
    for j, i in enumerate(indices.tolist()):
        select[i, j] = alphas[j] * weights[j]
    return select, (1 - alphas) * weights




@pytest.mark.parametrize("mode, target, reweight", [
    ("replace", "a xylophonist on a wall", ""),  # a word of several tokens for one
    ("refine", "a cat on a high wall", ""),
    ("reweight", PROMPT, "wall:3"),
    ("replace", TARGET, "dog:0.5"),
])
def test_with_tau_c_1_the_targets_cross_attention_maps_are_the_sources_through_the_alignment(
        tame, inversion, mode, target, reweight):
    style_inversion, _ = inversion
    heads = self_attention_module(tame.model, CROSS_LAYER).attn2.heads
    with record_attention(tame.model, CROSS_LAYER, "attn2") as calls:
        edit(tame, style_inversion, target_prompt=target, edit_mode=mode, reweight=reweight, tau_v=0.0, tau_c=1.0,
             tau_s=0.0, model=with_separate_cond_batches(tame.model))
    source_map, own = expected_source_map(tame.clip, mode, target, reweight)
    cond = calls[::2]  # separate cond/uncond calls, cond first
    assert len(cond) == style_inversion.steps
    for call in cond:
        q, k, v, out = call["q"].double(), call["k"].double(), call["v"].double(), call["out"].double()
        maps = attention_weights_by_hand(q[:1], k[:1], heads) @ source_map.double()
        if own is not None:
            maps = maps + attention_weights_by_hand(q[1:], k[1:], heads) * own.double()
        v_t = v[1:].reshape(1, 77, heads, -1).permute(0, 2, 1, 3)
        expected = (maps @ v_t).permute(0, 2, 1, 3).reshape(out[1:].shape)
        assert relative_error(out[1:], expected) < 1e-5
        assert relative_error(out[:1], attention_by_hand(q[:1], k[:1], v[:1], heads)) < 1e-5  # the source: plain


@pytest.mark.parametrize("tau_s, tau_u", [(1.0, 0.0), (0.0, 1.0)])
def test_self_attention_maps_are_the_sources_below_the_finest_level_in_the_branch_asked(tame, inversion, tau_s, tau_u):
    style_inversion, _ = inversion
    recorded = {}
    model = with_separate_cond_batches(tame.model, reverse=True)
    with record_attention(tame.model, LAYERS["fine"]) as fine, record_attention(tame.model, LAYERS["coarse"]) as coarse:
        edit(tame, style_inversion, tau_v=0.0, tau_c=0.0, tau_s=tau_s, tau_u=tau_u, model=model)
    recorded = {"fine": fine, "coarse": coarse}
    for level, calls in recorded.items():
        assert len(calls) == 2 * style_inversion.steps
        for index, call in enumerate(calls):
            branch = "uncond" if index % 2 == 0 else "cond"  # reverse: uncond first
            q, k, v, out = call["q"], call["k"], call["v"], call["out"]
            replaced = level == "coarse" and (tau_s if branch == "cond" else tau_u) == 1.0
            heads = self_attention_module(tame.model, LAYERS[level]).attn1.heads
            expected = attention_by_hand(q[:1] if replaced else q[1:], k[:1] if replaced else k[1:], v[1:], heads)
            assert relative_error(out[1:], expected) < 1e-5, (level, branch)


def test_any_cond_uncond_layout_gives_the_same_edit(tame, inversion):
    style_inversion, _ = inversion
    settings = dict(tau_u=0.5, blend_target_words="dog", blend_source_words="cat")
    together = edit(tame, style_inversion, **settings)[0]["samples"]
    for reverse in (False, True):
        separate = edit(tame, style_inversion, model=with_separate_cond_batches(tame.model, reverse), **settings)
        assert relative_error(separate[0]["samples"], together) < 1e-5


def test_at_cfg_1_only_the_cond_branch_runs_and_tau_u_changes_nothing(tame):
    style_inversion, _, _ = invert(tame, steps=3, inner_iterations=2, guidance=1.0)
    with_u = edit(tame, style_inversion, tau_u=1.0)[0]["samples"]
    assert torch.equal(with_u, edit(tame, style_inversion, tau_u=0.0)[0]["samples"])
    plain = sample_from_top(tame.model, style_inversion, encode(tame.clip, TARGET), encode(tame.clip, ""), 1.0)
    assert relative_error(with_u, plain) > 1e-5


def test_the_local_blend_keeps_the_source_outside_the_words_regions(tame, inversion):
    style_inversion, _ = inversion
    words = dict(blend_source_words="cat", blend_target_words="dog")
    _, source = edit(tame, style_inversion)
    nowhere, _ = edit(tame, style_inversion, blend_threshold=1.0, **words)  # no map is above its own peak
    assert torch.equal(nowhere["samples"], source["samples"])
    everywhere, _ = edit(tame, style_inversion, blend_threshold=0.0, **words)  # softmax maps are positive
    assert relative_error(everywhere["samples"], edit(tame, style_inversion)[0]["samples"]) < 1e-6
    somewhere, _ = edit(tame, style_inversion, blend_threshold=0.99, **words)
    changed = (somewhere["samples"] - source["samples"]).abs().amax(1)
    assert 0 < int((changed > 0).sum()) < changed.numel()


def test_the_blend_mask_by_hand():
    maps = local_blend.BlendMaps(torch.zeros(2, 77))
    maps.sum = torch.zeros(2, 16)
    maps.sum[0, 0] = 1.0  # source's word at (0, 0) of a 4x4 layer
    maps.sum[1, 15] = 4.0  # target's word at (3, 3)
    maps.sum[1, 5] = 1.0  # ... weakly at (1, 1): below 0.3 of its peak
    maps.spatial = (4, 4)
    mask = local_blend.blend_mask(maps, (8, 8), 0.3)
    expected = torch.zeros(8, 8)
    expected[0:4, 0:4] = 1  # (0, 0) pooled 3x3 -> rows/cols 0-1 of 4 -> 0-3 of 8
    expected[4:8, 4:8] = 1  # (3, 3) -> 2-3 -> 4-7
    assert torch.equal(mask[0, 0], expected)


def test_the_input_model_is_untouched(tame, inversion):
    style_inversion, _ = inversion
    before = sample_from_top(tame.model, style_inversion, encode(tame.clip, TARGET), encode(tame.clip, ""), 7.5)
    options = dict(tame.model.model_options)
    edit(tame, style_inversion, tau_u=0.5, blend_target_words="dog")
    after = sample_from_top(tame.model, style_inversion, encode(tame.clip, TARGET), encode(tame.clip, ""), 7.5)
    assert torch.equal(before, after) and tame.model.model_options.keys() == options.keys()
    assert "patches_replace" not in tame.model.model_options.get("transformer_options", {})


@pytest.mark.parametrize("inputs, message", [
    (dict(target_prompt="a big cat on a wall"), "replace needs prompts of the same number of words"),
    (dict(target_prompt=" "), "target_prompt: empty"),
    (dict(target_prompt="a cat " * 40), "target_prompt: longer than one 77-token chunk"),
    (dict(target_prompt="a (big cat:1.2) on a wall"), "target_prompt: its words tokenize differently"),
    (dict(reweight="dog"), "reweight: 'dog' is not word:weight"),
    (dict(reweight="tiger:2"), "reweight: its tokens"),
    (dict(edit_mode="reweight", target_prompt=PROMPT), "reweight: give words and weights"),
    (dict(blend_target_words="tiger"), "blend_target_words: 'tiger'"),
])
def test_bad_inputs_are_named(tame, inversion, inputs, message):
    with pytest.raises(ValueError, match=message):
        edit(tame, inversion[0], **inputs)


def test_an_inversion_of_another_model_shape_is_refused(sdxl, inversion):
    with pytest.raises(ValueError, match="style_inversion: made with a model of 4-channel latents and 32-wide"):
        edit(sdxl, inversion[0])


def test_sdxl_edits_with_both_tokenizers(sdxl):
    style_inversion, reconstruction, _ = invert(sdxl, steps=2, inner_iterations=1)
    edited, source = edit(sdxl, style_inversion, target_prompt="a cat on a high wall", edit_mode="refine",
                          reweight="high:2", blend_target_words="high")
    # an untamed random UNet (eps of std ~100) amplifies the rounding of a batch of 2 against 1
    assert relative_error(source["samples"], reconstruction["samples"]) < 1e-4
    assert edited["samples"].shape == source["samples"].shape and torch.isfinite(edited["samples"]).all()
    assert relative_error(edited["samples"], source["samples"]) > 1e-4


def test_a_controlnet_reaches_the_edit_through_its_control_conditioning(tame, inversion):
    import nodes as comfy_nodes

    style_inversion, _ = inversion
    controlnet = random_models.tiny_controlnet(tame.model.model.model_config.unet_config, seed=0)
    hint = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(4))
    positive, negative = comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(
        encode(tame.clip, "anything"), encode(tame.clip, ""), controlnet, hint, 1.0, 0.0, 1.0)
    plain_edit, _ = edit(tame, style_inversion)
    controlled = run_node("PromptToPromptEdit", model=tame.model, clip=tame.clip, style_inversion=style_inversion,
                          target_prompt=TARGET, edit_mode="replace", reweight="", tau_v=0.5, tau_c=0.6, tau_s=0.6,
                          tau_u=0.0, blend_source_words="", blend_target_words="", blend_threshold=0.3,
                          control_positive=positive, control_negative=negative)[0]
    assert torch.isfinite(controlled["samples"]).all()
    assert relative_error(controlled["samples"], plain_edit["samples"]) > 1e-4  # the ControlNet acts
    with pytest.raises(ValueError, match="control_positive: expected one conditioning entry"):
        run_node("PromptToPromptEdit", model=tame.model, clip=tame.clip, style_inversion=style_inversion,
                 target_prompt=TARGET, edit_mode="replace", reweight="", tau_v=0.5, tau_c=0.6, tau_s=0.6, tau_u=0.0,
                 blend_source_words="", blend_target_words="", blend_threshold=0.3,
                 control_positive=positive + positive)
