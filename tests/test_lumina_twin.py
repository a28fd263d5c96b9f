"""The diffusers Lumina 2 twin and the Z-Image twin (tests/support/lumina_twin.py) compute what ComfyUI's NextDiT
computes, their sampling (tests/oracles/lumina_style.py's twin_sample) what comfy.sample.sample does; and what a
plain diffusers Lumina2Transformer2DModel would get wrong on each."""

import contextlib

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_lumina2_to_diffusers
from diffusers.models.transformers.transformer_lumina2 import Lumina2RotaryPosEmbed

import comfy.sample
import comfy.samplers
from comfy.ldm.flux.math import apply_rope1
from helpers import relative_error
from oracles.lumina_attention import rotate
from oracles.lumina_style import flow_sigmas, twin_sample, with_style_aligned, with_vsp
from random_dits import lumina2_conditioning
from support.lumina_twin import UNUSED, build, config_of, inputs, sequence_ids, to_diffusers, twin_denoise

TOLERANCE = 1e-6
SHIFTS = {"lumina2": 6.0, "z_image": 3.0, "lumina2_grouped": 6.0}  # comfy.supported_models.Lumina2 / ZImage
MODELS = pytest.mark.parametrize("name", SHIFTS)


def comfy_forward(model, x, timestep, context):
    with torch.no_grad():
        return model.model.diffusion_model(x, timestep, context, context.shape[1], transformer_options={})


def comfy_state(model):
    return {k: v.detach().clone() for k, v in model.model.diffusion_model.state_dict().items()}


@MODELS
@pytest.mark.parametrize("height,width", [(8, 8), (10, 14), (9, 13)], ids=["square", "wide", "padded"])
def test_twin_equals_comfy_diffusion_model(name, height, width):
    model, twin = build(name)
    x, timestep, context = inputs(2, height, width)
    expected = comfy_forward(model, x, timestep, context)
    actual = twin_denoise(twin, x, timestep, context)
    assert actual.shape == expected.shape == x.shape
    error = relative_error(actual, expected)
    print(f"{name} {height}x{width}: relative error {error:.2e}")
    assert error <= TOLERANCE
    for t, c in [(timestep.flip(0), context), (timestep, context.flip(0)), (1 - timestep, context)]:
        assert relative_error(twin_denoise(twin, x, t, c), expected) > 1e3 * TOLERANCE  # each input matters


@MODELS
def test_every_weight_is_mapped_both_ways(name):
    """Every ComfyUI weight lands in exactly one twin weight (the fused qkv split into q, k, v by heads, grouped keys
    on Lumina 2) and every twin weight comes from one; an unknown ComfyUI key is refused."""
    model, twin = build(name)
    state, config = comfy_state(model), config_of(model.model.model_config.unet_config)
    mapped, twin_state = to_diffusers(state, config), twin.state_dict()
    assert set(mapped) == set(twin_state) and all(torch.equal(mapped[k], twin_state[k]) for k in mapped)
    assert sum(v.numel() for v in mapped.values()) == sum(v.numel() for k, v in state.items() if k not in UNUSED)
    for key in (k for k in state if k.endswith("attention.qkv.weight")):
        prefix = key[:-len("attention.qkv.weight")] + "attn.to_"
        assert torch.equal(torch.cat([mapped[prefix + n + ".weight"] for n in "qkv"]), state[key])
    if name != "z_image":  # grouped keys: 1 (2) key/value heads for 2 (4) query heads
        assert mapped["layers.0.attn.to_k.weight"].shape[0] == mapped["layers.0.attn.to_q.weight"].shape[0] // 2
    with pytest.raises(KeyError, match="no diffusers name"):
        to_diffusers({**state, "layers.0.attention.extra.weight": torch.zeros(1)}, config)


def test_key_names_agree_with_diffusers_single_file_converter():
    """diffusers' convert_lumina2_to_diffusers (for the original checkpoint, whose names ComfyUI keeps) names every
    weight as to_diffusers does; only its qkv split is hard-coded to the full-size model's rows."""
    model, _ = build("lumina2")
    state = {k: v for k, v in comfy_state(model).items() if not k.endswith("qkv.weight")}
    theirs = convert_lumina2_to_diffusers(dict(state))
    ours = to_diffusers(state, config_of(model.model.model_config.unet_config))
    assert set(theirs) == set(ours)


@pytest.mark.parametrize("override", [{"qk_norm": False}, {"clip_text_dim": 32}, {"axes_dims": [8, 24]}])
def test_refuses_what_no_twin_computes(override):
    with pytest.raises(ValueError):
        config_of({**build("lumina2")[0].model.model_config.unet_config, **override})


@MODELS
def test_positions_turn_as_comfyui_turns(name):
    """The twin's RoPE (diffusers' tables at ComfyUI's positions: caption (i + 1, 0, 0), image (caption + 1, r, c),
    padding (0, 0, 0)) rotates as the freqs_cis ComfyUI hands its main layers."""
    model, twin = build(name)
    x, timestep, context = inputs(1, 10, 14)
    seen = []
    hook = model.model.diffusion_model.layers[0].register_forward_pre_hook(lambda m, a: seen.append(a[2]))
    try:
        comfy_forward(model, x, timestep, context)
    finally:
        hook.remove()
    multiple = 32 if name == "z_image" else 1
    text, image = 7 + -7 % multiple, 35
    ids = sequence_ids(text, 5, 7, -image % multiple)
    pe = seen[0]  # (batch, rows, 1, head dim / 2, 2, 2)
    q = torch.randn(1, pe.shape[1], 2, 2 * pe.shape[3], generator=torch.Generator().manual_seed(1))
    expected = apply_rope1(q, pe)  # (batch, rows, heads, head dim)
    actual = rotate(q.transpose(1, 2), twin.rope_embedder.freqs(ids)).transpose(1, 2)
    assert relative_error(actual, expected) <= 1e-6


@MODELS
def test_what_diffusers_lumina2_alone_gets_wrong(name):
    """Diffusers' own positions (caption from 0, image at the caption's length) shift axis 0 for every row alike on
    Lumina 2 (RoPE sees differences only: the same output), not on Z-Image, whose padding rows stay at 0; diffusers'
    QK-norm eps (1e-5; ComfyUI's is float32's) moves the output past the tolerance; on Z-Image, diffusers' SiLU
    before the blocks' modulation moves it far; positions matter (the QK norms are sharp: transposed axes)."""
    model, twin = build(name)
    x, timestep, context = inputs(2, 8, 8)
    expected = comfy_forward(model, x, timestep, context)
    positions, blocks = twin.rope_embedder, [*twin.context_refiner, *twin.noise_refiner, *twin.layers]
    own_freqs, eps = type(positions).freqs, torch.finfo(torch.float32).eps

    def set_freqs(change):
        return (lambda: setattr(positions, "freqs", lambda ids: own_freqs(positions, change(ids))),
                lambda: delattr(positions, "freqs"))

    def set_eps(value):
        return lambda: [setattr(b.attn.norm_q, "eps", value) or setattr(b.attn.norm_k, "eps", value) for b in blocks]

    cases = {"diffusers_positions": set_freqs(lambda ids: ids - (ids[:, :1] > 0).long() * torch.tensor([1, 0, 0])),
             "transposed": set_freqs(lambda ids: ids[:, [0, 2, 1]]), "eps": (set_eps(1e-5), set_eps(eps))}
    if name == "z_image":
        modulated = [*twin.noise_refiner, *twin.layers]
        cases["silu"] = (lambda: [setattr(b.norm1, "silu", torch.nn.SiLU()) for b in modulated],
                         lambda: [setattr(b.norm1, "silu", torch.nn.Identity()) for b in modulated])
    errors = {}
    for case, (break_it, restore) in cases.items():
        break_it()
        try:
            errors[case] = relative_error(twin_denoise(twin, x, timestep, context), expected)
        finally:
            restore()
    print(name, {k: f"{v:.1e}" for k, v in errors.items()})
    assert (errors["diffusers_positions"] <= TOLERANCE) == (name != "z_image")
    assert errors["eps"] > 3 * TOLERANCE and errors["transposed"] > 1e4 * TOLERANCE
    assert errors.get("silu", 1.0) > 1e4 * TOLERANCE
    assert relative_error(twin_denoise(twin, x, timestep, context), expected) <= TOLERANCE


def test_diffusers_own_rope_embedder_serves_lumina2():
    """On Lumina 2 the twin's positions can be diffusers' own Lumina2RotaryPosEmbed (theta 10000, as it hard-codes)."""
    model, twin = build("lumina2")
    x, timestep, context = inputs(2, 10, 14)
    expected = comfy_forward(model, x, timestep, context)
    own, twin.rope_embedder = twin.rope_embedder, Lumina2RotaryPosEmbed(10000, [8, 12, 12], [300, 512, 512])
    try:
        assert relative_error(twin_denoise(twin, x, timestep, context), expected) <= TOLERANCE
    finally:
        twin.rope_embedder = own


@MODELS
def test_twin_x0_and_sigmas_are_comfyui(name):
    model, twin = build(name)
    x, sigma, context = inputs(2, 8, 8, seed=1)
    model_sampling = model.get_model_object("model_sampling")
    assert torch.equal(model_sampling.timestep(sigma), sigma) and model_sampling.shift == SHIFTS[name]
    expected = model_sampling.calculate_denoised(sigma, comfy_forward(model, x, sigma, context), x)
    assert relative_error(x - sigma.view(-1, 1, 1, 1) * twin_denoise(twin, x, sigma, context), expected) <= TOLERANCE
    for steps in (1, 4, 20):
        comfy_sigmas = comfy.samplers.calculate_sigmas(model_sampling, "simple", steps).float()
        assert torch.allclose(flow_sigmas(steps, SHIFTS[name]), comfy_sigmas, rtol=1e-6, atol=0)
        assert flow_sigmas(steps, SHIFTS[name])[0] == 1.0


@MODELS
@pytest.mark.parametrize("steps,cfg", [(1, 1.0), (4, 1.0), (4, 3.0)])
def test_twin_sampling_equals_comfy_sampling(name, steps, cfg):
    """twin_sample with diffusers' own processors gives what comfy.sample.sample gives (after process_latent_out)."""
    model, twin = build(name)
    noise = comfy.sample.prepare_noise(torch.zeros(2, 16, 8, 10), 1)
    positive, negative = lumina2_conditioning(0), lumina2_conditioning(1)
    expected = comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", positive, negative,
                                   torch.zeros_like(noise), seed=1, disable_pbar=True)
    plain = lambda **kw: contextlib.nullcontext()  # noqa: E731
    actual = model.model.process_latent_out(twin_sample(twin, noise, steps, cfg, positive, negative, plain,
                                                        SHIFTS[name]))
    print(f"{name} {steps} steps, cfg {cfg}: relative error {relative_error(actual, expected):.2e}")
    assert relative_error(actual, expected) <= 10 * TOLERANCE
    other = twin_sample(twin, noise, steps, cfg, lumina2_conditioning(2), negative, plain, SHIFTS[name])
    assert relative_error(model.model.process_latent_out(other), expected) > 1e-3


@MODELS
def test_an_external_reference_replays_the_in_batch_one(name):
    """One step at cfg 1 (sigma 1: a latent is its noise): the reference recorded from noise row 0 with the cond
    prompt styles rows 1.. as row 0 does in their batch; and the style acts."""
    _, twin = build(name)
    noise = comfy.sample.prepare_noise(torch.zeros(3, 16, 8, 8), 2)
    positive, negative = lumina2_conditioning(0), lumina2_conditioning(1)
    plain = lambda **kw: contextlib.nullcontext()  # noqa: E731
    unstyled = twin_sample(twin, noise[1:], 1, 1.0, positive, negative, plain, SHIFTS[name])
    for install in (lambda **kw: with_vsp(twin, [0, 1], **kw), lambda **kw: with_style_aligned(twin, [1], **kw),
                    lambda **kw: with_style_aligned(twin, [0], shift=False, style_factor=1.1, **kw)):
        in_batch = twin_sample(twin, noise, 1, 1.0, positive, negative, install, SHIFTS[name])
        external = twin_sample(twin, noise[1:], 1, 1.0, positive, negative, install, SHIFTS[name],
                               reference=(torch.zeros_like(noise[:1]), noise[:1], positive))
        assert relative_error(external, in_batch[1:]) <= 1e-5 and relative_error(external, unstyled) > 1e-3
        reference_alone = twin_sample(twin, noise[:1], 1, 1.0, positive, negative, plain, SHIFTS[name])
        assert relative_error(in_batch[:1], reference_alone) <= 1e-5


@MODELS
def test_oracles_switched_off_or_toward_themselves_are_the_plain_twin(name):
    """VSP at strength 0 or on a batch of one latent and prompt repeated (each target its reference's twin) is the
    plain twin; StyleAligned there is not (its own image keys and values appended a second time), in both places."""
    _, twin = build(name)
    x, timestep, context = inputs(1, 8, 8, seed=3)
    x, timestep, context = x.expand(3, -1, -1, -1), timestep.expand(3), context.expand(3, -1, -1)
    plain = twin_denoise(twin, x, timestep, context)
    for styled in (with_vsp(twin, [0, 1], strength=0.0), with_vsp(twin, [0, 1])):
        with styled:
            assert relative_error(twin_denoise(twin, x, timestep, context), plain) <= 1e-5
    for shift in (True, False):
        with with_style_aligned(twin, [0, 1], shift=shift):
            styled = twin_denoise(twin, x, timestep, context)
        assert relative_error(styled[:1], plain[:1]) <= 1e-5 and relative_error(styled[1:], plain[1:]) > 1e-3
