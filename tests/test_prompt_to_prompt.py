"""StyleDiffusion's editing (issue 16): prompt-to-prompt on the source/target pair sampled from a real
image's value-input inversion, through the real sampler and model patcher."""

import pytest
import torch

import comfy.model_management
import comfy.samplers
import random_models
from conftest import pack_submodule
from helpers import (attention_by_hand, attention_weights_by_hand, encode, record_attention, relative_error, run_node,
                     with_separate_cond_batches)
from test_ddim_inversion import tamed
from test_prompt_embedding_inversion import PROMPT, image_latent, invert, sample_from_top

p2p = pack_submodule("attention_patches.prompt_to_prompt")
local_blend = pack_submodule("attention_patches.local_blend")

TARGET = "a dog on a wall"


@pytest.fixture(scope="module")
def tame():
    return tamed(random_models.tiny_sd15(seed=5))


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
