"""Style nodes chained on one MODEL: each layer uses the reference and settings of the node that styled it.

Two nodes on disjoint layers each compute their own formula with their own reference (in the batch or
external); a layer claimed twice is refused with both nodes named; an external reference's own pass
runs with every other style off, so it records exactly what it records alone.
"""

import pytest
import torch

import comfy.ldm.modules.attention
from conftest import pack_submodule
from helpers import (assert_relative_close, attention_by_hand, batch_prompts, latent_reference, record_attention, sample,
                     selected_layers, self_attention_module, shared_attention_by_hand, style_aligned, vsp)

sigma_range = pack_submodule("attention_patches.sigma_range")
LayerConflictError = pack_submodule("nodes.style_inputs").LayerConflictError

SIZE, SIZE_A, SIZE_B = 8, 16, 12  # latent sides of the targets and of references A and B: every layer tells them apart


def custom(layer) -> str:
    return ".".join(map(str, layer))


def two_layers(models):
    """The finest and the coarsest self-attention layer of the model."""
    every = selected_layers(vsp(models.model, layers="all_self_attention"))
    return every[-1], every[0]


def chained(models, order, external, vsp_layer, sa_layer, cache_megabytes=0):
    reference_a = latent_reference(models, seed=7, size=SIZE_A, cache_megabytes=cache_megabytes) if external else None
    reference_b = (latent_reference(models, seed=9, size=SIZE_B, prompt="a painting", reference_seed=5,
                                    cache_megabytes=cache_megabytes) if external else None)
    steps = {
        "vsp": lambda m: vsp(m, reference=reference_a, layers="custom", custom_layers=custom(vsp_layer)),
        "sa": lambda m: style_aligned(m, reference=reference_b, layers="custom", custom_layers=custom(sa_layer),
                                      shared_group_norm="on", shared_score_shift=0.3),
    }
    model = models.model
    for name in order:
        model = steps[name](model)
    return model, reference_a, reference_b


def tokens_at(layer_calls, batch):
    return [call for call in layer_calls if call["q"].shape[0] == batch]


@pytest.mark.parametrize("order", [("vsp", "sa"), ("sa", "vsp")], ids="_then_".join)
@pytest.mark.parametrize("external", [False, True], ids=["in_batch", "external"])
def test_each_node_of_a_chain_computes_its_formula_with_its_own_reference(models, order, external):
    vsp_layer, sa_layer = two_layers(models)
    styled, _, _ = chained(models, order, external, vsp_layer, sa_layer)
    positive, negative = batch_prompts(models, batch=3)
    with record_attention(styled, vsp_layer) as at_vsp, record_attention(styled, sa_layer) as at_sa:
        sample(styled, positive, negative, batch=3, size=SIZE, steps=1, cfg=4.0)
    heads = self_attention_module(styled, vsp_layer).attn1.heads
    (targets_vsp,), (targets_sa,) = tokens_at(at_vsp, 6), tokens_at(at_sa, 6)
    if external:
        # one reference pass per node; at each node's layer, its reference is the one of its own size
        (pass_a,) = [c for c in tokens_at(at_vsp, 1) if c["q"].shape[1] == ref_tokens(targets_vsp, SIZE_A)]
        (pass_b,) = [c for c in tokens_at(at_sa, 1) if c["q"].shape[1] == ref_tokens(targets_sa, SIZE_B)]
        expected_vsp = attention_by_hand(targets_vsp["q"], pass_a["k"].expand(6, -1, -1), pass_a["v"].expand(6, -1, -1), heads)
        expected_sa = shared_attention_by_hand(targets_sa["q"], targets_sa["k"], targets_sa["v"], pass_b["q"], pass_b["k"],
                                               pass_b["v"], heads, shift=0.3)
        torch.testing.assert_close(targets_vsp["out"].double(), expected_vsp, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(targets_sa["out"].double(), expected_sa, rtol=1e-5, atol=1e-5)
        return
    for start in (0, 3):  # item 0 of each cond/uncond chunk is both nodes' reference
        ref, targets = slice(start, start + 1), slice(start + 1, start + 3)
        q, k, v = (targets_vsp[n] for n in "qkv")
        expected_vsp = attention_by_hand(q[targets], k[ref].expand(2, -1, -1), v[ref].expand(2, -1, -1), heads)
        torch.testing.assert_close(targets_vsp["out"][targets].double(), expected_vsp, rtol=1e-5, atol=1e-5)
        q, k, v = (targets_sa[n] for n in "qkv")
        expected_sa = shared_attention_by_hand(q[targets], k[targets], v[targets], q[ref], k[ref], v[ref], heads, shift=0.3)
        torch.testing.assert_close(targets_sa["out"][targets].double(), expected_sa, rtol=1e-5, atol=1e-5)


def ref_tokens(target_call, side: int) -> int:
    """Tokens a reference of latent side `side` has at the layer of target_call (whose latent side is SIZE)."""
    return target_call["q"].shape[1] * side * side // (SIZE * SIZE)


@pytest.mark.parametrize("order", [("vsp", "sa"), ("sa", "vsp")], ids="_then_".join)
def test_a_reference_pass_records_what_it_records_alone(sd15, order):
    """Reference A's pass runs with the other node's style (its layers and shared norms) off."""
    vsp_layer, sa_layer = two_layers(sd15)
    styled, reference_a, _ = chained(sd15, order, True, vsp_layer, sa_layer)
    alone = vsp(sd15.model, reference=reference_a, layers="custom", custom_layers=custom(vsp_layer))
    positive, negative = batch_prompts(sd15, batch=3)
    recorded = []
    for model in (styled, alone):
        with record_attention(model, vsp_layer) as calls:
            sample(model, positive, negative, batch=3, size=SIZE, steps=1)
        (targets,) = tokens_at(calls, 6)
        (pass_a,) = [c for c in tokens_at(calls, 1) if c["q"].shape[1] == ref_tokens(targets, SIZE_A)]
        recorded.append(pass_a)
    in_chain, by_itself = recorded
    for name in "qkv":
        torch.testing.assert_close(in_chain[name], by_itself[name], rtol=1e-6, atol=1e-6)


def counting_passes(model):
    """Counts the UNet calls per input size: a reference alone is batch 1 at its own latent size."""
    unet = model.get_model_object("diffusion_model")
    counts = {}

    def count(module, args):
        x = args[0]
        if x.shape[0] == 1:
            counts[x.shape[-1]] = counts.get(x.shape[-1], 0) + 1

    return counts, unet.register_forward_pre_hook(count)


def test_two_external_references_record_and_replay_independently(sd15):
    vsp_layer, sa_layer = two_layers(sd15)
    positive, negative = batch_prompts(sd15, batch=2)
    uncached, _, _ = chained(sd15, ("vsp", "sa"), True, vsp_layer, sa_layer, cache_megabytes=0)
    cached, _, _ = chained(sd15, ("vsp", "sa"), True, vsp_layer, sa_layer, cache_megabytes=64)
    steps = 3
    expected = sample(uncached, positive, negative, batch=2, size=SIZE, steps=steps)
    counts, handle = counting_passes(cached)
    try:
        first = sample(cached, positive, negative, batch=2, size=SIZE, steps=steps)
        assert counts == {SIZE_A: steps, SIZE_B: steps}, counts  # each reference once per sigma
        counts.clear()
        second = sample(cached, positive, negative, batch=2, size=SIZE, steps=steps)
        assert counts == {}, counts  # both replayed from their own caches
    finally:
        handle.remove()
    assert_relative_close(first, expected)
    assert_relative_close(second, expected)


def test_a_layer_claimed_twice_is_refused_naming_both_nodes(sd15):
    layer = custom(two_layers(sd15)[0])
    styled = vsp(sd15.model, layers="custom", custom_layers=layer)
    with pytest.raises(LayerConflictError, match=rf"StyleAlignedAttention would restyle {layer}.*VisualStylePrompting"):
        style_aligned(styled, layers="custom", custom_layers=layer, shared_group_norm="off")
    with pytest.raises(LayerConflictError, match=r"VisualStylePrompting would restyle .*VisualStylePrompting earlier"):
        vsp(styled)
    # nothing was installed on the model that was refused
    assert selected_layers(styled) == [two_layers(sd15)[0]]


def test_shared_group_norm_twice_is_refused(sd15):
    first = style_aligned(sd15.model, layers="custom", custom_layers=custom(two_layers(sd15)[0]), shared_group_norm="on")
    with pytest.raises(LayerConflictError, match="shared_group_norm: StyleAlignedAttention earlier in this chain"):
        style_aligned(first, layers="custom", custom_layers=custom(two_layers(sd15)[1]), shared_group_norm="on")
    style_aligned(first, layers="custom", custom_layers=custom(two_layers(sd15)[1]), shared_group_norm="off")


def test_a_layer_replaced_by_another_pack_is_named(sd15):
    layer = two_layers(sd15)[0]
    foreign = sd15.model.clone()

    def other_packs_attention(q, k, v, extra_options):
        return comfy.ldm.modules.attention.optimized_attention(q, k, v, extra_options["n_heads"])

    foreign.set_model_attn1_replace(other_packs_attention, *layer)
    with pytest.raises(LayerConflictError, match=rf"{custom(layer)} already have their self-attention replaced by another "
                                                 r"node \(function\); VisualStylePrompting would overwrite it"):
        vsp(foreign, layers="all_self_attention")


def test_the_style_is_decided_once_per_model_call_not_per_layer(sd15, monkeypatch):
    checks = []
    contains = sigma_range.SigmaRange.contains
    monkeypatch.setattr(sigma_range.SigmaRange, "contains", lambda self, sigma: checks.append(sigma) or contains(self, sigma))
    styled = vsp(sd15.model, layers="all_self_attention")
    assert len(selected_layers(styled)) > 2
    unet = styled.get_model_object("diffusion_model")
    calls = []
    handle = unet.register_forward_pre_hook(lambda m, args: calls.append(1))
    try:
        positive, negative = batch_prompts(sd15, batch=3)
        sample(styled, positive, negative, batch=3, size=SIZE, steps=3)
    finally:
        handle.remove()
    assert len(checks) == len(calls) == 3
