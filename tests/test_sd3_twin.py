"""The diffusers SD3 twin (tests/support/sd3_twin.py) computes what ComfyUI's SD3 and SD3.5 Medium compute, its
euler sampling (tests/oracles/sd3_style.py) is ComfyUI's, and the SD3 style oracles reduce to it when switched
off or styled toward themselves."""

import functools

import pytest
import torch

import comfy.sample
import comfy.samplers
from helpers import relative_error
from oracles.sd3_style import record_reference, sd3_sigmas, twin_sample, with_style_aligned, with_vsp
from random_dits import POOLED_DIM, TEXT_DIM, sd3_conditioning, tiny_sd3, tiny_sd35_medium
from support.sd3_twin import twin_denoise, twin_denoised, twin_from_comfy

TOLERANCE = 1e-5
BUILDERS = {"sd3": tiny_sd3, "sd35_medium": tiny_sd35_medium}


@functools.cache
def build(variant):
    model = BUILDERS[variant](seed=4)
    return model, twin_from_comfy(model)


@pytest.fixture(params=list(BUILDERS))
def sd3(request):
    return build(request.param)


def blocks_of(twin):
    return list(range(len(twin.transformer_blocks)))


def inputs(batch, height, width, tokens=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 16, height, width, generator=g), torch.rand(batch, generator=g) * 1000,
            torch.randn(batch, tokens, TEXT_DIM, generator=g), torch.randn(batch, POOLED_DIM, generator=g))


def comfy_forward(model, x, timestep, context, y):
    with torch.no_grad():
        return model.model.diffusion_model(x, timestep, context, y=y, transformer_options={})


@pytest.mark.parametrize("height,width", [(8, 8), (10, 14), (9, 13)], ids=["square", "5x7_tokens", "padded"])
def test_twin_equals_comfy_diffusion_model(sd3, height, width):
    model, twin = sd3
    x, timestep, context, y = inputs(2, height, width)
    expected = comfy_forward(model, x, timestep, context, y)
    actual = twin_denoise(twin, x, timestep, context, y)
    assert actual.shape == expected.shape == x.shape
    error = relative_error(actual, expected)
    print(f"{height}x{width}: relative error {error:.2e}")
    assert error <= TOLERANCE
    # each input matters: a wrong timestep, text or pooled text would not pass
    for wrong in ((timestep.flip(0), context, y), (timestep, context.flip(0), y), (timestep, context, y.flip(0))):
        assert relative_error(twin_denoise(twin, x, *wrong), expected) > 100 * TOLERANCE
    table = twin.pos_embed.pos_embed.clone()  # and positions: the table (a buffer, mapped with the weights) flipped
    try:
        twin.pos_embed.pos_embed.copy_(table.flip(1))
        assert relative_error(twin_denoise(twin, x, timestep, context, y), expected) > 100 * TOLERANCE
    finally:
        twin.pos_embed.pos_embed.copy_(table)


def test_tiny_models_are_what_sd3_files_are():
    """SD3.0: no QK norm, no attn2; SD3.5 Medium: RMSNorm on q/k, attn2 in its first blocks; a filled pos_embed."""
    (sd3, twin3), (sd35, twin35) = build("sd3"), build("sd35_medium")
    assert twin3.transformer_blocks[0].attn.norm_q is None and twin35.transformer_blocks[0].attn.norm_q is not None
    assert [b.attn2 is not None for b in twin3.transformer_blocks + twin35.transformer_blocks] == [0, 0, 1, 1, 0]
    for model in (sd3, sd35):
        assert model.model.diffusion_model.pos_embed.abs().max() == pytest.approx(1.0, abs=1e-3)


def test_recorded_features_are_the_inputs_of_comfys_attention():
    """What the oracles take (q/k after the QK norm, v; text rows first; attn2's image rows) is what ComfyUI's
    attention kernels get, as an optimized_attention_override sees them: q, k (B, rows, heads * 64) and v
    (B, rows, heads, 64), per block the joint call, then attn2's in a dual block (no block index in the options)."""
    model, twin = build("sd35_medium")
    x, timestep, context, y = inputs(1, 10, 14, tokens=5, seed=4)
    reference = record_reference(twin, blocks_of(twin), lambda: twin_denoise(twin, x, timestep, context, y))
    calls = []

    def record(func, q, k, v, *args, **kwargs):
        calls.append((q, k, v))
        return func(q, k, v, *args, **kwargs)
    with torch.no_grad():
        model.model.diffusion_model(x, timestep, context, y=y, transformer_options={
            "optimized_attention_override": record})
    assert [q.shape[1] for q, *_ in calls] == [5 + 35, 35, 5 + 35, 35, 5 + 35]
    assert all(v.shape == (1, q.shape[1], 3, 64) and k.shape == q.shape == (1, q.shape[1], 192) for q, k, v in calls)
    for (q, k, v), site in zip(calls, [(0, "joint"), (0, "image"), (1, "joint"), (1, "image"), (2, "joint")]):
        for name, comfy_side in (("q", q), ("k", k), ("v", v)):
            ours = reference.features[site][name].transpose(1, 2).reshape(1, 35, -1)
            assert relative_error(ours, comfy_side.reshape(1, q.shape[1], -1)[:, -35:]) <= TOLERANCE


def test_twin_x0_and_schedule_are_comfy_model_samplings(sd3):
    model, twin = sd3
    model_sampling = model.get_model_object("model_sampling")
    for steps in (1, 4, 7):
        assert torch.allclose(sd3_sigmas(steps), comfy.samplers.calculate_sigmas(model_sampling, "simple", steps),
                              atol=1e-6)
    x, sigma, context, y = inputs(2, 10, 14, seed=1)
    sigma = sigma / 1000
    assert torch.allclose(model_sampling.timestep(sigma), sigma * 1000)
    expected = model_sampling.calculate_denoised(sigma, comfy_forward(model, x, sigma * 1000, context, y), x)
    assert relative_error(twin_denoised(twin, x, sigma, context, y), expected) <= TOLERANCE


@pytest.mark.parametrize("steps,cfg", [(1, 1.0), (4, 1.0), (4, 3.0)])
def test_twin_sample_is_comfy_sample(sd3, steps, cfg):
    """Unstyled (no blocks, in-batch and external), the written-out sampling equals ComfyUI's euler/simple."""
    model, twin = sd3
    noise = comfy.sample.prepare_noise(torch.zeros(2, 16, 8, 8), 1)
    positive, negative = sd3_conditioning(0), sd3_conditioning(1)
    expected = comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", positive, negative,
                                   torch.zeros(2, 16, 8, 8), seed=1, disable_pbar=True)
    install = lambda **kw: with_vsp(twin, [], **kw)  # noqa: E731
    reference = (torch.randn(1, 16, 6, 10), torch.randn(1, 16, 6, 10), sd3_conditioning(0))
    for ref in (None, reference):
        actual = model.model.process_latent_out(twin_sample(twin, noise, steps, cfg, positive, negative, install, ref))
        assert relative_error(actual, expected) <= 1e-4
    styled = twin_sample(twin, noise, steps, cfg, positive, negative,
                         lambda **kw: with_vsp(twin, blocks_of(twin), **kw))
    assert relative_error(model.model.process_latent_out(styled), expected) > 1e-3


def plain_and(twin, styled, x, timestep, context, y):
    plain = twin_denoise(twin, x, timestep, context, y)
    with styled:
        return plain, twin_denoise(twin, x, timestep, context, y)


OFF = {"vsp_strength_0": lambda twin, **kw: with_vsp(twin, blocks_of(twin), strength=0.0, **kw),
       "vsp_no_blocks": lambda twin, **kw: with_vsp(twin, [], **kw),
       "style_aligned_no_blocks": lambda twin, **kw: with_style_aligned(twin, [], **kw)}


@pytest.mark.parametrize("oracle", list(OFF))
def test_oracles_switched_off_are_the_plain_twin(sd3, oracle):
    _, twin = sd3
    x, timestep, context, y = inputs(3, 10, 14, tokens=5, seed=2)
    plain, actual = plain_and(twin, OFF[oracle](twin), x, timestep, context, y)
    assert relative_error(actual, plain) <= TOLERANCE
    assert torch.equal(twin_denoise(twin, x, timestep, context, y), plain)  # processors restored


SELF = {"vsp": lambda twin, **kw: with_vsp(twin, blocks_of(twin), **kw),
        "vsp_strength": lambda twin, **kw: with_vsp(twin, blocks_of(twin), strength=0.6, **kw),
        "style_aligned_share_off": lambda twin, **kw: with_style_aligned(twin, blocks_of(twin), share=False, **kw)}


@pytest.mark.parametrize("source", ["in_batch", "external"])
@pytest.mark.parametrize("oracle", list(SELF))
def test_styled_toward_itself_is_plain(sd3, oracle, source):
    """A target whose reference is itself: VSP swaps its own keys and values, AdaIN maps onto its own
    statistics; without shared keys both are plain attention."""
    _, twin = sd3
    x, timestep, context, y = (t[:1] for t in inputs(1, 10, 14, tokens=5, seed=3))
    if source == "in_batch":  # [a, a]: row 1's reference is row 0, the same image
        x, timestep, context, y = (t.repeat(2, *[1] * (t.dim() - 1)) for t in (x, timestep, context, y))
        styled = SELF[oracle](twin)
    else:
        styled = SELF[oracle](twin, reference=record_reference(twin, blocks_of(twin), lambda: twin_denoise(
            twin, x, timestep, context, y)))
    plain, actual = plain_and(twin, styled, x, timestep, context, y)
    assert relative_error(actual, plain) <= TOLERANCE


METHODS = {"vsp": lambda twin, blocks, **kw: with_vsp(twin, blocks, **kw),
           "vsp_strength": lambda twin, blocks, **kw: with_vsp(twin, blocks, strength=0.6, **kw),
           "style_aligned": lambda twin, blocks, **kw: with_style_aligned(twin, blocks, **kw),
           "style_aligned_1_1": lambda twin, blocks, **kw: with_style_aligned(twin, blocks, style_factor=1.1, **kw)}


@pytest.mark.parametrize("method", list(METHODS))
def test_oracles_change_the_targets_and_keep_the_reference(sd3, method):
    _, twin = sd3
    x, timestep, context, y = inputs(3, 10, 14, tokens=5, seed=3)
    plain, actual = plain_and(twin, METHODS[method](twin, blocks_of(twin)), x, timestep, context, y)
    assert relative_error(actual[:1], plain[:1]) <= TOLERANCE  # the reference row runs plain attention
    for row in (1, 2):
        assert relative_error(actual[row], plain[row]) > 1e-2


def test_options_blocks_and_attentions_matter():
    _, twin = build("sd35_medium")
    x, timestep, context, y = inputs(2, 10, 14, tokens=5, seed=8)
    runs = {"vsp": (with_vsp, {}), "vsp_half": (with_vsp, {"strength": 0.5}), "sa": (with_style_aligned, {}),
            "sa_1_1": (with_style_aligned, {"style_factor": 1.1}),
            "sa_unshared": (with_style_aligned, {"share": False}),
            "sa_no_query_adain": (with_style_aligned, {"adain_queries": False})}
    outputs = {}
    for name, (install, options) in runs.items():
        for blocks, attentions in (([0, 1, 2], ("joint", "image")), ([0, 1, 2], ("joint",)), ([1], ("joint", "image"))):
            with install(twin, blocks, attentions=attentions, **options):
                outputs[name, len(blocks), attentions] = twin_denoise(twin, x, timestep, context, y)[1]
    plain = twin_denoise(twin, x, timestep, context, y)[1]
    full, joint_only, block_1 = (3, ("joint", "image")), (3, ("joint",)), (1, ("joint", "image"))
    assert 1e-3 < relative_error(outputs[("vsp_half", *full)], plain) < relative_error(outputs[("vsp", *full)], plain)
    for name in runs:
        assert relative_error(outputs[(name, *joint_only)], outputs[(name, *full)]) > 1e-3  # attn2 is styled too
        assert relative_error(outputs[(name, *block_1)], outputs[(name, *full)]) > 1e-3
    for name in ("sa_1_1", "sa_unshared", "sa_no_query_adain"):
        assert relative_error(outputs[(name, *full)], outputs[("sa", *full)]) > 1e-3


@pytest.mark.parametrize("method", list(METHODS))
def test_external_reference_replays_the_in_batch_reference(sd3, method):
    """Row 0 recorded alone then replayed for rows 1.. gives what rows 1.. get with row 0 in their batch."""
    _, twin = sd3
    x, timestep, context, y = inputs(3, 10, 14, tokens=5, seed=5)
    blocks = [0, 1]
    with METHODS[method](twin, blocks):
        in_batch = twin_denoise(twin, x, timestep, context, y)
    reference = record_reference(twin, blocks, lambda: twin_denoise(twin, x[:1], timestep[:1], context[:1], y[:1]))
    assert len(reference.features) == (4 if twin.transformer_blocks[0].attn2 is not None else 2)
    with METHODS[method](twin, blocks, reference=reference):
        replayed = twin_denoise(twin, x[1:], timestep[1:], context[1:], y[1:])
    assert relative_error(replayed, in_batch[1:]) <= TOLERANCE
    assert relative_error(replayed, twin_denoise(twin, x[1:], timestep[1:], context[1:], y[1:])) > 1e-3


@pytest.mark.parametrize("method", ["vsp", "style_aligned"])
def test_external_reference_of_another_size_and_prompt_length(sd3, method):
    _, twin = sd3
    x, timestep, context, y = inputs(2, 10, 14, tokens=5, seed=6)
    ref_x, ref_t, ref_context, ref_y = inputs(1, 8, 12, tokens=9, seed=7)
    reference = record_reference(twin, blocks_of(twin), lambda: twin_denoise(twin, ref_x, ref_t, ref_context, ref_y))
    assert reference.features[(0, "joint")]["k"].shape[2] == 4 * 6  # the reference's own image rows
    styled = METHODS[method](twin, blocks_of(twin), reference=reference)
    plain, actual = plain_and(twin, styled, x, timestep, context, y)
    assert actual.shape == plain.shape and torch.isfinite(actual).all()
    for row in (0, 1):  # every row is a target
        assert relative_error(actual[row], plain[row]) > 1e-2


@pytest.mark.parametrize("method", ["vsp", "style_aligned_1_1"])
def test_chunks_each_have_their_reference(sd3, method):
    """[ref a, target a, ref b, target b] in 2 chunks: what [ref a, target a] and [ref b, target b] give apart."""
    _, twin = sd3
    x, timestep, context, y = inputs(4, 10, 14, tokens=5, seed=9)
    with METHODS[method](twin, blocks_of(twin), chunks=2):
        together = twin_denoise(twin, x, timestep, context, y)
    with METHODS[method](twin, blocks_of(twin)):
        apart = torch.cat([twin_denoise(twin, x[i:i + 2], timestep[i:i + 2], context[i:i + 2], y[i:i + 2])
                           for i in (0, 2)])
        assert relative_error(twin_denoise(twin, x, timestep, context, y)[2:], apart[2:]) > 1e-2  # one chunk
    assert relative_error(together, apart) <= TOLERANCE
