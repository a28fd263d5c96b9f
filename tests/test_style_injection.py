"""StyleInjection (DiffStyler part 2): the content's inversion runs as a source branch and its
ResBlock features and self-attention queries/keys are injected into the styled run."""

import pytest
import torch

import folder_paths
from helpers import (assert_relative_close, attention_by_hand, encode, invert, record_attention, relative_error,
                     run_node, style_aligned, vsp, with_separate_cond_batches)
from oracles import pnp as reference_pnp
from oracles.attention import PlainProcessor
from oracles.models import twin_models
from oracles.sampling import sd_scheduler
from support.injection import STEPS, content, inject, sample_from
from support.inversion import tamed
from support.parity import TOLERANCE, random_prompts, scale_factor


@pytest.fixture(scope="module")
def sd15_content(sd15):
    return content(sd15)


def prompts_of(models):
    return encode(models.clip, "a dog"), encode(models.clip, "")


def test_sites_resolve_to_the_authors_decoder_layers(sd15, sd15_content):
    injected = inject(sd15.model, sd15_content[2], clip=sd15.clip)
    attn1 = injected.model_options["transformer_options"]["patches_replace"]["attn1"]
    # tiny SD1.5: decoder transformers in output blocks 2-5; all but the first, and the ResBlock of the second
    assert sorted(attn1) == [("output", 3, 0), ("output", 4, 0), ("output", 5, 0)]
    assert list(injected.object_patches) == ["diffusion_model.output_blocks.3.0.out_layers.3"]
    assert sd15.model.object_patches == {} and "patches_replace" not in sd15.model.model_options["transformer_options"]


@pytest.mark.parametrize("chain", ["alone", "style_aligned_after", "style_aligned_before"])
def test_injected_queries_keys_and_residual_follow_the_formula(sd15, sd15_content, chain):
    """Chained with StyleAligned (in-batch, shared GroupNorm, on the encoder) in either order, too."""
    _, start, trajectory = sd15_content
    aligned = {"layers": "custom", "custom_layers": "input.1, input.3", "shared_group_norm": "on"}
    base = style_aligned(sd15.model, **aligned) if chain == "style_aligned_before" else sd15.model
    injected = inject(base, trajectory, clip=sd15.clip, feature_fraction=1.0, attention_fraction=1.0)
    if chain == "style_aligned_after":
        injected = style_aligned(injected, **aligned)
    batch = 1 if chain == "alone" else 2
    unet = sd15.model.get_model_object("diffusion_model")
    resblock = unet.output_blocks[3][0]
    # the original layer: a previous run's object patches may still stand in the UNet
    branch_end, seen = sd15.model.get_model_object("diffusion_model.output_blocks.3.0.out_layers.3"), []
    hooks = [branch_end.register_forward_hook(lambda m, i, o: seen.append({"h": o.detach().clone()})),
             resblock.register_forward_hook(lambda m, i, o: seen[-1].update(x=i[0].detach().clone(), out=o.detach().clone()))]
    model_sampling = sd15.model.get_model_object("model_sampling")
    try:
        with record_attention(sd15.model, ("output", 4, 0)) as calls:
            sample_from(injected, start, *prompts_of(sd15), batch=batch)
    finally:
        for hook in hooks:
            hook.remove()
    assert [call["q"].shape[0] for call in calls] == [1, 2 * batch] * STEPS  # the source alone, then cond + uncond
    heads = unet.output_blocks[4][1].transformer_blocks[0].attn1.heads
    rates = []
    for step in range(STEPS):
        source, target = calls[2 * step], calls[2 * step + 1]
        sigma = float(trajectory.sigmas.flip(0)[step])
        rate = min(1.0, 2 * float(model_sampling.timestep(torch.tensor(sigma))) / 1000)
        rates.append(rate)
        q = rate * source["q"] + (1 - rate) * target["q"]
        k = rate * source["k"] + (1 - rate) * target["k"]
        assert_relative_close(target["out"], attention_by_hand(q, k, target["v"], heads), 1e-5)
        residual_source, residual_target = seen[2 * step], seen[2 * step + 1]
        expected = resblock.skip_connection(residual_target["x"]) + residual_source["h"]
        assert_relative_close(residual_target["out"], expected, 1e-6)
    assert rates[0] == 1.0 and 0.0 < rates[-1] < 0.01 and 0.4 < rates[2] < 0.6  # t = 751, 501, 251, 1


@pytest.mark.parametrize("fractions", [(0.0, 0.0), (0.001, 0.001)], ids=["zero", "before_the_first_step"])
def test_no_injected_step_is_plain_sampling_bit_for_bit(sd15, sd15_content, fractions):
    _, start, trajectory = sd15_content
    injected = inject(sd15.model, trajectory, clip=sd15.clip, feature_fraction=fractions[0],
                      attention_fraction=fractions[1])
    assert torch.equal(sample_from(injected, start, *prompts_of(sd15)), sample_from(sd15.model, start, *prompts_of(sd15)))


@pytest.mark.parametrize("seed", [5, 6])
def test_the_output_keeps_more_of_the_content_as_the_fractions_rise(seed):
    import random_models

    models = tamed(random_models.tiny_sd15(seed=seed))
    latent, start, trajectory = content(models, steps=20)
    positive, negative = encode(models.clip, "a cat in the style of van gogh"), encode(models.clip, "")
    reconstruction = sample_from(models.model, start, encode(models.clip, ""), negative, steps=20, cfg=1.0)
    assert relative_error(reconstruction, latent) < 0.05
    every_decoder_resblock = ", ".join(f"output.{n}" for n in range(6))  # one ResBlock moves a tiny UNet little

    def distance(fraction):
        injected = inject(models.model, trajectory, clip=models.clip, feature_fraction=fraction,
                          attention_fraction=fraction, attention_sites="decoder", feature_sites="custom",
                          custom_feature_sites=every_decoder_resblock)
        return relative_error(sample_from(injected, start, positive, negative, steps=20, cfg=7.5), reconstruction)

    distances = [distance(fraction) for fraction in (0.0, 0.2, 0.4, 0.6)]
    assert all(later < earlier for earlier, later in zip(distances, distances[1:])), distances
    assert distances[-1] < 0.35 * distances[0], distances


@pytest.mark.parametrize("layout", ["separate", "reversed", "cfg1"])
def test_cond_uncond_layouts_agree(sd15, sd15_content, layout):
    _, start, trajectory = sd15_content
    injected = inject(sd15.model, trajectory, clip=sd15.clip, feature_fraction=1.0, attention_fraction=1.0)
    cfg = 1.0 if layout == "cfg1" else 4.0
    together = sample_from(injected, start, *prompts_of(sd15), cfg=cfg, batch=2)
    other = injected if layout == "cfg1" else with_separate_cond_batches(injected, reverse=layout == "reversed")
    if layout == "cfg1":  # cfg 1 runs cond alone: compare with uncond = cond at cfg 4, which is the cond result
        positive = prompts_of(sd15)[0]
        assert_relative_close(sample_from(injected, start, positive, positive, cfg=4.0, batch=2), together, 1e-5)
    else:
        assert_relative_close(sample_from(other, start, *prompts_of(sd15), cfg=cfg, batch=2), together, 1e-5)


def test_injection_leaves_no_trace(sd15, sd15_content):
    _, start, trajectory = sd15_content
    before = sample_from(sd15.model, start, *prompts_of(sd15))
    injected = sample_from(inject(sd15.model, trajectory, clip=sd15.clip), start, *prompts_of(sd15))
    assert relative_error(injected, before) > 1e-3
    assert torch.equal(sample_from(sd15.model, start, *prompts_of(sd15)), before)


def test_a_recorded_source_replays_the_same_run(sd15, sd15_content):
    _, start, trajectory = sd15_content
    injected = inject(sd15.model, trajectory, clip=sd15.clip, cache_megabytes=64)
    unet = sd15.model.get_model_object("diffusion_model")
    batches = []
    hook = unet.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    try:
        first, second = (sample_from(injected, start, *prompts_of(sd15)) for _ in range(2))
    finally:
        hook.remove()
    assert batches.count(1) == 2  # the source ran for the 2 injected steps of the first run only
    assert_relative_close(second, first, 1e-6)
    uncached = sample_from(inject(sd15.model, trajectory, clip=sd15.clip), start, *prompts_of(sd15))
    assert_relative_close(first, uncached, 1e-6)


def test_chained_with_visual_style_prompting(sd15, sd15_content):
    _, start, trajectory = sd15_content
    with pytest.raises(ValueError, match="VisualStylePrompting would restyle output.4.0, output.5.0, which "
                                         "StyleInjection earlier in this chain already styles"):
        vsp(inject(sd15.model, trajectory, clip=sd15.clip))
    chained = vsp(inject(sd15.model, trajectory, clip=sd15.clip, attention_sites="custom",
                         custom_attention_sites="output.2, output.3"), layers="custom", custom_layers="output.4, output.5")
    starts = torch.cat([start, 0.8 * start])  # two images, so VSP's target differs from its reference
    alone = sample_from(inject(sd15.model, trajectory, clip=sd15.clip, attention_sites="custom",
                               custom_attention_sites="output.2, output.3"), starts, *prompts_of(sd15))
    both = sample_from(chained, starts, *prompts_of(sd15))
    assert relative_error(both, alone) > 1e-3  # VSP acted on top of the injection
    assert_relative_close(both[0], alone[0], 1e-6)  # batch item 0 is VSP's in-batch reference: only injected


def test_bad_inputs_are_named(sd15, sd15_content):
    _, start, trajectory = sd15_content
    with pytest.raises(ValueError, match=r"feature_fraction: 1.5 is outside \[0, 1\]"):
        inject(sd15.model, trajectory, clip=sd15.clip, feature_fraction=1.5)
    with pytest.raises(ValueError, match="custom_attention_sites: this model has no self-attention at output.0"):
        inject(sd15.model, trajectory, clip=sd15.clip, attention_sites="custom", custom_attention_sites="output.0")
    with pytest.raises(ValueError, match="custom_feature_sites: cannot read 'input.1'"):
        inject(sd15.model, trajectory, clip=sd15.clip, feature_sites="custom", custom_feature_sites="input.1")
    with pytest.raises(ValueError, match="is not in the inversion's schedule"):
        sample_from(inject(sd15.model, trajectory, clip=sd15.clip), start, *prompts_of(sd15), steps=6)
    bigger = torch.zeros(1, 4, 16, 16)
    with pytest.raises(ValueError, match="sample the content's inverted latent itself"):
        sample_from(inject(sd15.model, trajectory, clip=sd15.clip), bigger, *prompts_of(sd15))
    _, two = invert(sd15.model, torch.zeros(2, 4, 8, 8), *prompts_of(sd15), steps=2)
    with pytest.raises(ValueError, match="inversion: holds 2 images; the content is one image"):
        inject(sd15.model, two, clip=sd15.clip)
    assert sd15.model.object_patches == {}


@pytest.mark.parametrize("architecture", ["sd15", "sdxl"])
def test_parity_with_the_authors_injection_on_the_diffusers_twin(architecture):
    twins = twin_models(architecture, seed=1)
    prompts = random_prompts(twins, batch=2)
    source = random_prompts(twins, batch=1, seed=8)
    positive, negative = prompts.comfy_conditioning()
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(12))
    inverted, trajectory = invert(twins.comfy_model, latent, source.comfy_conditioning()[0],
                                  source.comfy_conditioning()[0], steps=STEPS, scheduler="ddim_uniform")
    injected = inject(twins.comfy_model, trajectory, conditioning=source.comfy_conditioning()[0],
                      feature_fraction=0.5, attention_fraction=0.75)
    ours = sample_from(injected, inverted["samples"], positive, negative, batch=2)

    schedule = reference_pnp.Schedule()
    hook = reference_pnp.install(twins.diffusers_unet, schedule)
    try:
        expected = reference_pnp.pnp_sample(twins.diffusers_unet, sd_scheduler(), schedule, trajectory, STEPS,
                                            prompts, source, 4.0, attention_steps=3, feature_steps=2)
    finally:
        hook.remove()
        twins.diffusers_unet.set_attn_processor(PlainProcessor())
    assert_relative_close(ours * scale_factor(twins), expected, TOLERANCE)
    plain = sample_from(twins.comfy_model, inverted["samples"], positive, negative, batch=2)
    assert relative_error(plain * scale_factor(twins), expected) > 100 * TOLERANCE


def record(models, trajectory, steps=STEPS, scheduler="ddim_uniform", fraction=1.0, max_megabytes=64, **sites):
    site_inputs = {"attention_sites": "plug_and_play", "custom_attention_sites": "", "feature_sites": "plug_and_play",
                   "custom_feature_sites": "", "cross_attention": False, **sites}
    (features,) = run_node("RecordContentFeatures", model=models.model, inversion=trajectory, steps=steps,
                           scheduler=scheduler, fraction=fraction, source_prompt="", max_megabytes=max_megabytes,
                           keep_on_cpu=True, clip=models.clip, **site_inputs)
    return features


def test_recorded_content_features_replay_the_source_branch(sd15, sd15_content, tmp_path):
    _, start, trajectory = sd15_content
    live = sample_from(inject(sd15.model, trajectory, clip=sd15.clip), start, *prompts_of(sd15))
    features = record(sd15, trajectory, fraction=0.6)
    assert len(features.store) == 2  # t = 751, 501: above t = 0.4 * 999, as StyleInjection's 0.6 acts
    unet = sd15.model.get_model_object("diffusion_model")
    batches = []
    hook = unet.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    try:
        replayed = sample_from(inject(sd15.model, content_features=features), start, *prompts_of(sd15))
    finally:
        hook.remove()
    assert batches == [2] * STEPS  # no source pass: the targets' calls only
    assert_relative_close(replayed, live, 1e-6)

    folder_paths.set_output_directory(str(tmp_path))
    run_node("SaveContentFeatures", content_features=features, filename_prefix="features/girl")
    assert [p.name for p in (tmp_path / "features").iterdir()] == ["girl_00001_.features.safetensors"]
    (loaded,) = run_node("LoadContentFeatures", content_features="features/girl_00001_.features.safetensors [output]")
    assert loaded.layers == features.layers and loaded.paths == features.paths
    assert torch.equal(sample_from(inject(sd15.model, content_features=loaded), start, *prompts_of(sd15)), replayed)


def test_recorded_features_say_what_they_lack(sd15, sd15_content):
    _, start, trajectory = sd15_content
    features = record(sd15, trajectory, fraction=0.3)  # t = 751 only
    with pytest.raises(ValueError, match="content_features: recorded at 3 attention, 0 cross-attention and 1 feature "
                                         "sites, not at output.2.0; record"):
        inject(sd15.model, content_features=features, attention_sites="decoder")
    with pytest.raises(ValueError, match="not at output.3.0 .cross., output.4.0 .cross."):
        inject(sd15.model, content_features=features, cross_attention=True)
    with pytest.raises(ValueError, match="no features recorded at sigma .*sample with the steps and scheduler"):
        sample_from(inject(sd15.model, content_features=features, feature_fraction=0.6), start, *prompts_of(sd15))
    with pytest.raises(ValueError, match="inversion / content_features: connect exactly one"):
        inject(sd15.model, trajectory, clip=sd15.clip, content_features=features)
    _, _, large = content(sd15, size=64, steps=2)  # 4 MB a step
    with pytest.raises(ValueError, match="max_megabytes: 1 MB hold 0 of the schedule's recordings .each about 4.0 MB"):
        record(sd15, large, steps=2, max_megabytes=1)
    with pytest.raises(ValueError, match="is not in the inversion's schedule"):
        record(sd15, trajectory, steps=6)


def test_a_finer_inversion_samples_from_its_latent_at_the_schedules_first_sigma():
    import random_models

    models = tamed(random_models.tiny_sd15(seed=5))
    latent, _, fine = content(models, steps=20)  # ddim_uniform t = 1, 51, ..., 951 holds 4 steps' 1, 251, 501, 751
    (start,) = run_node("InversionLatent", inversion=fine, model=models.model, steps=STEPS, scheduler="ddim_uniform")
    sigma = float(models.model.get_model_object("model_sampling").sigma(torch.tensor(751.0)))
    scale = models.model.get_model_object("latent_format").scale_factor
    assert torch.equal(start["samples"], fine.latent_at(sigma) / scale)
    empty = encode(models.clip, "")
    reconstruction = sample_from(models.model, start["samples"], empty, empty, cfg=1.0)
    assert relative_error(reconstruction, latent) < 0.1  # 4 coarse steps back down a 20-step inversion
    styled = sample_from(inject(models.model, fine, clip=models.clip), start["samples"], *prompts_of(models))
    assert relative_error(styled, reconstruction) > 1e-3
    with pytest.raises(ValueError, match="is not in the inversion's schedule"):
        run_node("InversionLatent", inversion=fine, model=models.model, steps=3, scheduler="ddim_uniform")


def test_cross_attention_injection_is_an_option_that_follows_the_same_formula(sd15, sd15_content):
    _, start, trajectory = sd15_content
    assert "attn2" not in inject(sd15.model, trajectory, clip=sd15.clip).model_options["transformer_options"][
        "patches_replace"]
    injected = inject(sd15.model, trajectory, clip=sd15.clip, attention_fraction=1.0, cross_attention=True)
    assert sorted(injected.model_options["transformer_options"]["patches_replace"]["attn2"]) == [
        ("output", 3, 0), ("output", 4, 0), ("output", 5, 0)]
    heads = sd15.model.get_model_object("diffusion_model").output_blocks[4][1].transformer_blocks[0].attn2.heads
    model_sampling = sd15.model.get_model_object("model_sampling")
    with record_attention(sd15.model, ("output", 4, 0), which="attn2") as calls:
        out = sample_from(injected, start, *prompts_of(sd15))
    for step in range(STEPS):
        source, target = calls[2 * step], calls[2 * step + 1]
        sigma = float(trajectory.sigmas.flip(0)[step])
        rate = min(1.0, 2 * float(model_sampling.timestep(torch.tensor(sigma))) / 1000)
        q = rate * source["q"] + (1 - rate) * target["q"]
        k = rate * source["k"] + (1 - rate) * target["k"]  # the source prompt's keys
        assert_relative_close(target["out"], attention_by_hand(q, k, target["v"], heads), 1e-5)
    without = sample_from(inject(sd15.model, trajectory, clip=sd15.clip, attention_fraction=1.0), start, *prompts_of(sd15))
    assert relative_error(out, without) > 1e-4
    features = record(sd15, trajectory, cross_attention=True)
    replayed = sample_from(inject(sd15.model, content_features=features, attention_fraction=1.0, cross_attention=True),
                           start, *prompts_of(sd15))
    assert_relative_close(replayed, out, 1e-6)


def test_a_lora_on_the_injected_resblocks_own_layer_still_applies(sd15, sd15_content):
    """The stand-in at a ResBlock's residual branch keeps the layer at its own path, so a LoRA (LoCon)
    patching that very convolution is still loaded with the model."""
    _, start, trajectory = sd15_content
    path = "diffusion_model.output_blocks.4.0.out_layers.3.weight"
    weight = sd15.model.model.state_dict()[path]
    lora = sd15.model.clone()
    lora.add_patches({path: ("diff", (torch.randn_like(weight) * 0.5,))})
    assert relative_error(sample_from(lora, start, *prompts_of(sd15)), sample_from(sd15.model, start, *prompts_of(sd15))) > 1e-3
    injected = [sample_from(inject(m, trajectory, clip=sd15.clip, feature_fraction=0.3, attention_fraction=0.0), start,
                            *prompts_of(sd15)) for m in (sd15.model, lora)]
    assert relative_error(injected[1], injected[0]) > 1e-3
