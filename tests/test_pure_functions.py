"""Unit tests of the pure-torch layer, against formulas computed independently here."""

import math

import pytest
import torch

from conftest import pack_submodule

attention = pack_submodule("attention_patches.attention")
kv_swap = pack_submodule("attention_patches.kv_swap")
layers = pack_submodule("attention_patches.layers")
prompt_batch = pack_submodule("attention_patches.prompt_batch")
reference = pack_submodule("attention_patches.reference")
styled = pack_submodule("attention_patches.styled_self_attention")

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
    with pytest.raises(reference.ReferenceError, match="a batch of 5 cannot hold 2 equal cond/uncond chunks"):
        reference.batch_chunks(5, [0, 1])


def test_reference_store_replays_what_was_recorded_and_names_missing_layers():
    store = reference.ReferenceFeatureStore()
    features = reference.ReferenceFeatures(*(torch.ones(1, 2, 4) * i for i in range(3)))
    store.record(("output", 3, 0), features)
    replay = store.replay()
    assert not replay.recording and replay.get(("output", 3, 0)) is features
    with pytest.raises(reference.ReferenceError, match=r"recorded nothing at \('output', 4, 0\)"):
        replay.get(("output", 4, 0))


def test_sigma_range_is_half_open_and_empty_when_start_equals_end():
    active = styled.SigmaRange(sigma_start=10.0, sigma_end=1.0)
    assert active.contains(10.0) and active.contains(5.0)
    assert not active.contains(1.0) and not active.contains(10.5)
    assert not styled.SigmaRange(3.0, 3.0).contains(3.0)


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
