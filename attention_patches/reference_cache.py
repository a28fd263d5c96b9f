"""Recorded reference passes kept across steps and runs, so the reference branch runs once per sigma.

An external reference's features at a sigma depend only on the reference, the sigma and the model
weights, so a recording is keyed by (weights, sigma) and replayed. Recordings are kept until a byte
budget is full; past it, a sigma is recorded again each time it comes (sampling visits sigmas in a
cycle, where evicting old recordings for new ones would keep none of them useful). Optionally the
recordings wait on the CPU.
"""

import dataclasses
import torch

from .reference import ReferenceFeatureStore


def map_tensors(value, fn):
    """Apply fn to a tensor, or to every tensor field of a (frozen) dataclass of tensors."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    return dataclasses.replace(value, **{f.name: fn(getattr(value, f.name)) for f in dataclasses.fields(value)})


def tensor_bytes(value) -> int:
    return sum(_count(t) for t in _tensors(value))


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    return [getattr(value, f.name) for f in dataclasses.fields(value)]


def _count(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class ReferenceFeatureCache:
    def __init__(self, max_bytes: int, offload_device: torch.device | None = None):
        self.max_bytes = max_bytes
        self.offload_device = offload_device
        self._recordings: dict[tuple, dict] = {}
        self.bytes = 0

    def get(self, key: tuple, device: torch.device) -> ReferenceFeatureStore | None:
        features = self._recordings.get(key)
        if features is None:
            return None
        if self.offload_device is not None:
            features = {name: map_tensors(value, lambda t: t.to(device, non_blocking=True)) for name, value in features.items()}
        return ReferenceFeatureStore(recording=False, features=features)

    def put(self, key: tuple, store: ReferenceFeatureStore) -> None:
        features = store.features
        if self.offload_device is not None:
            features = {name: map_tensors(value, lambda t: t.to(self.offload_device)) for name, value in features.items()}
        size = sum(tensor_bytes(value) for value in features.values())
        if key in self._recordings or self.bytes + size > self.max_bytes:
            return
        self._recordings[key] = features
        self.bytes += size

    def clear(self) -> None:
        self._recordings.clear()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._recordings)
