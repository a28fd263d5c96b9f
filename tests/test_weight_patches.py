"""Weight patches reach every layer this pack stands in for (issue 26).

ComfyUI applies a weight patch (a model merge, LoRA, LoCon, a LyCORIS norm patch) by the weight's name
in the model. StyleAligned's shared GroupNorms and Style Injection's ResBlock outputs are object
patches standing in for layers: each test below puts patches on a MODEL, styles it, and checks the
result against the same node on a fresh model whose stored weights are already the patched ones
("baked"), in full and in partial (lowvram) loading; then that a plain run of the patched MODEL after
the styled one is bit-identical to a plain run of it after a fresh load (ComfyUI keeps a model loaded
with its patches applied across the clones of one MODEL, so a patch skipped while the style's stand-ins
were in place would stay skipped). The styled clone is always the first one loaded."""

import copy
from contextlib import nullcontext

import pytest
import torch

import comfy.model_management
import comfy.sample
import comfy.sd
import comfy.supported_models
import nodes
import random_models
from helpers import assert_relative_close, encode, invert, partial_loading, relative_error, run_node, style_aligned

SIZE = 8
STEPS = 3
LOADINGS = ["full", "partial"]


def loading(mode):
    return partial_loading(0.5) if mode == "partial" else nullcontext()


def sample(model, positive, negative, start=None, batch=3, cfg=4.0):
    """KSampler's sampling; from start (an inverted latent) with no noise added, else from noise."""
    if start is None:
        latent = torch.zeros(batch, 4, SIZE, SIZE)
        noise = comfy.sample.prepare_noise(latent, 0)
        return comfy.sample.sample(model, noise, STEPS, cfg, "euler", "normal", positive, negative, latent, seed=0,
                                   disable_pbar=True)
    return comfy.sample.sample(model, torch.zeros_like(start), STEPS, cfg, "euler", "ddim_uniform", positive, negative,
                               start, disable_noise=True, disable_pbar=True, seed=0)


def fresh_load(model):
    """ComfyUI loads model anew, as after a restart: nothing of an earlier clone's loading is reused."""
    comfy.model_management.unload_all_models()
    comfy.model_management.load_models_gpu([model])


def baked(patched) -> "comfy.model_patcher.ModelPatcher":
    """A new model whose stored weights are patched's with its weight patches applied (by ComfyUI, with
    no style node anywhere), and no patches."""
    fresh_load(patched)
    weights = {key: value.clone() for key, value in patched.model.diffusion_model.state_dict().items()}
    comfy.model_management.unload_all_models()
    model = unet(seed=99, dtype=patched.model.get_dtype(), manual_cast_dtype=patched.model.manual_cast_dtype)
    model.model.diffusion_model.load_state_dict(weights)
    return model


def unet(seed, dtype=torch.float32, manual_cast_dtype=None):
    """The tiny SD1.5 UNet alone (the tests' CLIP encodes for every tiny SD1.5)."""
    config = comfy.supported_models.SD15(copy.deepcopy(random_models.TINY_SD15_UNET))
    return random_models.model_patcher(config, seed, dtype, manual_cast_dtype)


def merged(sd15):
    other = unet(seed=5)
    (model,) = nodes.NODE_CLASS_MAPPINGS["ModelMergeSimple"]().merge(sd15.model, other, 0.5)
    return model


def group_norm_patch(model):
    """A LyCORIS file's w_norm/b_norm on every GroupNorm of the UNet (a diff added to the norm's weights)."""
    unet = model.get_model_object("diffusion_model")
    generator = torch.Generator().manual_seed(4)
    lora = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.GroupNorm):
            key = f"lora_unet_{name.replace('.', '_')}"
            lora[f"{key}.w_norm"] = 0.5 * torch.randn(module.weight.shape, generator=generator)
            lora[f"{key}.b_norm"] = 0.5 * torch.randn(module.bias.shape, generator=generator)
    return lora


def loaded_lora(model, lora, patched_weights):
    """LoraLoader's model half; every key of the file must have become a patch."""
    patched, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)
    assert len(patched.patches) == patched_weights
    return patched


def with_norm_patch(model):
    lora = group_norm_patch(model)
    return loaded_lora(model, lora, len(lora))  # one weight or bias each


def check_styled_and_after(patched, style, positive, negative, mode, start_of=None, tolerance=1e-5):
    """The style on patched == the style on baked(patched); a plain run after it == after a fresh load."""
    expected_model = baked(patched)
    start = None if start_of is None else start_of(expected_model)
    expected = sample(style(expected_model), positive, negative, start)
    start = None if start_of is None else start_of(patched)
    comfy.model_management.unload_all_models()  # the styled clone is the first one ComfyUI loads
    with loading(mode):
        styled = style(patched)
        out = sample(styled, positive, negative, start)
        if mode == "partial":
            assert patched.model.model_lowvram  # some layers were cast and patched per layer
        after = sample(patched, positive, negative, start)
    assert_relative_close(out, expected, tolerance)
    unstyled = sample(patched, positive, negative, start)
    assert relative_error(out, unstyled) > 1e-3  # the style acts, so its layers saw the patched weights
    with loading(mode):
        comfy.model_management.unload_all_models()
        never_styled = sample(patched, positive, negative, start)
    assert torch.equal(after, never_styled)
    comfy.model_management.unload_all_models()


@pytest.mark.parametrize("mode", LOADINGS)
@pytest.mark.parametrize("patch", ["model_merge", "group_norm_lycoris"])
def test_style_aligned_with_shared_group_norm_keeps_every_weight_patch(sd15, patch, mode):
    patched = merged(sd15) if patch == "model_merge" else with_norm_patch(sd15.model)
    positive, negative = encode(sd15.clip, "a cat"), encode(sd15.clip, "")
    # the patch matters at the size of this test's tolerance, norms included
    assert relative_error(sample(baked(patched), positive, negative), sample(sd15.model, positive, negative)) > 1e-3

    def style(model):
        styled = style_aligned(model, shared_group_norm="on")
        assert [type(b).__name__ for b in styled.object_patches["diffusion_model.input_blocks.1.0.in_layers.0"]
                .stand_in_behaviours] == ["SharedGroupNorm"]
        return styled

    check_styled_and_after(patched, style, positive, negative, mode)


def shared_norms(model):
    styled = style_aligned(model, shared_group_norm="on")
    assert [type(b).__name__ for b in styled.object_patches["diffusion_model.input_blocks.1.0.in_layers.0"]
            .stand_in_behaviours] == ["SharedGroupNorm"]
    return styled


# partial: measured 5.1e-2 (e4m3 keeps 3 mantissa bits of the patched norm weights); the patch's own
# effect on the styled output is 0.36, so a dropped patch stays far outside
FP8_TOLERANCE = {"full": 1e-5, "partial": 1e-1}


@pytest.mark.parametrize("mode", LOADINGS)
def test_a_norm_patch_reaches_the_shared_group_norms_of_an_fp8_model(sd15, mode):
    """fp8 weights cast per layer to bfloat16 (manual cast): the joint norms take the patched, cast
    weights. Full loading stores the patched weights rounded to fp8, as the baked model holds them:
    equal. Partial loading patches them per layer in bfloat16 without that rounding: within fp8's
    rounding of the norms' weights, well below the patch's own effect (checked). Under inference mode, as
    ComfyUI's executor runs (its stochastic rounding into fp8 refuses weights that require grad)."""
    with torch.inference_mode():
        patched = with_norm_patch(unet(seed=0, dtype=torch.float8_e4m3fn, manual_cast_dtype=torch.bfloat16))
        positive, negative = encode(sd15.clip, "a cat"), encode(sd15.clip, "")
        unpatched = unet(seed=0, dtype=torch.float8_e4m3fn, manual_cast_dtype=torch.bfloat16)
        effect = relative_error(sample(shared_norms(unpatched), positive, negative),
                                sample(shared_norms(baked(patched)), positive, negative))
        assert effect > 3 * FP8_TOLERANCE["partial"]
        check_styled_and_after(patched, shared_norms, positive, negative, mode, tolerance=FP8_TOLERANCE[mode])


def locon_on_injected_conv(sd15, path="diffusion_model.output_blocks.3.0.out_layers.3"):
    """A LoCon (conv LoRA, rank 4) on the convolution Style Injection stands in for."""
    conv = sd15.model.get_model_object(path)
    generator = torch.Generator().manual_seed(6)
    key = f"lora_unet_{path.removeprefix('diffusion_model.').replace('.', '_')}"
    return {f"{key}.lora_down.weight": 0.3 * torch.randn(4, conv.in_channels, 3, 3, generator=generator),
            f"{key}.lora_up.weight": 0.3 * torch.randn(conv.out_channels, 4, 1, 1, generator=generator),
            f"{key}.alpha": torch.tensor(4.0)}


@pytest.mark.parametrize("mode", LOADINGS)
def test_style_injection_keeps_a_locon_on_the_layer_it_stands_in_for(sd15, mode):
    patched = loaded_lora(sd15.model, locon_on_injected_conv(sd15), 1)
    positive, negative = encode(sd15.clip, "a cat"), encode(sd15.clip, "")
    empty = encode(sd15.clip, "")
    content = torch.randn(1, 4, SIZE, SIZE, generator=torch.Generator().manual_seed(11))
    inversions = {}

    def inversion(model):
        key = id(model)
        if key not in inversions:
            inverted, trajectory = invert(model, content, empty, empty, steps=STEPS, scheduler="ddim_uniform")
            inversions[key] = (inverted["samples"], trajectory)
        return inversions[key]

    def style(model):
        (styled,) = run_node("StyleInjection", model=model, inversion=inversion(model)[1], content_features=None,
                             clip=sd15.clip, source_prompt="", feature_fraction=1.0, attention_fraction=0.0,
                             attention_sites="plug_and_play", custom_attention_sites="", feature_sites="plug_and_play",
                             custom_feature_sites="", cross_attention=False, cache_megabytes=0, cache_on_cpu=False,
                             conditioning=None)
        assert list(styled.object_patches) == ["diffusion_model.output_blocks.3.0.out_layers.3"]
        return styled

    check_styled_and_after(patched, style, positive, negative, mode, start_of=lambda model: inversion(model)[0])
