"""StyleDiffusion's inversion (issue 16): the value input of cross-attention learned per step so that
guided sampling reconstructs a real image, with the attention maps held to the inversion's."""

import math

import pytest
import torch

import comfy.sample
import folder_paths
from conftest import pack_submodule
from helpers import encode, relative_error, run_node
from support.inversion import PROMPT, image_latent, invert, sample_from_top
from support.inversion import tame  # noqa: F401 (a fixture)

value_input = pack_submodule("inversion.value_input")
style_inversion = pack_submodule("inversion.style_inversion")
value_inversion = pack_submodule("glue.value_inversion")
owners = pack_submodule("nodes.style_inputs")

def test_schedules_are_the_authors():
    settings = value_input.ValueInversionSettings(inner_iterations=100)
    assert [value_input.iterations_at(settings, i) for i in (0, 1, 2, 29)] == [100, 91, 82, 6]
    assert sum(value_input.iterations_at(settings, i) for i in range(30)) == 1015
    assert value_input.learning_rate_at(settings, 29) == pytest.approx(0.0071)
    assert value_input.stop_threshold(settings, 29) == pytest.approx(1e-5 + 29 * 2e-5)
    assert value_input.attention_target_index(settings, 30, 30) == 29
    assert value_input.attention_target_index(settings, 5, 30) == 5
    same_sigma = value_input.ValueInversionSettings(attention_target=value_input.SAME_SIGMA)
    assert value_input.attention_target_index(same_sigma, 5, 30) == 4


def test_learned_values_reconstruct_at_cfg_7_5_better_than_plain_ddim_inversion(tame):
    latent = image_latent()
    inversion, reconstruction, curve = invert(tame, latent, inner_iterations=30, early_stop=False)
    positive, negative = encode(tame.clip, PROMPT), encode(tame.clip, "")
    plain = sample_from_top(tame.model, inversion, positive, negative, 7.5)
    owner = owners.new_owner("Reconstruction")
    learned = sample_from_top(value_inversion.with_learned_values(tame.model, inversion, owner), inversion,
                              positive, negative, 7.5)
    target = latent["samples"]
    plain_error, learned_error = relative_error(plain, target), relative_error(learned, target)
    assert learned_error < 0.5 * plain_error, (learned_error, plain_error)
    # the node's reconstruction is the learned steps' own run: sampling with the values gives it again
    assert relative_error(learned, reconstruction["samples"]) < 1e-4
    first, last = inversion.losses[0], inversion.losses[-1]
    assert min(first) < 0.5 * first[0]  # the loss falls within a step
    assert curve.shape[-1] == 3


def test_the_loss_falls_and_values_start_as_the_previous_step_left_them(tame):
    inversion, _, _ = invert(tame, steps=4, inner_iterations=10, early_stop=False)
    assert [len(l) for l in inversion.losses] == [10, 10, 9, 8]
    assert all(l[-1] < l[0] for l in inversion.losses)
    assert inversion.scales.shape == (4, 77, 32) and not torch.equal(inversion.scales[0], torch.ones(77, 32))


def test_without_the_attention_loss_the_loss_is_the_latents_alone(tame):
    with_maps, _, _ = invert(tame, steps=3, inner_iterations=3, early_stop=False)
    without, _, _ = invert(tame, steps=3, inner_iterations=3, early_stop=False, attention_weight=0.0)
    assert without.losses[0][0] < with_maps.losses[0][0]  # same first forward, no attention term
    assert with_maps.settings["layers"] and not without.settings["layers"]


def test_save_and_load_are_exact_and_atomic(tame, tmp_path):
    inversion, _, _ = invert(tame, steps=3, inner_iterations=2)
    folder_paths.set_output_directory(str(tmp_path))
    run_node("SaveStyleInversion", style_inversion=inversion, filename_prefix="inversions/cat")
    (saved,) = (tmp_path / "inversions").iterdir()
    assert saved.name == "cat_00001_.style-inversion.safetensors"
    (loaded,) = run_node("LoadStyleInversion", style_inversion="inversions/" + saved.name + " [output]")
    for name in ("scales", "shifts"):
        assert torch.equal(getattr(loaded, name), getattr(inversion, name))
    assert torch.equal(loaded.trajectory.latents, inversion.trajectory.latents)
    assert loaded.source_prompt == PROMPT and loaded.settings == inversion.settings
    assert loaded.losses == inversion.losses


def test_the_input_model_is_untouched(tame):
    positive, negative = encode(tame.clip, PROMPT), encode(tame.clip, "")
    latent = torch.zeros(1, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, 0)
    before = comfy.sample.sample(tame.model, noise, 3, 4.0, "euler", "normal", positive, negative, latent,
                                 disable_pbar=True)
    patches = dict(tame.model.model_options)
    invert(tame, steps=2, inner_iterations=2)
    after = comfy.sample.sample(tame.model, noise, 3, 4.0, "euler", "normal", positive, negative, latent,
                                disable_pbar=True)
    assert torch.equal(before, after) and tame.model.model_options.keys() == patches.keys()


@pytest.mark.parametrize("inputs, message", [
    (dict(latent={"samples": torch.zeros(2, 4, 8, 8)}), "latent: expected one image's latent"),
    (dict(latent={"samples": torch.zeros(1, 4, 9, 8)}), "latent: 9x8; this UNet needs sides divisible by"),
    (dict(source_prompt="  "), "source_prompt: empty"),
])
def test_bad_inputs_are_named(tame, inputs, message):
    with pytest.raises(ValueError, match=message):
        defaults = dict(model=tame.model, clip=tame.clip, latent=image_latent(), source_prompt=PROMPT, steps=2,
                        scheduler="ddim_uniform", guidance=7.5, inner_iterations=1, learning_rate=0.01,
                        attention_weight=1.0, attention_target=value_input.ATTENTION_TARGETS[0], early_stop=True,
                        max_megabytes=64)
        run_node("PromptEmbeddingInversion", **{**defaults, **inputs})


def test_the_map_budget_is_checked(tame):
    with pytest.raises(ValueError, match="max_megabytes: the attention maps"):
        invert(tame, steps=2, inner_iterations=1, max_megabytes=0)
