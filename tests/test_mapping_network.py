"""StyleDiffusion's mapping network (the authors' variant of the value-input inversion): a small
network per step turns the image's CLIP vision tokens into the step's scale and shift."""

import pytest
import torch

import comfy.model_management
import random_models
from conftest import pack_submodule
from helpers import encode, relative_error, run_node
from support.inversion import PROMPT, image_latent, invert, sample_from_top
from support.inversion import tame  # noqa: F401 (a fixture)

mapping = pack_submodule("inversion.mapping_network")
value_input = pack_submodule("inversion.value_input")
value_inversion = pack_submodule("glue.value_inversion")
owners = pack_submodule("nodes.style_inputs")


@pytest.fixture(scope="module")
def vision(tmp_path_factory):
    """5 tokens of 32 channels: the tiny UNet's context width, so no Linear (as ViT-B/16 on SD1.5)."""
    return random_models.tiny_clip_vision(tmp_path_factory.mktemp("vision") / "tiny_clip_vision.json")


@pytest.fixture(scope="module")
def wide_vision(tmp_path_factory):
    """48 channels against the UNet's 32: the Linear on the feature axis comes first."""
    return random_models.tiny_clip_vision(tmp_path_factory.mktemp("wide") / "wide_clip_vision.json", hidden_size=48)


def picture(models, latent):
    """The image the latent stands for: VAE Decode of it, one image (1, height, width, 3)."""
    return models.vae.decode(latent["samples"]).clamp(0, 1)


def tokens(seed=0, shape=(1, 5, 32)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_the_network_has_the_authors_layers_and_shapes():
    authors = mapping.MappingNetwork(197, 768, 77, 768)
    assert isinstance(authors.to_channels, torch.nn.Identity)
    assert (authors.conv_start.in_channels, authors.conv_start.out_channels) == (197, 154)
    assert [type(m) for m in authors.conv_block] == [torch.nn.Conv1d, torch.nn.BatchNorm1d, torch.nn.LeakyReLU]
    scale, shift = authors(tokens(shape=(1, 197, 768)))
    assert scale.shape == shift.shape == (77, 768)
    vit_l_on_sdxl = mapping.MappingNetwork(257, 1024, 77, 2048)
    assert (vit_l_on_sdxl.to_channels.in_features, vit_l_on_sdxl.to_channels.out_features) == (1024, 2048)
    scale, shift = vit_l_on_sdxl(tokens(shape=(1, 257, 1024)))
    assert scale.shape == shift.shape == (77, 2048)


def test_batch_norm_uses_the_image_statistics_in_any_mode():
    network = mapping.mapping_network(tokens(shape=(1, 5, 48)), 3, 32)
    norm = network.conv_block[1]
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.normal_()
    assert norm.running_mean is None and norm.running_var is None  # nothing carried between calls
    for image in (tokens(1, (1, 5, 48)), tokens(2, (1, 5, 48)) * 3 + 1):
        with torch.no_grad():
            rows = network.conv_block[0](network.conv_start(network.to_channels(image)))[0]  # (6, 32)
            mean, variance = rows.mean(1, keepdim=True), ((rows - rows.mean(1, keepdim=True)) ** 2).mean(1, keepdim=True)
            normed = (rows - mean) / torch.sqrt(variance + norm.eps) * norm.weight[:, None] + norm.bias[:, None]
            by_hand = network.conv_end(torch.where(normed > 0, normed, 0.01 * normed)[None])[0]
            for train in (True, False):
                network.train(train)
                scale, shift = network(image)
                torch.testing.assert_close(torch.cat([scale, shift]), by_hand, rtol=1e-5, atol=1e-5)


def test_the_initialisation_is_seeded_and_leaves_the_global_generator_alone():
    state = torch.random.get_rng_state()
    first, second = (mapping.mapping_network(tokens(), 77, 32) for _ in range(2))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters()))
    other = mapping.mapping_network(tokens(), 77, 32, seed=1)
    assert not torch.equal(first.conv_start.weight, other.conv_start.weight)


def test_each_step_trains_on_from_a_copy_of_the_previous_steps_network():
    """The pure loop on a made-up denoiser whose x0 is the mean of the values (2 reaches every target)."""
    image, started = tokens(), []

    class Recorded(mapping.NetworkModulation):
        def warm_started(self):
            copy = super().warm_started()
            started.append((self.network, copy.network))
            return Recorded(copy.network, copy.tokens)

    def step(x, sigma, values):
        scale, shift = values
        return torch.zeros_like(x) + (scale.mean() + shift.mean()), {}

    sigmas = torch.tensor([0.0, 1.0, 2.0, 3.0])
    latents = torch.stack([torch.full((1, 1, 2, 2), 2.0 + k) for k in range(4)])
    settings = value_input.ValueInversionSettings(inner_iterations=8, early_stop=False, attention_weight=0.0)
    initial = Recorded(mapping.mapping_network(image, 3, 4), image)
    result = value_input.invert_value_inputs(step, sigmas, latents, [{}] * 4, initial, lambda s: torch.ones(()),
                                             settings)
    assert len(started) == 3 and started[0][0] is initial.network
    for k, (previous, trained) in enumerate(started):
        assert all(p is not q for p, q in zip(previous.parameters(), trained.parameters()))  # Adam's state is new
        if k:
            assert previous is started[k - 1][1]  # warm-started from the last step's final weights
        scale, shift = result.parameters[k]
        with torch.no_grad():
            torch.testing.assert_close(torch.cat(trained(image)), torch.cat([scale, shift]))
        assert not scale.requires_grad and scale.shape == shift.shape == (3, 4)
    assert not torch.equal(started[0][0].conv_end.weight, started[0][1].conv_end.weight)  # it trained
    assert all(l[-1] < l[0] for l in result.losses)


def test_the_network_reconstructs_at_cfg_7_5_better_than_plain_ddim_inversion(tame, vision):
    latent = image_latent()
    inversion, reconstruction, _ = invert(tame, latent, inner_iterations=20, early_stop=False, clip_vision=vision,
                                          image=picture(tame, latent))
    assert inversion.settings["mapping"] == "clip_vision"
    assert inversion.scales.shape == inversion.shifts.shape == (len(inversion.losses), 77, 32)
    positive, negative = encode(tame.clip, PROMPT), encode(tame.clip, "")
    plain = sample_from_top(tame.model, inversion, positive, negative, 7.5)
    learned = sample_from_top(value_inversion.with_learned_values(tame.model, inversion, owners.new_owner("Mapped")),
                              inversion, positive, negative, 7.5)
    target = latent["samples"]
    plain_error, learned_error = relative_error(plain, target), relative_error(learned, target)
    assert learned_error < 0.5 * plain_error, (learned_error, plain_error)
    assert relative_error(learned, reconstruction["samples"]) < 1e-4  # the stored values are the network's
    assert all(min(l) < 0.5 * l[0] for l in inversion.losses[:2])  # the loss falls within a step
    comfy.model_management.unload_all_models()


def test_a_wider_vision_model_gets_a_linear_and_the_direct_path_says_so(tame, wide_vision):
    latent = image_latent(seed=2)
    with torch.inference_mode():  # as the execution engine runs nodes: the tokens are inference tensors
        mapped, _, _ = invert(tame, latent, steps=2, inner_iterations=3, early_stop=False, clip_vision=wide_vision,
                              image=picture(tame, latent))
    direct, _, _ = invert(tame, latent, steps=2, inner_iterations=3, early_stop=False)
    assert mapped.settings["mapping"] == "clip_vision" and direct.settings["mapping"] == "direct"
    assert mapped.scales.shape == direct.scales.shape == (2, 77, 32)
    assert (direct.scales - 1).abs().max() < 0.1  # 3 small steps from scale 1 ...
    assert (mapped.scales - 1).abs().max() > 0.5  # ... the network's from its random output
    assert not torch.equal(mapped.scales[0], mapped.scales[1])  # and it trained


def test_vision_tokens_are_every_token_after_the_final_layer_norm(vision):
    image = torch.rand(1, 40, 48, 3, generator=torch.Generator().manual_seed(4))
    tokens = value_inversion.vision_tokens(vision, image)
    raw = vision.encode_image(image)
    assert tokens.shape == (1, 5, 32)
    norm = vision.model.vision_model.post_layernorm
    torch.testing.assert_close(tokens, torch.nn.functional.layer_norm(
        raw["last_hidden_state"], (32,), norm.weight, norm.bias, norm.eps))
    with torch.no_grad():  # ComfyUI's own class token, normed and projected, is ours projected
        torch.testing.assert_close(vision.model.visual_projection(tokens[:, 0]), raw["image_embeds"])


@pytest.mark.parametrize("inputs, message", [
    (dict(clip_vision="vision"), "clip_vision: connected without image; connect the real image the latent"),
    (dict(image=torch.zeros(1, 64, 64, 3)), "image: connected without clip_vision; connect a CLIP vision model"),
    (dict(clip_vision="vision", image=torch.zeros(2, 64, 64, 3)), r"image: expected one image \(a batch of 1"),
])
def test_bad_vision_inputs_are_named(tame, vision, inputs, message):
    inputs = {key: vision if value == "vision" else value for key, value in inputs.items()}
    with pytest.raises(ValueError, match=message):
        invert(tame, steps=2, inner_iterations=1, **inputs)
