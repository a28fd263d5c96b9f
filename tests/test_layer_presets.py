"""Layer presets resolve from the actual UNet, per architecture, and never to nothing."""

import pytest

import comfy.model_patcher
import comfy.supported_models
from conftest import pack_submodule
from helpers import vsp

layers_module = pack_submodule("attention_patches.layers")
model_layers = pack_submodule("nodes.model_layers")


def full_size_unet_config(name):
    """The unet_config ComfyUI 0.3.75 detects for a real checkpoint (as in comfy/model_detection.py)."""
    common = {"use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4,
              "use_spatial_transformer": True, "legacy": False, "model_channels": 320,
              "use_temporal_attention": False, "use_temporal_resblock": False}
    if name == "SD15":
        return {**common, "adm_in_channels": None, "num_res_blocks": [2, 2, 2, 2],
                "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4],
                "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 768,
                "num_heads": 8, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]}
    return {**common, "num_classes": "sequential", "adm_in_channels": 2816, "num_res_blocks": [2, 2, 2],
            "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4], "transformer_depth_middle": 10,
            "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64,
            "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10]}


def meta_model(name):
    """A full-size model's module structure, without memory for weights."""
    config = getattr(comfy.supported_models, name)(full_size_unet_config(name))
    model = config.get_model({}, device="meta")
    return comfy.model_patcher.ModelPatcher(model, load_device="cpu", offload_device="cpu")


@pytest.fixture(scope="module")
def full_size_sites():
    return {name: model_layers.transformer_sites(meta_model(name), "test") for name in ("SD15", "SDXL")}


def test_late_preset_on_full_size_sdxl_is_the_papers_up_blocks_1(full_size_sites):
    layers = layers_module.resolve_layers(full_size_sites["SDXL"], "late_self_attention")
    assert layers == [("output", n, i) for n in (3, 4, 5) for i in (0, 1)]


def test_late_preset_on_full_size_sd15_is_output_blocks_6_to_11(full_size_sites):
    layers = layers_module.resolve_layers(full_size_sites["SD15"], "late_self_attention")
    assert layers == [("output", n, 0) for n in range(6, 12)]


def test_other_presets_on_full_size_models(full_size_sites):
    sd15, sdxl = full_size_sites["SD15"], full_size_sites["SDXL"]
    assert len(layers_module.resolve_layers(sd15, "all_self_attention")) == 16
    assert len(layers_module.resolve_layers(sdxl, "all_self_attention")) == 70
    assert len(layers_module.resolve_layers(sdxl, "decoder_self_attention")) == 36
    assert {b for b, _, _ in layers_module.resolve_layers(sd15, "decoder_self_attention")} == {"output"}


@pytest.mark.parametrize("preset", ["late_self_attention", "decoder_self_attention", "all_self_attention"])
def test_presets_patch_only_self_attention_on_the_test_models(models, preset):
    patched = vsp(models.model, layers=preset)
    replaces = patched.model_options["transformer_options"]["patches_replace"]
    assert set(replaces) == {"attn1"}
    assert replaces["attn1"]


def test_custom_layers_select_exactly_what_is_listed(sd15):
    patched = vsp(sd15.model, layers="custom", custom_layers="output.2, input.1.0")
    assert set(patched.model_options["transformer_options"]["patches_replace"]["attn1"]) == {
        ("output", 2, 0), ("input", 1, 0)}


def test_a_preset_that_selects_nothing_is_an_error():
    one_level = [layers_module.TransformerSite("output", 0, 1, 0), layers_module.TransformerSite("input", 1, 1, 0)]
    with pytest.raises(ValueError, match="layers: preset 'late_self_attention' selects no self-attention layer"):
        layers_module.resolve_layers(one_level, "late_self_attention")
