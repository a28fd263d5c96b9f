"""StyleDiffusion's value input (the first part of issue 16): the cond rows' cross-attention values
take context * scale + shift, keys and the uncond rows keep the plain embedding."""

import pytest
import torch

from conftest import pack_submodule
from helpers import encode, relative_error, sample, self_attention_module, assert_relative_close
from oracles import value_input as reference_value_input
from oracles.attention import PlainProcessor
from oracles.models import twin_models
from oracles.sampling import denoise, sd_scheduler
from support.parity import TOLERANCE, comfy_denoise, random_prompts, scale_factor, start_noise

value_input = pack_submodule("attention_patches.value_input")
feature_store = pack_submodule("attention_patches.feature_store")
style_call = pack_submodule("glue.style_call")
sigma_range = pack_submodule("attention_patches.sigma_range")
owners = pack_submodule("nodes.style_inputs")


def modulation(tokens, channels, seed=0, identity=False):
    if identity:
        return value_input.ValueInput(torch.ones(tokens, channels), torch.zeros(tokens, channels))
    generator = torch.Generator().manual_seed(seed)
    return value_input.ValueInput(1 + 0.5 * torch.randn(tokens, channels, generator=generator),
                                  0.5 * torch.randn(tokens, channels, generator=generator))


def with_value_input(model, value):
    """A clone whose every call's cond rows take value (one modulation at every sigma: a store that
    answers any sigma with it)."""

    class EverySigma(feature_store.FeatureStore):
        def at(self, sigma, device, tag=None):
            return {value_input.SITE: value}

    patched = model.clone()
    owner = owners.new_owner("ValueInputTest")
    patched.set_model_attn2_patch(value_input.ValueInputPatch(owner))
    style_call.install_style_call(patched, owner, None, sigma_range.SigmaRange(float("inf"), -1.0),
                                  recorded=EverySigma(1 << 20))
    return patched


def test_the_cond_rows_values_take_the_modulated_prompt_and_nothing_else_changes(sd15):
    positive, negative = encode(sd15.clip, "a cat"), encode(sd15.clip, "")
    context, plain_context = positive[0][0][0], negative[0][0][0]
    value = modulation(*context.shape)
    layer = ("input", 1, 0)
    attention = self_attention_module(sd15.model, layer).attn2
    seen = []
    handles = [attention.to_v.register_forward_hook(lambda m, i, o: seen.append(("v", i[0].detach().clone()))),
               attention.to_k.register_forward_hook(lambda m, i, o: seen.append(("k", i[0].detach().clone())))]
    try:
        sample(with_value_input(sd15.model, value), positive, negative, batch=1, steps=2)
    finally:
        for handle in handles:
            handle.remove()
    values = [t for kind, t in seen if kind == "v"]
    keys = [t for kind, t in seen if kind == "k"]
    assert len(values) == 2 and all(v.shape[0] == 2 for v in values)  # cond and uncond in one call
    for v, k in zip(values, keys):
        cond = [row for row in range(2) if torch.equal(k[row], context)]
        uncond = [row for row in range(2) if torch.equal(k[row], plain_context)]
        assert len(cond) == 1 and len(uncond) == 1  # the keys keep the prompts
        assert torch.allclose(v[cond[0]], context * value.scale + value.shift, atol=1e-6)
        assert torch.equal(v[uncond[0]], plain_context)


def test_the_identity_modulation_is_plain_sampling_bit_for_bit_and_another_is_not(sd15):
    positive, negative = encode(sd15.clip, "a cat"), encode(sd15.clip, "")
    context = positive[0][0][0]
    plain = sample(sd15.model, positive, negative, batch=1)
    assert torch.equal(sample(with_value_input(sd15.model, modulation(*context.shape, identity=True)), positive,
                              negative, batch=1), plain)
    assert relative_error(sample(with_value_input(sd15.model, modulation(*context.shape)), positive, negative,
                                 batch=1), plain) > 1e-3
    assert torch.equal(sample(sd15.model, positive, negative, batch=1), plain)  # no trace


def test_a_modulation_of_another_prompt_length_is_refused_by_name(sd15):
    positive, negative = encode(sd15.clip, "a cat"), encode(sd15.clip, "")
    with pytest.raises(ValueError, match="the learned value input is for 10 tokens"):
        sample(with_value_input(sd15.model, modulation(10, positive[0][0].shape[-1])), positive, negative, batch=1)


@pytest.mark.parametrize("architecture", ["sd15", "sdxl"])
def test_parity_of_the_value_input_with_a_diffusers_processor_on_the_twin(architecture):
    twins = twin_models(architecture, seed=1)
    prompts = random_prompts(twins, batch=1)
    noise = start_noise(1)
    value = modulation(*prompts.cond.shape[1:], seed=4)
    ours, sigma = comfy_denoise(with_value_input(twins.comfy_model, value), prompts, 501, 4.0, noise)
    reference_value_input.install(twins.diffusers_unet, value.scale, value.shift)
    try:
        expected = denoise(twins.diffusers_unet, sd_scheduler(), noise * sigma, 501, prompts, 4.0)
    finally:
        twins.diffusers_unet.set_attn_processor(PlainProcessor())
    assert_relative_close(ours * scale_factor(twins), expected, TOLERANCE)
    plain = denoise(twins.diffusers_unet, sd_scheduler(), noise * sigma, 501, prompts, 4.0)
    assert relative_error(plain, expected) > 100 * TOLERANCE
