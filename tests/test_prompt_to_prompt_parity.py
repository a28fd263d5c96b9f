"""Fidelity of StyleDiffusion's prompt-to-prompt edit (issue 16): the pack's edit (glue/prompt_to_prompt.py
edit_model + run_edit, through ComfyUI's sampler and model patcher) against the independent diffusers
processors of tests/oracles/prompt_to_prompt.py, on the twin UNets' shared random weights.

The style inversion is built by hand (random top latent, scales around 1, shifts around 0) on the
ddim_uniform schedule, and the token alignment is refine-like with reweighting: A and b both count.
The taus put every control on in some step and off in a later one. Self-attention maps are swapped
below the finest attention level (the authors' <= 32x32 queries at 512 px on SD1.5; on SDXL its
coarser level only).
"""

import pytest
import torch

import comfy.ldm.modules.attention
from conftest import pack_submodule
from helpers import assert_relative_close, relative_error
from oracles import prompt_to_prompt as reference
from oracles.attention import PlainProcessor
from oracles.models import twin_models
from oracles.sampling import Prompts, ddim_sample, sd_scheduler
from support.parity import TOLERANCE, scale_factor

p2p = pack_submodule("attention_patches.prompt_to_prompt")
glue = pack_submodule("glue.prompt_to_prompt")
attention = pack_submodule("attention_patches.attention")
value_inversion = pack_submodule("glue.value_inversion")
lora_fit = pack_submodule("glue.lora_fit")
style_inversion = pack_submodule("inversion.style_inversion")
ddim = pack_submodule("inversion.ddim")
architectures = pack_submodule("glue.architectures")
owners = pack_submodule("nodes.style_inputs")

STEPS, CFG, SIZE, TOKENS = 4, 7.5, 8, 77
# at 4 steps: target values i < 1, cross i < int(0.6 * 5) = 3, self i < 3, uncond self i < 2 (at step 0
# the uncond rows are equal, source and target start from one latent: tau_u must last past it to count)
TAUS = {"tau_v": 0.25, "tau_c": 0.6, "tau_s": 0.75, "tau_u": 0.5}


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def twins(request):
    twins = twin_models(request.param, seed=1)
    yield twins
    twins.diffusers_unet.set_attn_processor(PlainProcessor())


def refine_alignment(seed=7):
    """A refine-like alignment with reweighting (the authors' AttentionRefine inside AttentionReweight):
    target token j takes source token mapper[j] with weight alpha_j w_j and keeps its own map with
    (1 - alpha_j) w_j; two inserted words (alpha 0), one partly kept, and reweighted words."""
    mapper = torch.arange(TOKENS)
    mapper[5:] -= 2  # two words inserted at 3 and 4: later tokens shift by two
    mapper[3:5] = 0
    alphas = torch.ones(TOKENS)
    alphas[3:5] = 0.0
    alphas[6] = 0.5
    weights = torch.ones(TOKENS)
    weights[[2, 4, 7]] = torch.tensor([2.0, 1.5, 0.5])
    weights[8:] = 1 + 0.2 * torch.rand(TOKENS - 8, generator=torch.Generator().manual_seed(seed))
    select = torch.zeros(TOKENS, TOKENS)
    select[mapper, torch.arange(TOKENS)] = 1.0
    return select * (alphas * weights)[None, :], (1 - alphas) * weights


def hand_made_inversion(twins, seed=5):
    channels = twins.context_dim
    sigmas = value_inversion.inversion_sigmas(twins.comfy_model, "ddim_uniform", STEPS)
    assert len(sigmas) == STEPS + 1
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(STEPS + 1, 1, 4, SIZE, SIZE, generator=g) * (1 + sigmas**2).sqrt().view(-1, 1, 1, 1, 1)
    scales = 1 + 0.5 * torch.randn(STEPS, TOKENS, channels, generator=g)
    shifts = 0.5 * torch.randn(STEPS, TOKENS, channels, generator=g)
    settings = {"steps": STEPS, "scheduler": "ddim_uniform", "guidance": CFG, "prediction": "eps"}
    return style_inversion.StyleInversion(trajectory=ddim.InversionTrajectory(sigmas, latents), scales=scales,
                                          shifts=shifts, source_prompt="a photo", settings=settings)


def pair_prompts(twins, seed=2) -> Prompts:
    """Source and target prompts (random embeddings), one uncond row repeated for both."""
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(2, TOKENS, twins.context_dim, generator=g)
    uncond = torch.randn(1, TOKENS, twins.context_dim, generator=g).expand(2, -1, -1)
    pooled = (lambda rows: torch.randn(rows, twins.pooled_dim, generator=g)) if twins.pooled_dim else (lambda _: None)
    pooled_cond, pooled_uncond = pooled(2), pooled(1)
    return Prompts(cond, uncond.clone(), pooled_cond, None if pooled_uncond is None else pooled_uncond.expand(2, -1))


def comfy_conditioning(prompts: Prompts):
    """(positive pair, negative single row), with SDXL's size conditioning for the latent."""

    def entry(embeddings, pooled):
        conditioning = [[embeddings, {} if pooled is None else {"pooled_output": pooled}]]
        return lora_fit.with_size(conditioning, SIZE * 8, SIZE * 8)

    pooled_uncond = None if prompts.pooled_uncond is None else prompts.pooled_uncond[:1]
    return entry(prompts.cond, prompts.pooled_cond), entry(prompts.uncond[:1], pooled_uncond)


def ours(twins, inversion, prompts, source_map, own, taus=TAUS):
    model = twins.comfy_model
    kernel = attention.KernelAttention.of(comfy.ldm.modules.attention.optimized_attention)
    patched, _ = glue.edit_model(model, inversion, p2p.EditSchedule(STEPS, **taus),
                                 p2p.CrossAttentionEdit(source_map, own), list(architectures.adapter_for(model, "test").sites),
                                 owners.new_owner("test"), kernel)
    positive, negative = comfy_conditioning(prompts)
    out = glue.run_edit(patched, inversion, positive, negative, None, None, model.model.latent_format)
    return out * scale_factor(twins)  # VAE space -> model space; x0 is the same latent for diffusers


def independent(twins, inversion, prompts, source_map, own, taus=TAUS):
    unet = twins.diffusers_unet
    control = reference.EditControl(STEPS, **taus, source_map=source_map, own=own, scales=inversion.scales,
                                    shifts=inversion.shifts,
                                    largest_self_queries=reference.largest_self_attention_queries(unet, SIZE, SIZE))
    try:
        return reference.edit_sample(unet, control, inversion.trajectory.top, prompts, CFG)
    finally:
        unet.set_attn_processor(PlainProcessor())



@pytest.mark.parametrize("twins", ["sd15", "sdxl"], indirect=True)
def test_the_edit_matches_the_authors_controller_written_as_diffusers_processors(twins):
    inversion, prompts = hand_made_inversion(twins), pair_prompts(twins)
    source_map, own = refine_alignment()
    expected = independent(twins, inversion, prompts, source_map, own)
    assert_relative_close(ours(twins, inversion, prompts, source_map, own), expected, TOLERANCE)


def test_the_parity_test_can_fail_plain_sampling_and_each_control_left_out_land_far_away(twins):
    """On the twins the smallest part (tau_u) moves the result by ~3e-3: 30 times the tolerance."""
    inversion, prompts = hand_made_inversion(twins), pair_prompts(twins)
    source_map, own = refine_alignment()
    expected = independent(twins, inversion, prompts, source_map, own)
    plain = ddim_sample(twins.diffusers_unet, sd_scheduler(), inversion.trajectory.top.expand(2, -1, -1, -1), STEPS,
                        prompts, CFG)
    assert relative_error(plain, expected) > 100 * TOLERANCE
    without_own = relative_error(independent(twins, inversion, prompts, source_map, None), expected)
    assert without_own > 20 * TOLERANCE, f"b = 0 changes the edit by only {without_own:.1e}"
    for tau in TAUS:
        error = relative_error(independent(twins, inversion, prompts, source_map, own, {**TAUS, tau: 0.0}), expected)
        assert error > 20 * TOLERANCE, f"{tau} = 0 changes the edit by only {error:.1e}"
