"""Unit tests of the pure-torch layer, against formulas computed independently here."""

import math

import pytest
import torch

from conftest import pack_submodule
from helpers import adain_by_hand, group_norm_by_hand, shared_attention_by_hand

pytestmark = pytest.mark.one_host

attention = pack_submodule("attention_patches.attention")
kv_swap = pack_submodule("attention_patches.kv_swap")
layers = pack_submodule("attention_patches.layers")
prompt_batch = pack_submodule("attention_patches.prompt_batch")
reference = pack_submodule("attention_patches.reference")
sigma_range = pack_submodule("attention_patches.sigma_range")

FLOAT32 = {"rtol": 1e-5, "atol": 1e-6}


def by_hand(q, k, v, heads):
    out = torch.empty_like(q, dtype=torch.float64)
    d = q.shape[-1] // heads
    for b in range(q.shape[0]):
        for h in range(heads):
            cols = slice(h * d, (h + 1) * d)
            scores = q[b, :, cols].double() @ k[b, :, cols].double().T / math.sqrt(d)
            out[b, :, cols] = torch.softmax(scores, dim=-1) @ v[b, :, cols].double()
    return out


def test_scaled_dot_product_attention_is_softmax_qk_v_per_head():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 5, 12, generator=g) for _ in range(3))
    k, v = k[:, :3], v[:, :3]  # fewer key tokens than queries
    torch.testing.assert_close(attention.scaled_dot_product_attention(q, k, v, 3).double(), by_hand(q, k, v, 3), **FLOAT32)


def test_key_value_swap_full_and_partial_strength():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 8, generator=g) for _ in range(3))
    ref = reference.ReferenceFeatures(*(torch.randn(1, 6, 8, generator=g) for _ in range(3)))
    swapped = by_hand(q, ref.key.expand(2, -1, -1), ref.value.expand(2, -1, -1), 2)
    own = by_hand(q, k, v, 2)
    sdpa = attention.scaled_dot_product_attention
    torch.testing.assert_close(kv_swap.KeyValueSwap(1.0)(q, k, v, ref, 2, sdpa).double(), swapped, **FLOAT32)
    torch.testing.assert_close(kv_swap.KeyValueSwap(0.3)(q, k, v, ref, 2, sdpa).double(), 0.7 * own + 0.3 * swapped, **FLOAT32)


def test_batch_chunks_follow_cond_or_uncond():
    assert reference.batch_chunks(6, [1, 0]) == [slice(0, 3), slice(3, 6)]
    assert reference.batch_chunks(4, [0]) == [slice(0, 4)]
    with pytest.raises(reference.StyleReferenceError, match="a batch of 5 cannot hold 2 equal cond/uncond chunks"):
        reference.batch_chunks(5, [0, 1])


def test_reference_store_replays_what_was_recorded_and_names_missing_layers():
    store = reference.ReferenceFeatureStore()
    features = reference.ReferenceFeatures(*(torch.ones(1, 2, 4) * i for i in range(3)))
    store.record(("output", 3, 0), features)
    replay = store.replay()
    assert not replay.recording and replay.get(("output", 3, 0)) is features
    with pytest.raises(reference.StyleReferenceError, match=r"recorded nothing at \('output', 4, 0\)"):
        replay.get(("output", 4, 0))


def test_sigma_range_is_half_open_and_empty_when_start_equals_end():
    active = sigma_range.SigmaRange(sigma_start=10.0, sigma_end=1.0)
    assert active.contains(10.0) and active.contains(5.0)
    assert not active.contains(1.0) and not active.contains(10.5)
    assert not sigma_range.SigmaRange(3.0, 3.0).contains(3.0)


def test_parse_custom_layers():
    assert layers.parse_custom_layers("output.3, output.4.1 middle.0") == [
        ("output", 3, None), ("output", 4, 1), ("middle", 0, None)]
    with pytest.raises(layers.LayerSelectionError, match="cannot read 'output'"):
        layers.parse_custom_layers("output")


def test_late_decoder_sites_drop_the_coarsest_decoder_attention_level():
    site = layers.TransformerSite
    sites = [site("input", 1, 1, 0), site("middle", 0, 1, 2), site("output", 3, 1, 2), site("output", 6, 1, 1),
             site("output", 9, 2, 0)]
    assert layers.late_decoder_sites(sites) == [sites[3], sites[4]]
    assert layers.resolve_layers(sites, "late_self_attention") == [("output", 6, 0), ("output", 9, 0),
                                                                  ("output", 9, 1)]


def test_stack_token_sequences_repeats_to_the_common_length():
    short, long = torch.randn(1, 77, 4), torch.randn(1, 154, 4)
    stacked = prompt_batch.stack_token_sequences([short, long])
    assert stacked.shape == (2, 154, 4)
    assert torch.equal(stacked[0, :77], short[0]) and torch.equal(stacked[0, 77:], short[0])
    assert torch.equal(stacked[1], long[0])


shared_attention = pack_submodule("attention_patches.shared_attention")
shared_norm = pack_submodule("attention_patches.shared_norm")
style_call = pack_submodule("attention_patches.style_call")


def test_adain_gives_the_reference_statistics_per_channel():
    g = torch.Generator().manual_seed(2)
    x, ref = torch.randn(2, 10, 6, generator=g), torch.randn(1, 7, 6, generator=g) * 3 + 1
    out = shared_attention.adain(x, ref)
    torch.testing.assert_close(adain_by_hand(x, ref), out.double(), **FLOAT32)
    torch.testing.assert_close(out.mean(1), ref.mean(1).expand(2, -1), **FLOAT32)


@pytest.mark.parametrize("scale,shift", [(1.0, 0.0), (0.5, 0.693)])
def test_shared_attention_matches_the_formula(scale, shift):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 5, 8, generator=g) for _ in range(3))
    ref = reference.ReferenceFeatures(*(torch.randn(1, 4, 8, generator=g) for _ in range(3)))
    method = shared_attention.SharedAttention(score_scale=scale, score_shift=shift, adain_values=True)
    out = method(q, k, v, ref, 2, attention.scaled_dot_product_attention)
    expected = shared_attention_by_hand(q, k, v, ref.query, ref.key, ref.value, 2, adain_values=True, scale=scale,
                                        shift=shift)
    torch.testing.assert_close(out.double(), expected, **FLOAT32)


def test_shared_group_norm_in_batch_and_from_a_recorded_reference():
    norm = torch.nn.GroupNorm(4, 8)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    slot = shared_norm.ModelCallSlot()
    stand_ins = pack_submodule("glue.stand_ins")
    shared = stand_ins.stand_in(norm, shared_norm.SharedGroupNorm("n", slot, stand_ins.layer_weights))
    assert shared.weight is norm.weight and isinstance(shared, torch.nn.GroupNorm)  # the norm itself, seen anew
    x = torch.randn(6, 8, 3, 5)
    assert torch.equal(shared(x), norm(x))  # no model call in progress: the plain norm

    slot.current = style_call.StyleCall([0, 1], None)
    out = shared(x)
    for start in (0, 3):
        torch.testing.assert_close(out[start].double(), group_norm_by_hand(norm, x[start:start + 1])[0], **FLOAT32)
        expected = group_norm_by_hand(norm, x[start + 1:start + 3], x[start:start + 1])
        torch.testing.assert_close(out[start + 1:start + 3].double(), expected, **FLOAT32)

    store = reference.ReferenceFeatureStore()
    external = torch.randn(1, 8, 4, 4)  # another size than the targets
    slot.current = style_call.StyleCall([0], store)
    assert torch.equal(shared(external), norm(external))
    slot.current = style_call.StyleCall([0, 1], store.replay())
    torch.testing.assert_close(shared(x).double(), group_norm_by_hand(norm, x, external), **FLOAT32)


def test_sharing_a_layer_norm_would_change_nothing():
    """Why LayerNorm is not shared: normalising [target ; reference] tokens jointly is the plain LayerNorm."""
    norm = torch.nn.LayerNorm(8)
    target, ref = torch.randn(2, 5, 8), torch.randn(1, 3, 8)
    joined = norm(torch.cat([target, ref.expand(2, -1, -1)], dim=1))[:, :5]
    torch.testing.assert_close(joined, norm(target))
