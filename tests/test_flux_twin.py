"""The diffusers Flux twin (tests/support/flux_twin.py) computes what ComfyUI's Flux computes, and the Flux style
oracles (tests/oracles/flux_style.py) reduce to it when switched off."""

import functools

import pytest
import torch

from helpers import relative_error
from oracles.flux_style import record_reference, with_aligned_gen, with_vsp
from random_dits import POOLED_DIM, TEXT_DIM, tiny_flux
from support.flux_twin import image_ids, pack, sharpen_attention, twin_denoise, twin_denoised, twin_from_comfy, unpack

TOLERANCE = 1e-4


@functools.cache
def build(sharp: bool):
    """tiny_flux as drawn (QK-norm scales ~0.02: near-uniform attention), or with scales in [1, 2.5], where
    positions and attention scores matter; and its twin."""
    model = tiny_flux(seed=4)
    if sharp:
        sharpen_attention(model, seed=5)
    return model, twin_from_comfy(model)


@pytest.fixture(params=["as_drawn", "sharp"])
def flux(request):
    return build(request.param == "sharp")


@pytest.fixture
def sharp():
    """The oracles are checked where attention scores (RoPE, appended keys, their scale) move the output."""
    return build(sharp=True)


def inputs(batch, height, width, tokens=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 16, height, width, generator=g), torch.rand(batch, generator=g),
            torch.randn(batch, tokens, TEXT_DIM, generator=g), torch.randn(batch, POOLED_DIM, generator=g),
            torch.tensor([3.5, 1.5][:batch] + [3.5] * max(0, batch - 2)))


def comfy_forward(model, x, timestep, context, y, guidance):
    with torch.no_grad():
        return model.model.diffusion_model(x, timestep, context, y=y, guidance=guidance, transformer_options={})


@pytest.mark.parametrize("height,width", [(10, 14), (12, 12), (9, 13)], ids=["5x7_tokens", "square", "padded"])
def test_twin_equals_comfy_diffusion_model(flux, height, width):
    model, twin = flux
    x, timestep, context, y, guidance = inputs(2, height, width)
    expected = comfy_forward(model, x, timestep, context, y, guidance)
    actual = twin_denoise(twin, x, timestep, context, y, guidance)
    assert actual.shape == expected.shape == x.shape
    error = relative_error(actual, expected)
    print(f"{height}x{width}: relative error {error:.2e}")
    assert error <= TOLERANCE
    # each input matters: a wrong timestep, guidance, text or pooled text would not pass
    for wrong in ((timestep.flip(0), context, y, guidance), (timestep, context, y, guidance.flip(0)),
                  (timestep, context.flip(0), y, guidance), (timestep, context, y.flip(0), guidance)):
        assert relative_error(twin_denoise(twin, x, *wrong), expected) > 10 * TOLERANCE


def test_rope_layout_matters_on_the_sharp_twin():
    """(0, col, row) positions instead of (0, row, col): the parity above sees a wrong RoPE layout (on the model
    as drawn it would not: its near-uniform attention hides positions)."""
    model, twin = build(sharp=True)
    x, timestep, context, y, guidance = inputs(2, 10, 14)
    expected = comfy_forward(model, x, timestep, context, y, guidance)
    with torch.no_grad():
        out = twin(hidden_states=pack(x), encoder_hidden_states=context, pooled_projections=y, timestep=timestep,
                   img_ids=image_ids(5, 7)[:, [0, 2, 1]], txt_ids=torch.zeros(7, 3), guidance=guidance,
                   return_dict=False)[0]
    assert relative_error(unpack(out, 5, 7), expected) > 10 * TOLERANCE


def test_twin_x0_matches_comfy_model_sampling(flux):
    model, twin = flux
    x, sigma, context, y, guidance = inputs(2, 10, 14, seed=1)
    velocity = comfy_forward(model, x, sigma, context, y, guidance)
    model_sampling = model.get_model_object("model_sampling")
    assert torch.equal(model_sampling.timestep(sigma), sigma)  # ModelSamplingFlux: the model's timestep is sigma
    expected = model_sampling.calculate_denoised(sigma, velocity, x)
    assert relative_error(twin_denoised(twin, x, sigma, context, y, guidance), expected) <= TOLERANCE


ALL = [("double", 0), ("double", 1), ("single", 0), ("single", 1)]


def plain_and(twin, styled, x, timestep, context, y, guidance):
    """The twin's output with diffusers' own processors, then under the styled context manager."""
    plain = twin_denoise(twin, x, timestep, context, y, guidance)
    with styled:
        return plain, twin_denoise(twin, x, timestep, context, y, guidance)


@pytest.mark.parametrize("oracle", ["vsp_strength_0", "vsp_no_blocks", "aligned_gen_no_blocks",
                                    "aligned_gen_reference_alone"])
def test_oracles_switched_off_are_the_plain_twin(sharp, oracle):
    _, twin = sharp
    batch = 1 if oracle == "aligned_gen_reference_alone" else 3
    x, timestep, context, y, guidance = inputs(batch, 10, 14, tokens=5, seed=2)
    styled = {"vsp_strength_0": lambda: with_vsp(twin, ALL, strength=0.0),  # the oracle's own attention everywhere
              "vsp_no_blocks": lambda: with_vsp(twin, []),
              "aligned_gen_no_blocks": lambda: with_aligned_gen(twin, []),
              "aligned_gen_reference_alone": lambda: with_aligned_gen(twin, ALL)}[oracle]()
    plain, actual = plain_and(twin, styled, x, timestep, context, y, guidance)
    assert relative_error(actual, plain) <= 1e-5
    assert torch.equal(twin_denoise(twin, x, timestep, context, y, guidance), plain)  # processors restored


@pytest.mark.parametrize("method", ["vsp", "aligned_gen", "aligned_gen_unshifted"])
def test_oracles_change_the_targets_and_keep_the_reference(sharp, method):
    _, twin = sharp
    x, timestep, context, y, guidance = inputs(3, 10, 14, tokens=5, seed=3)
    styled = {"vsp": lambda: with_vsp(twin, ALL), "aligned_gen": lambda: with_aligned_gen(twin, ALL),
              "aligned_gen_unshifted": lambda: with_aligned_gen(twin, ALL, shift=False)}[method]()
    plain, actual = plain_and(twin, styled, x, timestep, context, y, guidance)
    assert relative_error(actual[:1], plain[:1]) <= 1e-5  # the reference row runs plain attention throughout
    for row in (1, 2):
        assert relative_error(actual[row], plain[row]) > 1e-2


def test_vsp_strength_and_blocks_matter(sharp):
    _, twin = sharp
    x, timestep, context, y, guidance = inputs(2, 12, 12, tokens=6, seed=4)
    outputs = {}
    for name, blocks, strength in (("full", ALL, 1.0), ("half", ALL, 0.5), ("single", [("single", 1)], 1.0)):
        with with_vsp(twin, blocks, strength=strength):
            outputs[name] = twin_denoise(twin, x, timestep, context, y, guidance)[1]
    plain = twin_denoise(twin, x, timestep, context, y, guidance)[1]
    assert 1e-3 < relative_error(outputs["half"], plain) < relative_error(outputs["full"], plain)
    assert 1e-3 < relative_error(outputs["single"], plain) < relative_error(outputs["full"], plain)


def test_aligned_gen_options_matter(sharp):
    _, twin = sharp
    x, timestep, context, y, guidance = inputs(2, 10, 14, tokens=5, seed=8)
    outputs = {}
    for name, options in (("default", {}), ("unshifted", {"shift": False}), ("lambda_1", {"style_factor": 1.0}),
                          ("again", {})):
        with with_aligned_gen(twin, ALL, **options):
            outputs[name] = twin_denoise(twin, x, timestep, context, y, guidance)[1]
    assert torch.equal(outputs["again"], outputs["default"])
    assert relative_error(outputs["unshifted"], outputs["default"]) > 1e-3
    assert relative_error(outputs["lambda_1"], outputs["default"]) > 1e-3


@pytest.mark.parametrize("method", ["vsp", "aligned_gen", "aligned_gen_unshifted"])
def test_external_reference_replays_the_in_batch_reference(sharp, method):
    """Row 0 recorded alone then replayed for rows 1.. gives what rows 1.. get with row 0 in their batch."""
    _, twin = sharp
    x, timestep, context, y, guidance = inputs(3, 10, 14, tokens=5, seed=5)
    blocks = [("double", 1), ("single", 0)]
    install = {"vsp": lambda **kw: with_vsp(twin, blocks, **kw),
               "aligned_gen": lambda **kw: with_aligned_gen(twin, blocks, style_factor=1.3, **kw),
               "aligned_gen_unshifted": lambda **kw: with_aligned_gen(twin, blocks, shift=False, **kw)}[method]
    with install():
        in_batch = twin_denoise(twin, x, timestep, context, y, guidance)
    reference = record_reference(twin, blocks, lambda: twin_denoise(twin, x[:1], timestep[:1], context[:1], y[:1],
                                                                       guidance[:1]))
    assert set(reference.blocks) == set(blocks)
    with install(reference=reference):
        replayed = twin_denoise(twin, x[1:], timestep[1:], context[1:], y[1:], guidance[1:])
    assert relative_error(replayed, in_batch[1:]) <= 1e-5
    assert relative_error(replayed, twin_denoise(twin, x[1:], timestep[1:], context[1:], y[1:], guidance[1:])) > 1e-3


@pytest.mark.parametrize("method", ["vsp", "aligned_gen"])
def test_external_reference_of_another_size_and_prompt_length(sharp, method):
    _, twin = sharp
    x, timestep, context, y, guidance = inputs(2, 10, 14, tokens=5, seed=6)
    ref_x, ref_t, ref_context, ref_y, ref_guidance = inputs(1, 8, 12, tokens=9, seed=7)
    reference = record_reference(twin, ALL, lambda: twin_denoise(twin, ref_x, ref_t, ref_context, ref_y, ref_guidance))
    assert reference.blocks[("single", 0)]["k"].shape[2] == 4 * 6  # the reference's own image tokens
    styled = (with_vsp if method == "vsp" else with_aligned_gen)(twin, ALL, reference=reference)
    plain, actual = plain_and(twin, styled, x, timestep, context, y, guidance)
    assert actual.shape == plain.shape and torch.isfinite(actual).all()
    for row in (0, 1):  # every row is a target
        assert relative_error(actual[row], plain[row]) > 1e-2


@pytest.mark.parametrize("method", ["vsp", "aligned_gen"])
def test_chunks_each_have_their_reference(sharp, method):
    """[ref a, target a, ref b, target b] in 2 chunks: what [ref a, target a] and [ref b, target b] give apart."""
    _, twin = sharp
    x, timestep, context, y, guidance = inputs(4, 10, 14, tokens=5, seed=9)
    install = with_vsp if method == "vsp" else with_aligned_gen
    with install(twin, ALL, chunks=2):
        together = twin_denoise(twin, x, timestep, context, y, guidance)
    with install(twin, ALL):
        apart = torch.cat([twin_denoise(twin, x[i:i + 2], timestep[i:i + 2], context[i:i + 2], y[i:i + 2],
                                        guidance[i:i + 2]) for i in (0, 2)])
    assert relative_error(together, apart) <= 1e-5
    with install(twin, ALL):  # one chunk: rows 2 and 3 follow row 0 instead
        assert relative_error(twin_denoise(twin, x, timestep, context, y, guidance)[2:], apart[2:]) > 1e-2
