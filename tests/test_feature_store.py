"""The feature store: recordings per (tag, sigma) within a budget checked before copying, exact file round trips."""

from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import save_file

from conftest import pack_submodule

pytestmark = pytest.mark.one_host

feature_store = pack_submodule("attention_patches.feature_store")
reference = pack_submodule("attention_patches.reference")
shared_norm = pack_submodule("attention_patches.shared_norm")


class CountingStore(feature_store.FeatureStore):
    copies = 0

    def _copy(self, tensor, device):
        if device is not None:
            self.copies += 1
        return super()._copy(tensor, device)


def recording(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        ("output", 3, 0): reference.ReferenceFeatures(*(torch.randn(1, 16, 8, generator=g) for _ in range(3))),
        "diffusion_model.output_blocks.4.0.in_layers.0": shared_norm.GroupMoments(
            torch.tensor(64.0), torch.randn(4, generator=g), torch.rand(4, generator=g)),
        "diffusion_model.output_blocks.4.0": torch.randn(1, 8, 4, 4, generator=g).half(),
    }


RECORDING_BYTES = 3 * 16 * 8 * 4 + (1 + 4 + 4) * 4 + 8 * 4 * 4 * 2


def test_a_recording_within_the_budget_is_kept_and_replayed():
    store = CountingStore(max_bytes=RECORDING_BYTES, offload_device=torch.device("cpu"))
    features = recording()
    assert store.put(14.6, features, tag="weights-a")
    assert store.copies == 7 and store.bytes == RECORDING_BYTES and len(store) == 1
    replay = store.get(14.6, torch.device("cpu"), tag="weights-a")
    assert torch.equal(replay[("output", 3, 0)].value, features[("output", 3, 0)].value)
    assert store.get(14.6, torch.device("cpu"), tag="weights-b") is None  # another model's weights
    assert not store.put(7.0, recording(1), tag="weights-a")  # over the budget: not kept


def test_a_budget_smaller_than_one_recording_records_nothing_and_copies_nothing():
    store = CountingStore(max_bytes=RECORDING_BYTES - 1, offload_device=torch.device("cpu"))
    assert not store.put(14.6, recording())
    assert store.copies == 0 and store.bytes == 0 and len(store) == 0


def test_an_unrecorded_sigma_is_a_clear_error_and_close_sigmas_match():
    store = feature_store.FeatureStore(max_bytes=1 << 20)
    store.put(14.6, recording())
    store.put(0.03, recording(1))
    assert store.at(14.6 * (1 + 1e-6), torch.device("cpu"))  # the same sigma computed in another run
    with pytest.raises(feature_store.UnrecordedSigmaError,
                       match=r"no features recorded at sigma 7\.0000 \(recorded: 2 sigmas from 0\.0300 to 14\.6000\)"):
        store.at(7.0, torch.device("cpu"))
    assert store.get(14.6 * (1 + 1e-6), torch.device("cpu")) is None  # the cache matches exactly


def test_a_store_saved_and_loaded_is_exact(tmp_path):
    store = feature_store.FeatureStore(max_bytes=1 << 20)
    store.put(14.6, recording(0))
    store.put(0.5, recording(1), tag="weights-a")
    path = tmp_path / "content.features.safetensors"
    feature_store.save_store(store, str(path), metadata={"prompt": "a house"})
    assert not list(tmp_path.glob("*.partial"))
    loaded = feature_store.load_store(str(path))
    assert loaded.bytes == store.bytes and len(loaded) == 2 and loaded.sigmas() == [14.6]
    for sigma, tag, seed in ((14.6, None, 0), (0.5, "weights-a", 1)):
        expected, got = recording(seed), loaded.at(sigma, torch.device("cpu"), tag=tag)
        assert set(got) == set(expected)
        for site, value in expected.items():
            assert type(got[site]) is type(value)
            pairs = [(value, got[site])] if isinstance(value, torch.Tensor) else [
                (getattr(value, f), getattr(got[site], f)) for f in value.__dataclass_fields__]
            for want, have in pairs:
                assert want.dtype == have.dtype and torch.equal(want, have)


def test_a_failed_save_leaves_no_file_and_foreign_files_are_refused(tmp_path):
    @dataclass(frozen=True)
    class Unregistered:
        x: torch.Tensor

    store = feature_store.FeatureStore(max_bytes=1 << 20)
    store.put(1.0, {"site": Unregistered(torch.ones(2))})
    path = tmp_path / "bad.safetensors"
    with pytest.raises(TypeError, match="Unregistered at site is not a registered feature type"):
        feature_store.save_store(store, str(path))
    assert not list(tmp_path.iterdir())
    save_file({"x": torch.ones(1)}, str(path))
    with pytest.raises(ValueError, match="is not a feature store saved by this pack"):
        feature_store.load_store(str(path))
