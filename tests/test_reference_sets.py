"""Several weighted style references (Combine Style References) on a UNet, inside the real ComfyUI sampler.

Written out here from the recorded q/k/v of a layer: VSP attends to [k_1; k_2] with reference i's scores
shifted by log w_i; StyleAligned attends to [own; k_1; k_2] (shift + log w_i) after AdaIN toward the
references' mixture: mean sum p_i mu_i, variance sum p_i (var_i + (mu_i - mu)^2), p_i = w_i / sum w.
"""

import math

import pytest
import torch

from conftest import pack_submodule
from helpers import (LAYOUTS, encode, latent_reference, record_attention, relative_error, run_node, sample,
                     selected_layers, self_attention_module, style_aligned, vsp)

WEIGHTS = (0.7, 0.3)


def combine(*pairs):
    inputs = {}
    for number, (reference, weight) in enumerate(pairs, start=1):
        inputs[f"reference_{number}"], inputs[f"weight_{number}"] = reference, weight
    (references,) = run_node("CombineStyleReferences", **inputs)
    return references


def two_references(models, size=8):
    """Two different reference latents (sizes may differ: attention takes any number of keys)."""
    return latent_reference(models, seed=7), latent_reference(models, seed=11, size=size, reference_seed=5)


def split(t, heads):
    return t.double().reshape(t.shape[0], t.shape[1], heads, -1).permute(0, 2, 1, 3)


def attention_with_bias_by_hand(q, k, v, heads, bias):
    """softmax(q k^T / sqrt(d) + bias) v per head, float64; bias one value per key."""
    scores = split(q, heads) @ split(k, heads).transpose(-1, -2) / math.sqrt(q.shape[-1] // heads) + bias.double()
    out = torch.softmax(scores, -1) @ split(v, heads)
    return out.permute(0, 2, 1, 3).reshape(q.shape[0], q.shape[1], -1)


def mixture_adain_by_hand(x, references, weights):
    """x's channels given the references' mixture mean and std (unbiased variances, + 1e-5), float64."""
    p = [w / sum(weights) for w in weights]
    means = [r.double().mean(1, keepdim=True) for r in references]
    mean = sum(pi * m for pi, m in zip(p, means))
    variance = sum(pi * (r.double().var(1, keepdim=True) + (m - mean) ** 2) for pi, r, m in zip(p, references, means))
    x = x.double()
    return (x - x.mean(1, keepdim=True)) / (x.var(1, keepdim=True) + 1e-5).sqrt() * (variance + 1e-5).sqrt() + mean


def log_weights(reference_calls, weights, before=0):
    return torch.cat([torch.zeros(before, dtype=torch.float64)]
                     + [torch.full((c["k"].shape[1],), math.log(w), dtype=torch.float64)
                        for c, w in zip(reference_calls, weights)])


def layer_calls(styled, positive, negative, layout="together", cfg=4.0, batch=2):
    layer = selected_layers(styled)[-1]
    heads = self_attention_module(styled, layer).attn1.heads
    with record_attention(styled, layer) as calls:
        sample(LAYOUTS[layout](styled), positive, negative, batch=batch, steps=1, cfg=cfg)
    return calls[:2], calls[2:], heads  # each reference's own pass, then the targets' calls


@pytest.mark.parametrize("layout", [*LAYOUTS, "cfg 1"])
def test_vsp_attends_to_every_reference_with_log_weight_shifts(models, layout):
    first, second = two_references(models, size=12)
    styled = vsp(models.model, reference=combine((first, WEIGHTS[0]), (second, WEIGHTS[1])))
    cfg = 1.0 if layout == "cfg 1" else 4.0
    references, targets, heads = layer_calls(styled, encode(models.clip, "a dog"), encode(models.clip, ""),
                                             "together" if layout == "cfg 1" else layout, cfg)
    assert [c["q"].shape[0] for c in references] == [1, 1] and references[1]["k"].shape[1] == 36 * references[0]["k"].shape[1] // 16
    assert sum(c["q"].shape[0] for c in targets) == (2 if cfg == 1.0 else 4)
    keys = torch.cat([c["k"] for c in references], 1)
    values = torch.cat([c["v"] for c in references], 1)
    for call in targets:
        batch = call["q"].shape[0]
        expected = attention_with_bias_by_hand(call["q"], keys.expand(batch, -1, -1), values.expand(batch, -1, -1),
                                               heads, log_weights(references, WEIGHTS))
        torch.testing.assert_close(call["out"].double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", [*LAYOUTS, "cfg 1"])
def test_style_aligned_adain_toward_the_mixture_and_shifted_shared_keys(models, layout):
    first, second = two_references(models)
    shift = 0.5
    styled = style_aligned(models.model, reference=combine((first, WEIGHTS[0]), (second, WEIGHTS[1])),
                           adain_values=True, shared_score_shift=shift, shared_group_norm="off")
    cfg = 1.0 if layout == "cfg 1" else 4.0
    references, targets, heads = layer_calls(styled, encode(models.clip, "a dog"), encode(models.clip, ""),
                                             "together" if layout == "cfg 1" else layout, cfg)
    ref_q, ref_k, ref_v = ([c[name] for c in references] for name in ("q", "k", "v"))
    for call in targets:
        batch = call["q"].shape[0]
        q = mixture_adain_by_hand(call["q"], ref_q, WEIGHTS)
        k = mixture_adain_by_hand(call["k"], ref_k, WEIGHTS)
        v = mixture_adain_by_hand(call["v"], ref_v, WEIGHTS)
        keys = torch.cat([k, *(r.double().expand(batch, -1, -1) for r in ref_k)], 1)
        values = torch.cat([v, *(r.double().expand(batch, -1, -1) for r in ref_v)], 1)
        bias = log_weights(references, WEIGHTS, before=k.shape[1])
        bias[k.shape[1]:] += shift
        expected = attention_with_bias_by_hand(q, keys, values, heads, bias)
        torch.testing.assert_close(call["out"].double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", [vsp, style_aligned])
def test_one_reference_of_weight_one_is_the_single_reference_node_bit_for_bit(sd15, method):
    positive, negative = encode(sd15.clip, "a dog"), encode(sd15.clip, "")
    reference, other = two_references(sd15)
    alone = sample(method(sd15.model, reference=reference), positive, negative, batch=2)
    as_a_set = sample(method(sd15.model, reference=combine((reference, 1.0), (other, 0.0))), positive, negative,
                      batch=2)
    assert torch.equal(as_a_set, alone)


@pytest.mark.parametrize("method", [vsp, style_aligned])
def test_two_copies_of_one_reference_with_weights_a_and_b_act_as_it_once_with_a_plus_b(sd15, method):
    """Softmax over a key there twice with shifts log a and log b is softmax over it once with log(a + b);
    the mixture of two equal distributions is that distribution. Weights summing to 1: the plain node."""
    positive, negative = encode(sd15.clip, "a dog"), encode(sd15.clip, "")
    copy_one, copy_two = latent_reference(sd15), latent_reference(sd15)  # the same reference from two nodes
    alone = sample(method(sd15.model, reference=copy_one), positive, negative, batch=2)
    twice = sample(method(sd15.model, reference=combine((copy_one, 0.25), (copy_two, 0.75))), positive, negative,
                   batch=2)
    assert relative_error(twice, alone) < 1e-5
    assert not torch.equal(sample(method(sd15.model), positive, negative, batch=2), alone)  # the style acts


def test_a_weight_going_to_zero_approaches_the_other_reference_alone(sd15):
    positive, negative = encode(sd15.clip, "a dog"), encode(sd15.clip, "")
    first, second = two_references(sd15)
    alone = sample(style_aligned(sd15.model, reference=first), positive, negative, batch=2)
    distances = [relative_error(sample(style_aligned(sd15.model, reference=combine((first, 1.0), (second, w))),
                                       positive, negative, batch=2), alone) for w in (1.0, 0.3, 0.1, 0.01, 0.001)]
    assert all(later < earlier for earlier, later in zip(distances, distances[1:])), distances
    assert distances[0] > 1e-2 and distances[-1] < distances[0] / 100, distances


def test_the_sets_references_record_once_each_per_step_and_replay(sd15):
    positive, negative = encode(sd15.clip, "a dog"), encode(sd15.clip, "")
    first, second = two_references(sd15)
    styled = vsp(sd15.model, reference=combine((first, 1.0), (second, 1.0)))
    layer = selected_layers(styled)[-1]
    with record_attention(styled, layer) as calls:
        recorded = sample(styled, positive, negative, batch=2, steps=3)
        replayed = sample(styled, positive, negative, batch=2, steps=3)
    assert [c["q"].shape[0] for c in calls] == [1, 1, 4] * 3 + [4] * 3  # the second run: the targets alone
    assert torch.equal(replayed, recorded)


def test_bad_inputs_are_refused_by_name(sd15):
    first, second = two_references(sd15)
    with pytest.raises(ValueError, match="weight_2: expected a weight of 0 or more, got -0.5"):
        combine((first, 1.0), (second, -0.5))
    with pytest.raises(ValueError, match="weights: every weight is 0"):
        combine((first, 0.0), (second, 0.0))
    many = [latent_reference(sd15, seed=s) for s in range(9)]
    nested = combine(*((r, 1.0) for r in many[:4]))
    more = combine(*((r, 1.0) for r in many[4:8]))
    with pytest.raises(ValueError, match="references: 9 different references, at most 8"):
        combine((nested, 1.0), (more, 1.0), (many[8], 1.0))
    (wrong,) = run_node("StyleReferenceLatent", latent={"samples": torch.randn(1, 16, 8, 8)}, clip=sd15.clip, prompt="",
                        reference_seed=0, cache_megabytes=0, cache_on_cpu=False)
    with pytest.raises(ValueError, match="reference: the set's reference 2 latent has 16 channels"):
        vsp(sd15.model, reference=combine((first, 1.0), (wrong, 1.0)))
    with pytest.raises(ValueError, match="nvqg_weight: .* several references"):
        vsp(sd15.model, reference=combine((first, 1.0), (second, 1.0)), nvqg_weight=1.0)


def test_sets_nest_with_their_weights_multiplied_and_a_repeated_reference_counts_once(sd15):
    first, second = two_references(sd15)
    inner = combine((first, 0.5), (second, 2.0))
    outer = combine((inner, 3.0), (first, 1.0))
    assert outer.members == (first, second) and outer.weights == (2.5, 6.0)


def test_colour_calibration_gives_the_prediction_the_mixtures_channel_moments(sd15):
    """StyleKeeper's calibration with a set: each channel's mean sum p_i mu_i and variance
    sum p_i (var_i + (mu_i - mu)^2) over the references' clean latents (unbiased variances, as for one)."""
    first, second = two_references(sd15, size=12)
    calibration = pack_submodule("glue.color_calibration").ColorCalibration(combine((first, 0.7), (second, 0.3)), 100.0,
                                                                             150.0)
    base = sd15.model.model
    denoised = 3.0 * torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) + 1.0
    out = calibration({"denoised": denoised, "model": base, "sigma": base.model_sampling.sigma(torch.tensor([125.0]))})
    latents = [base.process_latent_in(r.latent).double() for r in (first, second)]
    means = [latent.mean((-2, -1)) for latent in latents]
    mean = 0.7 * means[0] + 0.3 * means[1]
    variance = sum(p * (latent.var((-2, -1)) + (m - mean) ** 2) for p, latent, m in zip((0.7, 0.3), latents, means))
    torch.testing.assert_close(out.double().mean((-2, -1)), mean.expand(2, -1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.double().std((-2, -1)), variance.sqrt().expand(2, -1), rtol=1e-5, atol=1e-5)
    outside = calibration({"denoised": denoised, "model": base, "sigma": base.model_sampling.sigma(torch.tensor([500.0]))})
    assert torch.equal(outside, denoised)


def test_attention_maps_of_a_set_show_each_reference_as_a_block_of_its_own(sd15):
    """The captured maps take the log-weight shifts (rows sum to 1 over both references' keys), in one block
    per reference; the heatmap draws a panel per reference on one scale, over the set's images in order."""
    first, second = two_references(sd15)
    styled = vsp(sd15.model, reference=combine((first, 0.2), (second, 1.0)), layers="custom", custom_layers="output.3.0")
    (captured, maps) = run_node("CaptureAttentionMaps", model=styled, attention="self_attention", layers="custom",
                                custom_layers="output.3.0", start_percent=0.0, end_percent=1.0, max_megabytes=64)
    sample(captured, encode(sd15.clip, "a dog"), encode(sd15.clip, ""), batch=2, steps=2, cfg=1.0)
    (layer,) = maps.layers.values()
    tokens = layer.query_grid[0] * layer.query_grid[1]
    assert layer.total.shape == (2, tokens, 2 * tokens) and layer.key_sources == ("reference 1", "reference 2")
    torch.testing.assert_close(layer.mean.sum(-1), torch.ones(2, tokens), rtol=0, atol=1e-5)
    mass = layer.mean.sum(1).reshape(2, 2, tokens).sum(-1) / tokens  # (images, reference): the share of each
    assert (mass[:, 0] < mass[:, 1]).all()  # weight 0.2 against 1.0 (same latent size, random content)
    backgrounds = torch.stack([torch.full((64, 64, 3), 0.25), torch.full((64, 64, 3), 0.75)])
    (drawn,) = run_node("AttentionMapHeatmap", attention_maps=maps, images=torch.zeros(2, 64, 64, 3), layers="",
                        tokens="1", query_x=0.5, query_y=0.5, opacity=0.0, reference_image=backgrounds)
    assert drawn.shape == (2, 64, 3 * 64, 3)  # the marked image, then reference 1's panel, then reference 2's
    torch.testing.assert_close(drawn[:, :, 64:128], torch.full((2, 64, 64, 3), 0.25))  # opacity 0: the backgrounds
    torch.testing.assert_close(drawn[:, :, 128:], torch.full((2, 64, 64, 3), 0.75))
