"""Layer presets resolve from the actual UNet, per architecture, and never to nothing."""

import copy

import pytest

import comfy.model_patcher
import comfy.supported_models
from conftest import pack_submodule
import random_dits
from helpers import style_aligned, vsp
from random_models import FULL_SD15_UNET, FULL_SDXL_UNET

layers_module = pack_submodule("attention_patches.layers")
architectures = pack_submodule("glue.architectures")
FULL_UNET_CONFIGS = {"SD15": FULL_SD15_UNET, "SDXL": FULL_SDXL_UNET}


def meta_model(name):
    """A full-size model's module structure, without memory for weights."""
    config = getattr(comfy.supported_models, name)(copy.deepcopy(FULL_UNET_CONFIGS[name]))
    model = config.get_model({}, device="meta")
    return comfy.model_patcher.ModelPatcher(model, load_device="cpu", offload_device="cpu")


@pytest.fixture(scope="module")
def full_size_sites():
    return {name: list(architectures.adapter_for(meta_model(name), "test").sites) for name in ("SD15", "SDXL")}


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


injection = pack_submodule("attention_patches.injection")


def test_plug_and_play_sites_on_full_size_models_are_the_authors_and_sdxls_mapping(full_size_sites):
    sd15, sdxl = full_size_sites["SD15"], full_size_sites["SDXL"]
    # SD1.5: decoder layers 4-11 (up_blocks[1].attentions[1, 2], up_blocks[2..3]) and up_blocks[1].resnets[1]
    assert injection.resolve_attention_sites(sd15, "plug_and_play") == [("output", n, 0) for n in range(4, 12)]
    assert injection.resolve_feature_blocks(sd15, 12, "plug_and_play") == [4]
    # SDXL: the same rule on its decoder (coarsest attention level = output blocks 0-2, 10 blocks deep)
    assert injection.resolve_attention_sites(sdxl, "plug_and_play") == [
        ("output", n, i) for n in (1, 2) for i in range(10)] + [("output", n, i) for n in (3, 4, 5) for i in (0, 1)]
    assert injection.resolve_feature_blocks(sdxl, 9, "plug_and_play") == [1]
    model = meta_model("SD15")
    assert architectures.adapter_for(model, "test").residual_branch_end(model, 4, "feature_sites") == "diffusion_model.output_blocks.4.0.out_layers.3"


def flux1_adapter():
    """Flux.1's block counts (19 double, 38 single), as a full-size model's adapter holds them."""
    flux = pack_submodule("glue.architectures.flux")
    return flux.FluxAdapter(19, 38, 2, 10000, (16, 56, 56))


def test_flux_presets_are_stable_flows_vital_layers_and_alignedgens_single_blocks():
    adapter = flux1_adapter()
    assert architectures.resolve_layers(adapter, "auto", "", "visual_style_prompting") == [
        ("double", 0), ("double", 1), ("double", 17), ("double", 18),
        ("single", 6), ("single", 9), ("single", 34), ("single", 35), ("single", 37)]
    assert architectures.resolve_layers(adapter, "auto", "", "style_aligned") == [("single", i) for i in range(38)]
    assert len(adapter.resolve("all_blocks")) == 57
    assert adapter.resolve("custom", "single.3, double, single.3") == [("single", 3), *(("double", i) for i in range(19))]


@pytest.mark.parametrize("preset,custom,message", [
    ("late_self_attention", "", r"layers: 'late_self_attention' is a preset of another model family; this model is "
                                r"Flux \(Flux.1, Kontext, Chroma\): choose auto or one of vital_blocks, single_blocks"),
    ("custom", "output.3", r"custom_layers: cannot read 'output.3'; on Flux \(Flux.1, Kontext, Chroma\) expected double.N"),
    ("custom", "single.38", r"custom_layers: this model has no single.38 \(19 double and 38 single blocks\)"),
    ("custom", " , ", r"custom_layers: empty"),
])
def test_flux_layer_choices_are_checked_by_name(preset, custom, message):
    with pytest.raises(ValueError, match=message):
        architectures.resolve_layers(flux1_adapter(), preset, custom, "visual_style_prompting")


def test_a_unet_refuses_a_flux_preset(sd15):
    with pytest.raises(ValueError, match=r"layers: 'vital_blocks' is a preset of another model family; this model is "
                                         r"UNet \(SD1.x, SD2.x, SDXL\)"):
        vsp(sd15.model, layers="vital_blocks")


def test_shared_group_norm_on_is_refused_on_flux():
    with pytest.raises(ValueError, match="shared_group_norm: on has no meaning on Flux"):
        style_aligned(random_dits.tiny_flux(), layers="auto", shared_group_norm="on")
