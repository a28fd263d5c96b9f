"""Fidelity of Combine Style References: Visual Style Prompting and StyleAligned with two external references
of weights 1.4 and 0.6 (of different latent sizes), sampled through ComfyUI, against independent diffusers
implementations (tests/oracles/reference_sets.py) on the same random weights: the SD1.5- and SDXL-shaped UNet
twins (4 DDIM/euler steps, cfg 4; StyleAligned with AdaIN of the values, a score shift of 0.693 and the shared
GroupNorm) and the Flux twin (4 euler steps, cfg 4; Stable Flow's swap, AlignedGen with the shared keys one
target width to the right and a style factor of 1.1). Each reference runs alone, with its own latent, noise
and prompt, before each call of the targets. Each test also checks that the set is far from its first
reference alone, so the parity says something about the second reference and the weights."""

import contextlib

import pytest
import torch

import comfy.sample
import comfy.samplers
import random_dits
from helpers import assert_relative_close, relative_error, run_node, style_aligned, vsp
from oracles import reference_sets as oracle
from oracles.attention import PlainProcessor
from oracles.flux_style import record_reference
from oracles.sampling import unet_eps
from support.flux import conditioning, flux_noise, flux_sample
from support.flux_twin import twin_denoise, twin_from_comfy
from support.parity import (SIZE, TOLERANCE, all_self_attention, comfy_sample, random_prompts, reference_sample,
                            scale_factor, start_noise)
from support.parity import twins  # noqa: F401 (a fixture)

WEIGHTS = (1.4, 0.6)  # not summing to 1: a shared GroupNorm then counts the set as sum w_i n_i positions
STEPS, CFG = 4, 4.0


def combine(references, weights=WEIGHTS):
    inputs = {}
    for number, (reference, weight) in enumerate(zip(references, weights), start=1):
        inputs[f"reference_{number}"], inputs[f"weight_{number}"] = reference, weight
    (combined,) = run_node("CombineStyleReferences", **inputs)
    return combined


# --------------------------------------------------------------------------------------------- UNet twins


class UNetReference:
    """A reference latent of its own size with its own prompt, as the ComfyUI node takes it and as the oracle
    runs it alone (forward-noised with the node's seed, DDIM's add_noise on the diffusers side)."""

    def __init__(self, twins, prompt_seed, latent_seed, reference_seed, size):
        self.twins, self.reference_seed, self.size = twins, reference_seed, size
        self.prompts = random_prompts(twins, batch=1, seed=prompt_seed)
        self.latent = torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(latent_seed))
        (self.node_output,) = run_node("StyleReferenceLatent", latent={"samples": self.latent}, clip=None, prompt="",
                                       reference_seed=reference_seed, cache_megabytes=2048, cache_on_cpu=False,
                                       conditioning=self.prompts.comfy_conditioning()[0])

    def run_alone(self, scheduler, references: oracle.ReferenceSet, index):
        noise = comfy.sample.prepare_noise(self.latent, self.reference_seed)
        clean = self.latent * scale_factor(self.twins)

        def run(timestep):
            references.recording = index
            try:
                noisy = scheduler.add_noise(clean, noise, torch.tensor([int(timestep)]))
                unet_eps(self.twins.diffusers_unet, noisy, timestep, self.prompts.cond, self.prompts.pooled_cond,
                         self.size, self.size)
            finally:
                references.recording = None

        return run


def unet_references(twins):
    return (UNetReference(twins, prompt_seed=5, latent_seed=6, reference_seed=9, size=SIZE),
            UNetReference(twins, prompt_seed=7, latent_seed=8, reference_seed=4, size=12))


def each_alone_before_each_call(cases, references):
    """reference_sample's before_call: every reference's own pass, in order, before each call of the targets."""
    def before_call(scheduler):
        runs = [case.run_alone(scheduler, references, index) for index, case in enumerate(cases)]

        def hook(timestep):
            for run in runs:
                run(timestep)

        return hook

    return before_call


@pytest.fixture(autouse=True)
def plain_diffusers_processors(request):
    if "twins" in request.fixturenames:
        request.getfixturevalue("twins").diffusers_unet.set_attn_processor(PlainProcessor())


def check_unet(twins, node, install, shared_norms=False):
    """node(model, reference) on ComfyUI, recorded then replayed from the cache, against the oracle (install puts
    its processors on the twin for a ReferenceSet); and the set far from the first reference alone."""
    prompts, noise = random_prompts(twins, batch=2), start_noise(2)
    cases = unet_references(twins)
    styled = node(twins.comfy_model, combine([case.node_output for case in cases]))
    recorded, replayed = (comfy_sample(styled, prompts, STEPS, CFG, noise) for _ in range(2))
    alone = comfy_sample(node(twins.comfy_model, cases[0].node_output), prompts, STEPS, CFG, noise)

    unet = twins.diffusers_unet
    references = oracle.ReferenceSet(WEIGHTS)
    install(unet, references)
    with oracle.shared_group_norms(unet, references) if shared_norms else contextlib.nullcontext():
        expected = reference_sample(twins, prompts, noise, each_alone_before_each_call(cases, references))
    errors = [relative_error(out * scale_factor(twins), expected) for out in (recorded, replayed)]
    distance = relative_error(alone * scale_factor(twins), expected)
    print(f"{twins.architecture}: relative error recorded {errors[0]:.2e}, replayed {errors[1]:.2e}; "
          f"first reference alone {distance:.2e}")
    assert_relative_close(recorded * scale_factor(twins), expected, TOLERANCE)
    assert_relative_close(replayed * scale_factor(twins), expected, TOLERANCE)
    assert distance > 100 * TOLERANCE  # the second reference and the weights act


def test_vsp_with_two_weighted_references_sampling_parity(twins):
    # every self-attention (test_parity checks the late_self_attention preset): at the tiny UNets' late layers
    # alone the set is only ~35x the tolerance from its first reference alone (sd15, measured)
    check_unet(twins, lambda model, reference: vsp(model, reference=reference, layers="all_self_attention"),
               lambda unet, references: oracle.install_vsp(unet, all_self_attention(unet), references))


SA_OPTIONS = {"adain_values": True, "score_scale": 0.9, "score_shift": 0.693}


def test_style_aligned_with_two_weighted_references_sampling_parity(twins):
    def node(model, reference):
        return style_aligned(model, reference=reference, adain_values=True, shared_score_scale=0.9,
                             shared_score_shift=0.693, shared_group_norm="on")

    check_unet(twins, node, lambda unet, references: oracle.install_style_aligned(
        unet, all_self_attention(unet), references, **SA_OPTIONS), shared_norms=True)


# --------------------------------------------------------------------------------------------- Flux twin

GUIDANCE = 3.5  # flux_conditioning's
ALL = [("double", 0), ("double", 1), ("single", 0), ("single", 1)]
SINGLE = [("single", 0), ("single", 1)]
# (latent seed, latent height and width, noise seed, conditioning seed) per reference: 4 x 4 and 4 x 6 tokens
FLUX_REFERENCES = ((11, (8, 8), 3, 2), (12, (8, 12), 5, 3))


@pytest.fixture(scope="module")
def flux():
    model = random_dits.tiny_flux(seed=4)
    return model, twin_from_comfy(model)


def flux_latent(latent_seed, size):
    return torch.randn(1, 16, *size, generator=torch.Generator().manual_seed(latent_seed))


def flux_node_reference(latent_seed, size, noise_seed, conditioning_seed):
    (reference,) = run_node("StyleReferenceLatent", latent={"samples": flux_latent(latent_seed, size)}, clip=None,
                            prompt="", reference_seed=noise_seed, cache_megabytes=64, cache_on_cpu=False,
                            conditioning=conditioning(conditioning_seed))
    return reference


def flux_twin_sample(model, twin, install, noise):
    """ComfyUI's euler on the simple schedule written out, the twin as the model; before each call of the
    targets every reference runs alone on the twin (its own latent at sigma, noise and prompt), and
    install(recorded references) styles the targets' call."""
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", STEPS)
    (positive, pos_extra), (negative, neg_extra) = conditioning(0)[0], conditioning(1)[0]
    batch = noise.shape[0]
    context = torch.cat([positive.expand(batch, -1, -1), negative.expand(batch, -1, -1)])
    pooled = torch.cat([pos_extra["pooled_output"].expand(batch, -1), neg_extra["pooled_output"].expand(batch, -1)])
    references = []
    for latent_seed, size, noise_seed, conditioning_seed in FLUX_REFERENCES:
        latent = flux_latent(latent_seed, size)
        (ref_context, ref_extra) = conditioning(conditioning_seed)[0]
        references.append((model.model.process_latent_in(latent), comfy.sample.prepare_noise(latent, noise_seed),
                           ref_context, ref_extra["pooled_output"]))
    x = noise.clone()  # sigma 1: the noise alone
    for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        recorded = [record_reference(twin, ALL, lambda: twin_denoise(
            twin, sigma * ref_noise + (1 - sigma) * clean, sigma, ref_context, ref_pooled, GUIDANCE))
            for clean, ref_noise, ref_context, ref_pooled in references]
        with install(recorded):
            velocity = twin_denoise(twin, x.repeat(2, 1, 1, 1), sigma, context, pooled, GUIDANCE)
        cond, uncond = (x.repeat(2, 1, 1, 1) - sigma * velocity).chunk(2)
        guided = uncond + CFG * (cond - uncond)
        x = x + (sigma_next - sigma) * (x - guided) / sigma
    return model.model.process_latent_out(x)


FLUX_METHODS = {
    # the node on the ComfyUI model, the oracle on the twin (both on their auto preset's blocks)
    "vsp": (lambda m, reference: vsp(m, layers="auto", reference=reference),
            lambda twin: lambda recorded: oracle.with_flux_vsp(twin, ALL, recorded, WEIGHTS)),
    "style_aligned": (lambda m, reference: style_aligned(m, layers="auto", shared_score_scale=1.1, reference=reference),
                      lambda twin: lambda recorded: oracle.with_flux_aligned_gen(twin, SINGLE, recorded, WEIGHTS,
                                                                                 style_factor=1.1)),
}


@pytest.mark.parametrize("method", FLUX_METHODS)
def test_flux_with_two_weighted_references_sampling_parity(flux, method):
    model, twin = flux
    node, install = FLUX_METHODS[method]
    noise = flux_noise(2, seed=1)
    node_references = [flux_node_reference(*spec) for spec in FLUX_REFERENCES]
    actual = flux_sample(node(model, combine(node_references)), batch=2, cfg=CFG, steps=STEPS, noise=noise)
    alone = flux_sample(node(model, node_references[0]), batch=2, cfg=CFG, steps=STEPS, noise=noise)
    expected = flux_twin_sample(model, twin, install(twin), noise)
    error, distance = relative_error(actual, expected), relative_error(alone, expected)
    print(f"flux {method}: relative error {error:.2e}; first reference alone {distance:.2e}")
    assert error <= TOLERANCE
    assert distance > 100 * TOLERANCE  # the second reference and the weights act
