"""Each node finds its model family's adapter (glue/architectures/) from the model object and refuses,
naming itself and the covered families, a model no adapter covers; every node installs through the
one path of glue/site_patches.py."""

import pytest
import torch

import random_dits
from conftest import pack_submodule
from helpers import run_node, style_aligned, vsp

architectures = pack_submodule("glue.architectures")
site_patches = pack_submodule("glue.site_patches")


def test_unet_families_get_the_unet_adapter_with_their_sites(sd15, sdxl):
    for models, downscale in ((sd15, 2), (sdxl, 2)):
        adapter = architectures.adapter_for(models.model, "test")
        assert type(adapter).__name__ == "UNetAdapter"
        assert adapter.downscale == downscale
        unet = models.model.get_model_object("diffusion_model")
        blocks = [getattr(t, "transformer_blocks") for part in (unet.input_blocks, [unet.middle_block], unet.output_blocks)
                  for block in part for t in block if hasattr(t, "transformer_blocks")]
        assert len(adapter.layers()) == sum(len(b) for b in blocks) > 0


def test_a_node_not_on_flux_refuses_it_naming_itself_and_the_covered_families():
    flux = random_dits.tiny_flux()
    with pytest.raises(ValueError, match=r"PromptToPromptEdit works on UNet models \(SD1.x, SD2.x, SDXL\); this model "
                                         r"is Flux$"):
        architectures.adapter_for(flux, "PromptToPromptEdit")


def test_the_style_nodes_take_flux_and_name_both_families_for_another_model(sd15):
    flux = random_dits.tiny_flux()
    adapter = architectures.adapter_for(flux, "test", architectures.ADAPTERS)
    assert type(adapter).__name__ == "FluxAdapter" and (adapter.double, adapter.single) == (2, 2)
    patched = vsp(flux, layers="auto")
    assert set(patched.model_options["transformer_options"]["patches_replace"]["dit"]) == {
        ("double_block", 0), ("double_block", 1), ("single_block", 0), ("single_block", 1)}

    class NotAUNet(torch.nn.Module):
        pass

    other = sd15.model.clone()
    other.add_object_patch("diffusion_model", NotAUNet())
    with pytest.raises(ValueError, match=r"StyleAlignedAttention works on UNet models \(SD1.x, SD2.x, SDXL\), Flux "
                                         r"models \(Flux.1, Kontext, Chroma\), SD3 models \(SD3, SD3.5\), Qwen-Image "
                                         r"models and Lumina 2 models \(Lumina Image 2.0, Z-Image\); this model is "
                                         r"NotAUNet"):
        style_aligned(other)


def test_a_refused_claim_installs_nothing(sd15):
    """All sites are checked before any is installed: a conflict at the last leaves the clone as it was."""
    model = sd15.model.clone()
    adapter = architectures.adapter_for(model, "test")
    first, *_, last = adapter.layers()
    model.set_model_attn1_replace(lambda q, k, v, extra: q, *last)
    before = dict(model.model_options["transformer_options"]["patches_replace"]["attn1"])
    with pytest.raises(site_patches.LayerConflictError, match=r"already have their self-attention replaced by another "
                                                              r"node \(function\); Mine would overwrite it"):
        site_patches.install_site_patches(model, adapter, {first: object(), last: object()}, "attn1",
                                          site_patches.Claim("Mine"))
    assert model.model_options["transformer_options"]["patches_replace"]["attn1"] == before


def test_the_tiny_flux_samples_on_this_host():
    flux = random_dits.tiny_flux()
    assert type(flux.model.diffusion_model).__name__ == "Flux"
    x = torch.randn(1, 16, 8, 8)
    sigma = torch.tensor([0.5])
    context = random_dits.flux_conditioning(0)[0]
    out = flux.model.apply_model(x, sigma, c_crossattn=context[0], y=context[1]["pooled_output"],
                                 guidance=torch.tensor([3.5]))
    assert out.shape == x.shape and torch.isfinite(out).all()
