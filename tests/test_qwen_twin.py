"""The diffusers Qwen-Image twin (tests/support/qwen_twin.py) computes what ComfyUI's Qwen-Image computes, its
sampling (tests/oracles/qwen_style.py's twin_sample) what comfy.sample.sample does, and the Qwen-Image style
oracles reduce to it when switched off or styled toward themselves."""

import contextlib

import pytest
import torch

import comfy.sample
import comfy.samplers
from comfy.ldm.flux.math import apply_rope1
from helpers import relative_error
from oracles.qwen_attention import rotate
from oracles.qwen_style import qwen_sigmas, twin_sample, with_style_aligned, with_vsp
from random_dits import qwen_conditioning
from support.qwen_twin import (build, image_ids, inputs, pack, ref_latent, text_ids, twin_denoise, twin_denoised,
                               unpack)

TOLERANCE = 1e-6


def comfy_forward(model, x, timestep, context, **kwargs):
    with torch.no_grad():
        return model.model.diffusion_model(x, timestep, context, transformer_options={}, **kwargs)


SIZES = pytest.mark.parametrize("height,width", [(12, 16), (10, 14), (9, 13)],
                                ids=["even_grid", "odd_grid", "padded"])


@SIZES
@pytest.mark.parametrize("extra", [False, True], ids=["image", "with_ref_latent"])
def test_twin_equals_comfy_diffusion_model(height, width, extra):
    model, twin = build()
    x, timestep, context = inputs(2, height, width)
    kwargs = {"ref_latents": [ref_latent(2)]} if extra else {}
    expected = comfy_forward(model, x, timestep, context, **kwargs)
    actual = twin_denoise(twin, x, timestep, context, **kwargs)
    assert actual.shape == expected.shape == x.shape
    error = relative_error(actual, expected)
    print(f"{height}x{width} {kwargs and 'with a reference latent'}: relative error {error:.2e}")
    assert error <= TOLERANCE
    wrong = [(timestep.flip(0), context, kwargs), (timestep, context.flip(0), kwargs)]
    if extra:
        wrong.append((timestep, context, {"ref_latents": [ref_latent(2, seed=10)]}))
    for t, c, kw in wrong:  # each input matters
        assert relative_error(twin_denoise(twin, x, t, c, **kw), expected) > 1e3 * TOLERANCE


def comfy_rope(model, x, timestep, context, **kwargs):
    """The RoPE ComfyUI's blocks get, (batch, 1, rows, head dim / 2, 2, 2)."""
    seen = []
    block = model.model.diffusion_model.transformer_blocks[0]
    hook = block.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["image_rotary_emb"]), with_kwargs=True)
    try:
        comfy_forward(model, x, timestep, context, **kwargs)
    finally:
        hook.remove()
    return seen[0]


@SIZES
def test_positions_turn_as_comfyui_turns(height, width):
    """ComfyPositions (diffusers' rope_params at ComfyUI's ids) rotates as ComfyUI's pe does; diffusers' own
    QwenEmbedRope does where the token grid is even, and not on an odd one."""
    model, twin = build()
    _, native = build("diffusers")
    x, timestep, context = inputs(1, height, width)
    rows, cols = -(-height // 2), -(-width // 2)
    pe = comfy_rope(model, x, timestep, context, ref_latents=[ref_latent(1)])
    shapes, lengths = [[(1, rows, cols), (1, 3, 5)]], [context.shape[1]]
    q = torch.randn(1, 2, pe.shape[2], 32, generator=torch.Generator().manual_seed(1))
    expected = apply_rope1(q, pe)
    ours = twin.pos_embed(shapes, lengths)
    assert relative_error(rotate(q, torch.cat([ours[1], ours[0]])), expected) <= 1e-6
    assert torch.equal(ours[1], twin.pos_embed.freqs(text_ids(rows, cols, context.shape[1])))
    assert torch.equal(ours[0][:rows * cols], twin.pos_embed.freqs(image_ids(rows, cols)))
    theirs = native.pos_embed(shapes, lengths, device="cpu")
    same = torch.equal(theirs[0][:rows * cols], ours[0][:rows * cols]) and torch.equal(theirs[1], ours[1])
    assert same == (rows % 2 == 0 and cols % 2 == 0)
    error = relative_error(twin_denoise(native, x, timestep, context), comfy_forward(model, x, timestep, context))
    assert (error <= TOLERANCE) == same


def test_the_qk_norms_are_sharp_and_positions_matter():
    """tiny_qwen_image's QK-norm weights lie in [1, 2.5] (not randomize_parameters' ones), where a transposed
    RoPE layout ((frame, col, row) ids) moves the output far beyond the tolerance."""
    model, twin = build()
    for name, parameter in model.model.diffusion_model.named_parameters():
        if ".attn.norm_" in name:
            assert 1.0 <= parameter.min() and parameter.max() <= 2.5 and parameter.std() > 0.2, name
    x, timestep, context = inputs(2, 10, 14)
    expected = comfy_forward(model, x, timestep, context)
    freqs = twin.pos_embed.freqs
    twin.pos_embed.freqs = lambda ids: freqs(ids[:, [0, 2, 1]])
    try:
        assert relative_error(twin_denoise(twin, x, timestep, context), expected) > 1e3 * TOLERANCE
    finally:
        del twin.pos_embed.freqs
    assert relative_error(twin_denoise(twin, x, timestep, context), expected) <= TOLERANCE


def test_pack_is_comfyui_patchify():
    x = torch.arange(2 * 16 * 4 * 6, dtype=torch.float32).reshape(2, 16, 1, 4, 6)
    tokens = pack(x)
    assert tokens.shape == (2, 6, 64)
    assert torch.equal(tokens[0, 1, :4], x[0, 0, 0, 0:2, 2:4].flatten())  # token (0, 1): channel 0's 2x2 patch
    assert torch.equal(unpack(tokens, 2, 3), x)


def test_twin_x0_matches_comfy_model_sampling():
    model, twin = build()
    x, sigma, context = inputs(2, 10, 14, seed=1)
    model_sampling = model.get_model_object("model_sampling")
    assert torch.equal(model_sampling.timestep(sigma), sigma)  # ModelSamplingFlux: the model's timestep is sigma
    expected = model_sampling.calculate_denoised(sigma, comfy_forward(model, x, sigma, context), x)
    assert relative_error(twin_denoised(twin, x, sigma, context), expected) <= TOLERANCE


@pytest.mark.parametrize("steps", [1, 4, 20])
def test_sigmas_are_comfyui_simple_schedule(steps):
    model, _ = build()
    expected = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", steps)
    assert model.get_model_object("model_sampling").shift == 1.15
    assert torch.allclose(qwen_sigmas(steps), expected.float(), rtol=1e-6, atol=0) and qwen_sigmas(steps)[0] == 1.0


@pytest.mark.parametrize("steps,cfg", [(1, 1.0), (4, 1.0), (4, 3.0)])
def test_twin_sampling_equals_comfy_sampling(steps, cfg):
    """twin_sample with diffusers' own processors gives what comfy.sample.sample gives (after process_latent_out).
    ComfyUI batches [uncond rows; cond rows] (cond_or_uncond [1, 0]), the twin [cond; uncond]: rows are
    independent, so only float rounding tells them apart."""
    model, twin = build()
    noise = comfy.sample.prepare_noise(torch.zeros(2, 16, 1, 8, 10), 1)
    positive, negative = qwen_conditioning(0), qwen_conditioning(1)
    expected = comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", positive, negative,
                                   torch.zeros_like(noise), seed=1, disable_pbar=True)
    actual = model.model.process_latent_out(
        twin_sample(twin, noise, steps, cfg, positive, negative, lambda **kw: contextlib.nullcontext()))
    assert actual.shape == expected.shape == (2, 16, 1, 8, 10)
    print(f"{steps} steps, cfg {cfg}: relative error {relative_error(actual, expected):.2e}")
    assert relative_error(actual, expected) <= 10 * TOLERANCE
    other = twin_sample(twin, noise, steps, cfg, qwen_conditioning(2), negative, lambda **kw: contextlib.nullcontext())
    assert relative_error(model.model.process_latent_out(other), expected) > 1e-3


def test_twin_sampling_with_an_external_reference_replays_the_in_batch_one():
    """One step at cfg 1 (sigma 1: a latent is its noise): the reference recorded from noise row 0 with the cond
    prompt styles rows 1.. as row 0 does in their batch."""
    _, twin = build()
    noise = comfy.sample.prepare_noise(torch.zeros(3, 16, 1, 8, 10), 2)
    positive, negative = qwen_conditioning(0), qwen_conditioning(1)
    for install in (lambda **kw: with_vsp(twin, [0, 1], **kw), lambda **kw: with_style_aligned(twin, [1], **kw)):
        in_batch = twin_sample(twin, noise, 1, 1.0, positive, negative, install)
        external = twin_sample(twin, noise[1:], 1, 1.0, positive, negative, install,
                               reference=(torch.zeros_like(noise[:1]), noise[:1], positive))
        plain = twin_sample(twin, noise[1:], 1, 1.0, positive, negative, lambda **kw: contextlib.nullcontext())
        assert relative_error(external, in_batch[1:]) <= 1e-5 and relative_error(external, plain) > 1e-3
