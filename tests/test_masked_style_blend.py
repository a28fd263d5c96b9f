"""MaskedStyleBlend (DiffStyler eq. 7): each styled model predicts its mask's region of one latent,
the base model the rest, with one copy of the UNet (LoRAs as low-rank deltas in their branch)."""

import pytest
import torch

import comfy.lora
import comfy.patcher_extension
import comfy.sample
from conftest import pack_submodule
from helpers import (assert_relative_close, encode, latent_reference, relative_error, run_node, vsp,
                     with_separate_cond_batches)
from oracles import masked as reference_masked
from oracles.models import twin_models
from oracles.sampling import ddim_sample, sd_scheduler, sigma_of_timestep
from support.injection import content, inject, sample_from
from support.parity import TOLERANCE, comfy_sample, random_prompts, scale_factor, start_noise
from support.reference_cache import reference_pass_of

glue_lora = pack_submodule("glue.lora_fit")
branch_weights = pack_submodule("glue.branch_weights")
glue_stand_ins = pack_submodule("glue.stand_ins")

SIZE = 8  # latent; the image (and its masks) are 64 x 64


def random_lora(model, seed, rank=2, scale=0.3, pattern=("attn1_to_q", "attn2_to_v", "in_layers_2")):
    """A LoRA file's tensors (kohya names) on some attention projections and ResBlock convolutions."""
    generator = torch.Generator().manual_seed(seed)
    names = comfy.lora.model_lora_keys_unet(model.model, {})
    state = model.model.state_dict()
    tensors = {}
    for name, key in names.items():
        if not (isinstance(key, str) and name.startswith("lora_unet_") and any(p in name for p in pattern)):
            continue
        weight = state[key]
        out_features, in_shape = weight.shape[0], weight.shape[1:]
        down_shape = (rank, *in_shape)
        up_shape = (out_features, rank) + ((1, 1) if weight.ndim == 4 else ())
        tensors[f"{name}.lora_down.weight"] = torch.randn(down_shape, generator=generator) * scale
        tensors[f"{name}.lora_up.weight"] = torch.randn(up_shape, generator=generator) * scale
        tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    assert any(".in_layers_2." in k or "in_layers_2" in k for k in tensors) and len(tensors) > 6
    return tensors


def with_lora(models, seed):
    return glue_lora.with_lora(models.model, random_lora(models.model, seed))


def blend(model, *pairs, mask_edges="coverage"):
    inputs = {}
    for index, (styled, mask) in enumerate(pairs, start=1):
        inputs[f"styled_model_{index}"], inputs[f"mask_{index}"] = styled, mask
    (blended,) = run_node("MaskedStyleBlend", model=model, mask_edges=mask_edges, **inputs)
    return blended


def region(top, bottom, left, right, batch=1):
    """A hard MASK at image size, aligned to latent pixels (rows/columns in latent pixels)."""
    mask = torch.zeros(batch, SIZE * 8, SIZE * 8)
    mask[:, top * 8:bottom * 8, left * 8:right * 8] = 1.0
    return mask


def latent_region(mask):
    return mask[:, None, ::8, ::8].expand(-1, 4, -1, -1).bool()


def run(model, positive, negative, steps=1, cfg=4.0, batch=1, seed=3):
    latent = torch.zeros(batch, 4, SIZE, SIZE)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", positive, negative, latent, seed=seed,
                               disable_pbar=True)


def prompts(models):
    return encode(models.clip, "a house by a lake"), encode(models.clip, "")


@pytest.fixture(scope="module")
def lora_branch(sd15):
    return with_lora(sd15, seed=1)


def test_one_step_takes_each_region_from_its_branch(models):
    positive, negative = prompts(models)
    lora = with_lora(models, seed=1)
    styled = vsp(models.model, latent_reference(models))
    left, top_right = region(0, SIZE, 0, 4), region(0, 4, 4, SIZE)
    result = run(blend(models.model, (lora, left), (styled, top_right)), positive, negative)
    base, lora_alone, styled_alone = (run(m, positive, negative) for m in (models.model, lora, styled))
    inside_lora, inside_styled = latent_region(left), latent_region(top_right)
    outside = ~(inside_lora | inside_styled)
    assert outside.any() and torch.equal(result[outside], base[outside])
    assert torch.equal(result[inside_styled], styled_alone[inside_styled])  # same weights: bit for bit
    # the LoRA as a low-rank delta (W x + B A x) against its weights merged (W + B A) x: rounding only
    assert relative_error(result[inside_lora], lora_alone[inside_lora]) < 1e-5
    assert relative_error(lora_alone[inside_lora], base[inside_lora]) > 1e-2  # the LoRA matters
    assert relative_error(styled_alone[inside_styled], base[inside_styled]) > 1e-3


def test_masks_off_everywhere_are_the_base_and_on_everywhere_the_branch_over_a_whole_run(sd15, lora_branch):
    positive, negative = prompts(sd15)
    styled = vsp(sd15.model, latent_reference(sd15))
    nowhere, everywhere = torch.zeros(1, SIZE * 8, SIZE * 8), torch.ones(1, SIZE * 8, SIZE * 8)
    base = run(sd15.model, positive, negative, steps=3)
    assert torch.equal(run(blend(sd15.model, (lora_branch, nowhere), (styled, nowhere)), positive, negative, steps=3),
                       base)
    assert torch.equal(run(blend(sd15.model, (lora_branch, nowhere), (styled, everywhere)), positive, negative, steps=3),
                       run(styled, positive, negative, steps=3))
    lora_everywhere = run(blend(sd15.model, (lora_branch, everywhere)), positive, negative, steps=3)
    assert relative_error(lora_everywhere, run(lora_branch, positive, negative, steps=3)) < 1e-5
    # the branch's style node releases its last step's reference features when the blend's run ends
    run(blend(sd15.model, (styled, everywhere)), positive, negative, steps=1)
    assert reference_pass_of(styled).memory.features is None


def test_soft_masks_composite_in_order_and_the_last_wins_where_hard_masks_overlap(sd15, lora_branch):
    positive, negative = prompts(sd15)
    styled = vsp(sd15.model, latent_reference(sd15))
    ramp = torch.linspace(0, 1, SIZE * 8).expand(1, SIZE * 8, -1).contiguous()  # soft, left to right
    everywhere = torch.ones(1, SIZE * 8, SIZE * 8)
    base, lora_alone, styled_alone = (run(m, positive, negative) for m in (sd15.model, lora_branch, styled))
    weight = torch.nn.functional.avg_pool2d(ramp[:, None], 8)  # the latent pixel's coverage
    soft = run(blend(sd15.model, (lora_branch, ramp)), positive, negative)
    # one Euler step is affine in the prediction, so the sample composites as the predictions do
    assert relative_error(soft, base * (1 - weight) + lora_alone * weight) < 1e-5
    assert torch.equal(run(blend(sd15.model, (lora_branch, everywhere), (styled, everywhere)), positive, negative),
                       styled_alone)
    both = run(blend(sd15.model, (lora_branch, ramp), (styled, region(0, SIZE, 0, 4))), positive, negative)
    expected = (base * (1 - weight) + lora_alone * weight)
    expected[latent_region(region(0, SIZE, 0, 4))] = styled_alone[latent_region(region(0, SIZE, 0, 4))]
    assert relative_error(both, expected) < 1e-5


@pytest.mark.parametrize("own_prompt", ["a watercolour of a fox", ", ".join(["an oil painting"] * 30)])
def test_a_branch_with_its_own_prompt_runs_as_if_sampled_with_it(sd15, lora_branch, own_prompt):
    """The authors give each LoRA its fitted prompt; a prompt past 77 tokens is repeated to a common
    length with the others, as ComfyUI batches prompts."""
    positive, negative = prompts(sd15)
    own = encode(sd15.clip, own_prompt)
    everywhere = torch.ones(1, SIZE * 8, SIZE * 8)
    (blended,) = run_node("MaskedStyleBlend", model=sd15.model, mask_edges="coverage", styled_model_1=lora_branch,
                          mask_1=everywhere, positive_1=own)
    result = run(blended, positive, negative)
    assert relative_error(result, run(lora_branch, own, negative)) < 1e-5
    assert relative_error(result, run(lora_branch, positive, negative)) > 1e-3


def test_the_authors_edge_rule_keeps_every_touched_latent_pixel(sd15, lora_branch):
    positive, negative = prompts(sd15)
    sliver = torch.zeros(1, SIZE * 8, SIZE * 8)
    sliver[:, :, 3] = 1.0  # one image column: 1/8 of latent column 0
    base, lora_alone = run(sd15.model, positive, negative), run(lora_branch, positive, negative)
    touched = run(blend(sd15.model, (lora_branch, sliver), mask_edges="any"), positive, negative)
    assert relative_error(touched[..., 0], lora_alone[..., 0]) < 1e-5 and torch.equal(touched[..., 1:], base[..., 1:])
    covered = run(blend(sd15.model, (lora_branch, sliver)), positive, negative)
    assert relative_error(covered[..., 0], base[..., 0] * 7 / 8 + lora_alone[..., 0] / 8) < 1e-5


@pytest.mark.parametrize("layout", ["separate", "reversed", "cfg1"])
def test_per_image_masks_in_every_cond_uncond_layout(sd15, lora_branch, layout):
    positive, negative = prompts(sd15)
    masks = torch.stack([torch.ones(SIZE * 8, SIZE * 8), torch.zeros(SIZE * 8, SIZE * 8)])  # image 0 styled
    cfg = 1.0 if layout == "cfg1" else 4.0

    def arranged(model):
        return model if layout == "cfg1" else with_separate_cond_batches(model, reverse=layout == "reversed")

    result = run(arranged(blend(sd15.model, (lora_branch, masks))), positive, negative, cfg=cfg, batch=2)
    base = run(arranged(sd15.model), positive, negative, cfg=cfg, batch=2)
    lora_alone = run(arranged(lora_branch), positive, negative, cfg=cfg, batch=2)
    assert torch.equal(result[1], base[1]) and relative_error(result[0], lora_alone[0]) < 1e-5


def test_two_styles_with_content_injection_share_the_injected_layers(sd15):
    """DiffStyler's setting: the plain model with the content injected everywhere, two LoRA styles
    each with the same injection in their region (the same ResBlocks stand in for all three)."""
    _, start, trajectory = content(sd15, size=SIZE)
    positive, negative = encode(sd15.clip, "a dog"), encode(sd15.clip, "")
    base = inject(sd15.model, trajectory, clip=sd15.clip)
    styles = [inject(with_lora(sd15, seed), trajectory, clip=sd15.clip) for seed in (1, 2)]
    left, right = region(0, SIZE, 0, 3), region(0, SIZE, 5, SIZE)
    blended = blend(base, (styles[0], left), (styles[1], right))
    result = sample_from(blended, start, positive, negative, steps=1)
    alone = [sample_from(m, start, positive, negative, steps=1) for m in (base, *styles)]
    middle = ~(latent_region(left) | latent_region(right))
    assert torch.equal(result[middle], alone[0][middle])
    for style, mask in zip(alone[1:], (left, right)):
        assert relative_error(result[latent_region(mask)], style[latent_region(mask)]) < 1e-5
        assert relative_error(style[latent_region(mask)], alone[0][latent_region(mask)]) > 1e-3
    multi = sample_from(blended, start, positive, negative)  # the whole schedule runs
    assert torch.isfinite(multi).all()


def test_n_styles_cost_n_plus_one_evaluations_per_step(sd15, lora_branch):
    positive, negative = prompts(sd15)
    calls = []

    def counted(model):
        clone = model.clone()
        clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test_count",
                                   lambda executor, *args, **kwargs: calls.append(1) or executor(*args, **kwargs))
        return clone

    base, style, other = counted(sd15.model), counted(lora_branch), counted(with_lora(sd15, seed=2))
    run(base, positive, negative, steps=2)
    plain_calls = len(calls)
    calls.clear()
    run(blend(base, (style, region(0, SIZE, 0, 4)), (other, region(0, SIZE, 4, SIZE))), positive, negative, steps=2)
    assert plain_calls == 2 and len(calls) == 3 * plain_calls  # cond and uncond batched: one call per branch


def test_one_copy_of_the_unet_and_no_trace_after(sd15, lora_branch):
    positive, negative = prompts(sd15)
    before = run(sd15.model, positive, negative, steps=2), run(lora_branch, positive, negative, steps=2)
    blended = blend(sd15.model, (lora_branch, region(0, SIZE, 0, 4)))
    stand_ins = {path: patch for path, patch in blended.object_patches.items()
                 if isinstance(patch, glue_stand_ins.StandIn)}
    assert stand_ins
    lora_bytes = sum(t.numel() * t.element_size() for patches in lora_branch.patches.values() for patch in patches
                     for t in patch[1].weights[:2])
    assert all(isinstance(b, branch_weights.BranchDeltas) for p in stand_ins.values() for b in p.stand_in_behaviours)
    assert sum(branch_weights.delta_bytes(b.deltas) for p in stand_ins.values() for b in p.stand_in_behaviours) \
        == lora_bytes
    for path, stand_in in stand_ins.items():  # the base's own parameters, not copies
        layer = sd15.model.get_model_object(path)
        assert stand_in.weight is layer.weight and type(layer) is not type(stand_in)
    run(blended, positive, negative, steps=2)
    after = run(sd15.model, positive, negative, steps=2), run(lora_branch, positive, negative, steps=2)
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])
    assert not any(isinstance(m, glue_stand_ins.StandIn) for m in sd15.model.model.modules())


def test_bad_inputs_are_named(sd15, sdxl, lora_branch):
    positive, negative = prompts(sd15)
    mask = region(0, SIZE, 0, 4)
    with pytest.raises(ValueError, match="styled_model_1: this model is not the base model's UNet"):
        blend(sd15.model, (sdxl.model, mask))
    with pytest.raises(ValueError, match="mask_2: connect it too"):
        run_node("MaskedStyleBlend", model=sd15.model, mask_edges="coverage", styled_model_1=lora_branch, mask_1=mask,
                 styled_model_2=lora_branch)
    with pytest.raises(ValueError, match="positive_2: connect styled_model_2 and mask_2 too"):
        run_node("MaskedStyleBlend", model=sd15.model, mask_edges="coverage", styled_model_1=lora_branch, mask_1=mask,
                 positive_2=positive)
    with pytest.raises(ValueError, match="at least one styled model"):
        run_node("MaskedStyleBlend", model=sd15.model, mask_edges="coverage")
    with pytest.raises(ValueError, match=r"mask_1 is 40x64 pixels; the latent is 8x8"):
        run(blend(sd15.model, (lora_branch, torch.ones(1, 40, 64))), positive, negative)
    with pytest.raises(ValueError, match="mask_1 holds 3 masks for a batch of 2 latents"):
        run(blend(sd15.model, (lora_branch, torch.ones(3, 64, 64))), positive, negative, batch=2)
    cropped = run(blend(sd15.model, (lora_branch, torch.zeros(1, 70, 71))), positive, negative)  # VAE Encode's crop
    assert torch.equal(cropped, run(sd15.model, positive, negative))
    full = {k: torch.randn_like(v) for k, v in list(sd15.model.model.state_dict().items())[:1]}
    other = sd15.model.clone()
    other.add_patches({key: ("diff", (value,)) for key, value in full.items()})
    with pytest.raises(ValueError, match=r"styled_model_1: the patch at .* \(diff\) is not a plain LoRA"):
        blend(sd15.model, (other, mask))
    sampling = sd15.model.clone()  # another node's object patch on a branch would act everywhere: refused
    sampling.add_object_patch("model_sampling", sd15.model.get_model_object("model_sampling"))
    with pytest.raises(ValueError, match="styled_model_1: its model replaces model_sampling"):
        blend(sd15.model, (sampling, mask))
    guided = vsp(sd15.model, nvqg_weight=1.0)  # a branch's own guidance would be lost: refused
    with pytest.raises(ValueError, match=r"styled_model_1: its model adds a post-CFG function \(NegativeVisualQuery"):
        blend(sd15.model, (guided, mask))
    blend(guided, (vsp(guided, layers="custom", custom_layers="input.1"), mask))  # the base's own is kept
    assert torch.equal(run(sd15.model, positive, negative), run(sd15.model, positive, negative))


def test_a_conv_lora_on_a_layer_content_injection_stands_in_for_applies_in_its_branch(sd15):
    _, start, trajectory = content(sd15, size=SIZE)
    positive, negative = encode(sd15.clip, "a dog"), encode(sd15.clip, "")
    path = "diffusion_model.output_blocks.4.0.out_layers.3.weight"  # Style Injection's default feature site
    weight = sd15.model.model.state_dict()[path]
    generator = torch.Generator().manual_seed(3)
    locon = {"lora_unet_output_blocks_4_0_out_layers_3.lora_down.weight": torch.randn(2, *weight.shape[1:], generator=generator),
             "lora_unet_output_blocks_4_0_out_layers_3.lora_up.weight": torch.randn(weight.shape[0], 2, 1, 1, generator=generator),
             "lora_unet_output_blocks_4_0_out_layers_3.alpha": torch.tensor(2.0)}
    style = inject(glue_lora.with_lora(sd15.model, locon), trajectory, clip=sd15.clip, feature_fraction=0.3)
    base = inject(sd15.model, trajectory, clip=sd15.clip, feature_fraction=0.3)
    everywhere = torch.ones(1, SIZE * 8, SIZE * 8)
    result = sample_from(blend(base, (style, everywhere)), start, positive, negative)
    alone = sample_from(style, start, positive, negative)
    assert relative_error(result, alone) < 1e-5
    assert relative_error(alone, sample_from(base, start, positive, negative)) > 1e-3


def twin_lora(twins, seed, rank=2, scale=0.5):
    """The same random LoRA for both twins: kohya names from the diffusers module names (which ComfyUI
    maps to its own), on the self-attention queries and cross-attention values."""
    generator = torch.Generator().manual_seed(seed)
    tensors, merged = {}, {}
    for name, module in twins.diffusers_unet.named_modules():
        if name.endswith(("attn1.to_q", "attn2.to_v")):
            down = torch.randn(rank, module.in_features, generator=generator) * scale
            up = torch.randn(module.out_features, rank, generator=generator) * scale
            kohya = "lora_unet_" + name.replace(".", "_")
            tensors.update({f"{kohya}.lora_down.weight": down, f"{kohya}.lora_up.weight": up,
                            f"{kohya}.alpha": torch.tensor(float(rank))})
            merged[name] = (up, down, 1.0)
    return tensors, merged


@pytest.mark.parametrize("architecture", ["sd15", "sdxl"])
def test_parity_with_the_authors_mask_wise_sampling_on_the_diffusers_twin(architecture):
    twins = twin_models(architecture, seed=1)
    prompts = random_prompts(twins, batch=1)
    noise = start_noise(1)
    loras = [twin_lora(twins, seed) for seed in (1, 2)]
    styled = [glue_lora.with_lora(twins.comfy_model, tensors) for tensors, _ in loras]
    left, right = torch.zeros(SIZE, SIZE, dtype=torch.bool), torch.zeros(SIZE, SIZE, dtype=torch.bool)
    left[:, :3], right[:, 4:] = True, True
    image_mask = [m.repeat_interleave(8, 0).repeat_interleave(8, 1)[None].float() for m in (left, right)]
    blended = blend(twins.comfy_model, (styled[0], image_mask[0]), (styled[1], image_mask[1]))
    ours = comfy_sample(blended, prompts, 4, 4.0, noise)
    scheduler = sd_scheduler()
    scheduler.set_timesteps(4)
    start = noise * sigma_of_timestep(scheduler, int(scheduler.timesteps[0]))
    unets = [reference_masked.with_merged_lora(twins.diffusers_unet, merged) for _, merged in loras]
    expected = reference_masked.masked_ddim_sample(twins.diffusers_unet, unets, [left, right], scheduler, start, 4,
                                                   prompts, 4.0)
    assert_relative_close(ours * scale_factor(twins), expected, TOLERANCE)
    plain = ddim_sample(twins.diffusers_unet, sd_scheduler(), start, 4, prompts, 4.0)
    assert relative_error(plain, expected) > 100 * TOLERANCE
