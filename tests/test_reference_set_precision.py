"""Combine Style References as ComfyUI runs a UNet on a GPU: in float16 and bfloat16 (a set adds no error beyond
the model's own rounding) and with a weight patch on the styled layers' keys (it acts as if the weights were
baked in, fully and partially loaded). One host: the pack's arithmetic is the same on both."""

from contextlib import nullcontext

import pytest
import torch

import comfy.model_management
import random_models
from helpers import encode, latent_reference, partial_loading, relative_error, run_node, sample, selected_layers
from helpers import style_aligned, vsp

pytestmark = pytest.mark.one_host
METHODS = {"vsp": vsp, "style_aligned": style_aligned}


def reference_set(models):
    first = latent_reference(models, seed=7)
    second = latent_reference(models, seed=11, size=12, reference_seed=5)
    (references,) = run_node("CombineStyleReferences", reference_1=first, weight_1=1.4, reference_2=second,
                             weight_2=0.6)
    return references


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", METHODS)
def test_a_set_adds_no_error_beyond_the_models_own_rounding(sd15, dtype, method):
    positive, negative = encode(sd15.clip, "a dog"), encode(sd15.clip, "")
    half = random_models.tiny_sd15(seed=0, dtype=dtype).model
    references = reference_set(sd15)
    runs = {name: [sample(style(model), positive, negative, batch=2) for model in (sd15.model, half)]
            for name, style in (("plain", lambda m: m), ("set", lambda m: METHODS[method](m, reference=references)))}
    assert torch.isfinite(runs["set"][1]).all()
    plain_error = relative_error(runs["plain"][1], runs["plain"][0])
    set_error = relative_error(runs["set"][1], runs["set"][0])
    assert plain_error > 0 and set_error <= 1.5 * plain_error + 1e-4, (set_error, plain_error)


@pytest.mark.parametrize("mode", ["full", "partial"])
@pytest.mark.parametrize("method", METHODS)
def test_a_weight_patch_on_the_styled_keys_acts_as_baked_weights(sd15, method, mode):
    positive, negative = encode(sd15.clip, "a dog"), encode(sd15.clip, "")
    references = reference_set(sd15)
    block, number, index = selected_layers(METHODS[method](sd15.model, reference=references))[-1]
    blocks = {"input": "input_blocks", "middle": "middle_block", "output": "output_blocks"}[block]
    name = f"{blocks}.{number}.1.transformer_blocks.{index}.attn1.to_k.weight"
    weights = sd15.model.model.diffusion_model.state_dict()
    delta = 0.5 * torch.randn(weights[name].shape, generator=torch.Generator().manual_seed(3))
    patched = sd15.model.clone()
    patched.add_patches({f"diffusion_model.{name}": (delta,)}, 1.0)
    baked = random_models.tiny_sd15(seed=0).model
    baked.model.diffusion_model.load_state_dict({**weights, name: weights[name] + delta})
    with partial_loading(0.5) if mode == "partial" else nullcontext():
        comfy.model_management.unload_all_models()
        through_patch = sample(METHODS[method](patched, reference=references), positive, negative, batch=2)
        comfy.model_management.unload_all_models()
        expected = sample(METHODS[method](baked, reference=references), positive, negative, batch=2)
    unpatched = sample(METHODS[method](sd15.model, reference=references), positive, negative, batch=2)
    assert relative_error(through_patch, expected) < 1e-5
    assert relative_error(unpatched, expected) > 1e-3  # the patch acts
