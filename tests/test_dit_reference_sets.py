"""Several weighted style references on Flux: at a block the joint attention's output equals the method written
out by hand from the block's own queries, keys and values (tests/support/flux.py: through ComfyUI's code).

The targets' q/k/v come from a plain run of the same noise (only the checked block is styled, so its inputs are
the plain run's); each reference's from its own pass in the styled run. VSP: each target row attends to [its
text keys; reference 1's image keys; reference 2's], reference i's scores shifted by log w_i. StyleAligned
(AlignedGen): AdaIN of the image q/k before RoPE toward the references' mixture moments, then every
reference's image keys (its own grid moved one target width to the right, times the style factor) and values
appended with the same shifts. References of different sizes (4 x 4 and 4 x 6 tokens)."""

import math

import pytest
import torch

import random_dits
from helpers import LAYOUTS, relative_error, run_node, vsp
from support import joint_blocks
from support.flux import (HEIGHT, TEXT_TOKENS, WIDTH, attention_output, conditioning, flux_sample, image_positions,
                          post_rope, pre_rope, with_rope)

WEIGHTS = (0.6, 1.5)
SIZES = ((HEIGHT, WIDTH), (HEIGHT, WIDTH + 4))
SITE = ("single", 1)
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def flux():
    return random_dits.tiny_flux()


def references_set(seed=0):
    pairs = {}
    for number, (size, weight) in enumerate(zip(SIZES, WEIGHTS), start=1):
        latent = torch.randn(1, 16, *size, generator=torch.Generator().manual_seed(seed + number))
        (pairs[f"reference_{number}"],) = run_node("StyleReferenceLatent", latent={"samples": latent}, clip=None,
                                                   prompt="", reference_seed=number, cache_megabytes=0,
                                                   cache_on_cpu=False, conditioning=conditioning(5 + number))
        pairs[f"weight_{number}"] = weight
    (references,) = run_node("CombineStyleReferences", **pairs)
    return references


def biased_attention(q, k, v, bias):
    """softmax(q k^T / sqrt(d) + bias) v per head in float64, (heads, rows, d) -> (rows, heads * d)."""
    scores = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias.double()
    out = torch.softmax(scores, -1) @ v.double()
    return out.transpose(0, 1).reshape(q.shape[1], -1)


def reference_bias(reference_calls, before):
    return torch.cat([torch.zeros(before, dtype=torch.float64)]
                     + [torch.full((c["k"].shape[2] - TEXT_TOKENS,), math.log(w), dtype=torch.float64)
                        for c, w in zip(reference_calls, WEIGHTS)])


def mixture_adain(x, references):
    """Per head and channel over rows: x toward the references' mixture mean and std (unbiased, + 1e-5)."""
    p = [w / sum(WEIGHTS) for w in WEIGHTS]
    means = [r.double().mean(-2, keepdim=True) for r in references]
    mean = sum(pi * m for pi, m in zip(p, means))
    variance = sum(pi * (r.double().var(-2, keepdim=True) + (m - mean) ** 2) for pi, r, m in zip(p, references, means))
    x = x.double()
    out = (x - x.mean(-2, keepdim=True)) / (x.var(-2, keepdim=True) + 1e-5).sqrt() * (variance + 1e-5).sqrt() + mean
    return out.float()  # ComfyUI's RoPE (with_rope) takes float32 at most


def runs(flux, styled_of, layout, cfg):
    """(the plain run's calls at SITE, the styled run's reference calls (post- and pre-RoPE) and target outputs)."""
    recording, plain_calls = post_rope(LAYOUTS[layout](flux), SITE)
    with pre_rope(flux, SITE) as plain_pre:
        flux_sample(recording, cfg=cfg)
    styled_recording, styled_calls = post_rope(flux, SITE)
    styled = LAYOUTS[layout](styled_of(styled_recording))
    with pre_rope(flux, SITE) as styled_pre, attention_output(flux, SITE) as outputs:
        flux_sample(styled, cfg=cfg)
    heads = plain_calls[0]["q"].shape[1]
    # a reference's own pass reaches the kernel through the pack's layer: (1, rows, heads * dim_head), unsplit
    references = [{name: c[name].reshape(1, c[name].shape[1], heads, -1).transpose(1, 2) for name in "qkv"}
                  for c in styled_calls[:2]]
    assert [c["k"].shape[2] - TEXT_TOKENS for c in references] == [h * w // 4 for h, w in SIZES]
    return plain_calls, plain_pre, references, styled_pre[:2], outputs[2:]


CASES = [("together", 1.0), ("together", 3.0), ("reversed", 3.0)]


@pytest.mark.parametrize("layout,cfg", CASES)
def test_vsp_with_two_weighted_references_at_a_flux_block(flux, layout, cfg):
    plain, _, references, _, outputs = runs(
        flux, lambda m: vsp(m, references_set(), layers="custom", custom_layers="single.1"), layout, cfg)
    assert len(plain) == len(outputs)
    image_k = torch.cat([c["k"][0, :, TEXT_TOKENS:] for c in references], 1)
    image_v = torch.cat([c["v"][0, :, TEXT_TOKENS:] for c in references], 1)
    for call, output in zip(plain, outputs):
        for row in range(call["q"].shape[0]):  # every row a target: the references are external
            k = torch.cat([call["k"][row, :, :TEXT_TOKENS], image_k], 1)
            v = torch.cat([call["v"][row, :, :TEXT_TOKENS], image_v], 1)
            expected = biased_attention(call["q"][row], k, v, reference_bias(references, TEXT_TOKENS))
            assert (output[row].double() - expected).abs().max() <= TOLERANCE * expected.abs().max()


@pytest.mark.parametrize("layout,cfg", CASES)
def test_style_aligned_with_two_weighted_references_at_a_flux_block(flux, layout, cfg):
    def styled_of(model):
        (styled,) = run_node("StyleAlignedAttention", model=model, share_attention=True, adain_queries=True,
                             adain_keys=True, adain_values=False, shared_score_scale=1.1, shared_score_shift=0.0,
                             shared_group_norm="auto", layers="custom", custom_layers="single.1", start_percent=0.0,
                             end_percent=1.0, reference=references_set(), reference_positions="beside")
        return styled

    plain, plain_pre, references, references_pre, outputs = runs(flux, styled_of, layout, cfg)
    image = slice(TEXT_TOKENS, None)
    positions = image_positions(flux, HEIGHT // 2, WIDTH // 2)[0]
    shared = torch.cat([1.1 * with_rope(pre["k"][0, :, image], image_positions(flux, h // 2, w // 2, WIDTH // 2)[0])
                        for pre, (h, w) in zip(references_pre, SIZES)], 1)
    shared_v = torch.cat([c["v"][0, :, image] for c in references], 1)
    for call, pre, output in zip(plain, plain_pre, outputs):
        for row in range(call["q"].shape[0]):
            q_image = with_rope(mixture_adain(pre["q"][row][:, image], [r["q"][0, :, image] for r in references_pre]),
                                positions)
            k_image = with_rope(mixture_adain(pre["k"][row][:, image], [r["k"][0, :, image] for r in references_pre]),
                                positions)
            q = torch.cat([call["q"][row][:, :TEXT_TOKENS], q_image], 1)
            k = torch.cat([call["k"][row][:, :TEXT_TOKENS], k_image, shared], 1)
            v = torch.cat([call["v"][row], shared_v], 1)
            expected = biased_attention(q, k, v, reference_bias(references, call["k"].shape[2]))
            assert (output[row].double() - expected).abs().max() <= TOLERANCE * expected.abs().max()


@pytest.fixture(scope="module", params=["sd3", "sd35_medium", "qwen_image", "z_image"])
def dit(request):
    if request.param == "z_image" and not joint_blocks.lumina_reachable():
        pytest.skip("this ComfyUI's Lumina 2 / Z-Image gives its attention calls no block index (0.8.0 does)")
    return joint_blocks.tiny(request.param)


def dit_reference(model, seed, width=joint_blocks.WIDTH):
    shape = (1, 16, 1, joint_blocks.HEIGHT, width) if joint_blocks.is_qwen(model) else (1, 16, joint_blocks.HEIGHT, width)
    (reference,) = run_node("StyleReferenceLatent", latent={"samples": torch.randn(shape, generator=torch.Generator().manual_seed(seed))},
                            clip=None, prompt="", reference_seed=seed, cache_megabytes=64, cache_on_cpu=False,
                            conditioning=joint_blocks.conditioning(model, seed))
    return reference


@pytest.mark.parametrize("node", ["vsp", "style_aligned"])
def test_on_sd3_qwen_image_and_z_image_two_copies_of_a_reference_act_as_it_once(dit, node):
    """Softmax over a key there twice with shifts log 0.25 and log 0.75 is softmax over it once (and the mixture of
    two equal distributions is that distribution): the set equals the single-reference node; a set of two different
    references (the second wider) does not."""
    def styled(reference):
        if node == "vsp":
            return vsp(dit, reference, layers="all_blocks")
        (model,) = run_node("StyleAlignedAttention", model=dit, share_attention=True, adain_queries=True, adain_keys=True,
                            adain_values=False, shared_score_scale=1.1, shared_score_shift=0.0, shared_group_norm="auto",
                            layers="all_blocks", custom_layers="", start_percent=0.0, end_percent=1.0,
                            reference=reference, reference_positions="beside")
        return model

    def combined(*pairs):
        inputs = {f"{name}_{number}": value for number, pair in enumerate(pairs, start=1)
                  for name, value in zip(("reference", "weight"), pair)}
        return run_node("CombineStyleReferences", **inputs)[0]

    one, copy = dit_reference(dit, 3), dit_reference(dit, 3)  # the same reference from two nodes
    alone = joint_blocks.dit_sample(styled(one), batch=2, steps=2, cfg=3.0)
    twice = joint_blocks.dit_sample(styled(combined((one, 0.25), (copy, 0.75))), batch=2, steps=2, cfg=3.0)
    assert relative_error(twice, alone) < 1e-5
    mixed = joint_blocks.dit_sample(styled(combined((one, 0.5), (dit_reference(dit, 4, joint_blocks.WIDTH + 4), 0.5))),
                                    batch=2, steps=2, cfg=3.0)
    assert relative_error(mixed, alone) > 1e-3


@pytest.mark.parametrize("node", ["vsp", "style_aligned"])
def test_one_flux_reference_of_weight_one_is_the_single_reference_node_bit_for_bit(flux, node):
    (reference,) = run_node("StyleReferenceLatent", latent={"samples": torch.randn(1, 16, HEIGHT, WIDTH)}, clip=None,
                            prompt="", reference_seed=0, cache_megabytes=64, cache_on_cpu=False,
                            conditioning=conditioning(2))
    (references,) = run_node("CombineStyleReferences", reference_1=reference, weight_1=1.0, reference_2=reference,
                             weight_2=0.0)
    assert references.members == (reference,) and references.weights == (1.0,)

    def styled(given):
        if node == "vsp":
            return vsp(flux, given, layers="all_blocks")
        (model,) = run_node("StyleAlignedAttention", model=flux, share_attention=True, adain_queries=True, adain_keys=True,
                            adain_values=True, shared_score_scale=1.1, shared_score_shift=0.5, shared_group_norm="auto",
                            layers="auto", custom_layers="", start_percent=0.0, end_percent=1.0, reference=given,
                            reference_positions="beside")
        return model

    alone = flux_sample(styled(reference), batch=2, cfg=3.0, steps=2)
    assert torch.equal(flux_sample(styled(references), batch=2, cfg=3.0, steps=2), alone)
    assert not torch.equal(flux_sample(flux, batch=2, cfg=3.0, steps=2), alone)
