"""Named features of a run, per sigma, kept for another run of the same or another MODEL.

A recording is what one model call at one sigma left: {site: feature}, a site naming the place (a
self-attention layer ("output", 3, 0), a module path "diffusion_model.output_blocks.4.0") and a
feature being a tensor or a frozen dataclass of tensors registered here (self-attention q/k/v,
GroupNorm moments, ...). Recordings are keyed by (tag, sigma): the reference cache tags them with
the model's weights, so a LoRA applied later records anew; a store meant for another MODEL (the
content's features read by a LoRA model) records untagged.

The byte budget is checked before anything is copied; past it a recording is not kept (sampling
visits sigmas in a cycle, where evicting old recordings for new ones would keep none useful).
A store is saved to and loaded from .safetensors, atomically, so features are computed once.
"""

import dataclasses
import json

import torch
from safetensors import safe_open

from ..safetensors_file import write_atomically

STORE_FORMAT = "style-attention-nodes/feature-store/1"
SIGMA_TOLERANCE = 1e-4  # relative, as the inversion's schedule check

FEATURE_TYPES: dict[str, type] = {}


def register_feature_type(cls: type) -> type:
    """Class decorator: a frozen dataclass of tensors that a store can hold and save."""
    FEATURE_TYPES[cls.__name__] = cls
    return cls


class UnrecordedSigmaError(ValueError):
    pass


def tensors_of(value) -> dict[str, torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return {"tensor": value}
    return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}


def rebuilt(value, tensors: dict[str, torch.Tensor]):
    """value's kind, holding tensors."""
    if isinstance(value, torch.Tensor):
        return tensors["tensor"]
    return dataclasses.replace(value, **tensors)


def tensor_bytes(value) -> int:
    return sum(t.numel() * t.element_size() for t in tensors_of(value).values())


def _sigma_matches(recorded: float, sigma: float) -> bool:
    return abs(recorded - sigma) <= SIGMA_TOLERANCE * max(1.0, abs(sigma))


class FeatureStore:
    def __init__(self, max_bytes: int, offload_device: torch.device | None = None):
        self.max_bytes = max_bytes
        self.offload_device = offload_device
        self._recordings: dict[tuple, dict] = {}  # (tag, sigma) -> {site: feature}
        self.bytes = 0

    def _find(self, sigma: float, tag, tolerant: bool = False) -> tuple | None:
        if (tag, sigma) in self._recordings:
            return (tag, sigma)
        if not tolerant:
            return None
        return next((key for key in self._recordings if key[0] == tag and _sigma_matches(key[1], sigma)), None)

    def _copy(self, tensor: torch.Tensor, device: torch.device | None) -> torch.Tensor:
        """The one place a store copies a tensor (None: stays where it is)."""
        return tensor if device is None else tensor.to(device, non_blocking=True)

    def _moved(self, features: dict, device: torch.device | None) -> dict:
        return {site: rebuilt(value, {name: self._copy(t, device) for name, t in tensors_of(value).items()})
                for site, value in features.items()}

    def put(self, sigma: float, features: dict, tag=None) -> bool:
        """Keeps a recording if it fits the budget (checked first: nothing is copied otherwise)."""
        size = sum(tensor_bytes(value) for value in features.values())
        if self._find(sigma, tag) is not None or self.bytes + size > self.max_bytes:
            return False
        self._recordings[(tag, sigma)] = self._moved(features, self.offload_device)
        self.bytes += size
        return True

    def get(self, sigma: float, device: torch.device, tag=None, tolerant: bool = False) -> dict | None:
        """The recording at exactly this sigma (within SIGMA_TOLERANCE if tolerant) on device, or
        None where none was kept."""
        key = self._find(sigma, tag, tolerant)
        if key is None:
            return None
        if self.offload_device is None:  # kept where they were recorded: nothing to copy
            return dict(self._recordings[key])
        return self._moved(self._recordings[key], device)

    def at(self, sigma: float, device: torch.device, tag=None) -> dict:
        """The recording at sigma, for a run on another schedule computation (another MODEL, a later
        session): sigmas match within SIGMA_TOLERANCE; one not recorded is an error that says which are."""
        features = self.get(sigma, device, tag, tolerant=True)
        if features is None:
            recorded = sorted(s for t, s in self._recordings if t == tag)
            span = f"{len(recorded)} sigmas from {recorded[0]:.4f} to {recorded[-1]:.4f}" if recorded else "none"
            raise UnrecordedSigmaError(
                f"no features recorded at sigma {sigma:.4f} (recorded: {span}); sample with the steps and "
                "scheduler of the run that recorded them"
            )
        return features

    def sigmas(self, tag=None) -> list[float]:
        return sorted(s for t, s in self._recordings if t == tag)

    def clear(self) -> None:
        self._recordings.clear()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._recordings)


def _encode_site(site):
    return list(site) if isinstance(site, tuple) else site


def _decode_site(site):
    return tuple(site) if isinstance(site, list) else site


def save_store(store: FeatureStore, path: str, metadata: dict[str, str] | None = None) -> None:
    """Write to a .safetensors file atomically: a failed write leaves no partial file behind."""
    tensors, index = {}, []
    for number, ((tag, sigma), features) in enumerate(store._recordings.items()):
        entries = []
        for position, (site, value) in enumerate(features.items()):
            kind = "Tensor" if isinstance(value, torch.Tensor) else type(value).__name__
            if kind != "Tensor" and FEATURE_TYPES.get(kind) is not type(value):
                raise TypeError(f"{kind} at {site} is not a registered feature type")
            for name, tensor in tensors_of(value).items():
                tensors[f"{number}/{position}/{name}"] = tensor
            entries.append({"site": _encode_site(site), "type": kind})
        index.append({"tag": tag, "sigma": sigma, "features": entries})
    write_atomically(tensors, path, {**(metadata or {}), "format": STORE_FORMAT, "index": json.dumps(index)})


def load_store(path: str, max_bytes: int | None = None,
               offload_device: torch.device | None = torch.device("cpu")) -> FeatureStore:
    """A saved store, its recordings waiting on the CPU (get brings them to the device asked for);
    max_bytes defaults to its size."""
    with safe_open(path, framework="pt") as archive:
        metadata = archive.metadata() or {}
        if metadata.get("format") != STORE_FORMAT:
            raise ValueError(f"{path} is not a feature store saved by this pack")
        index = json.loads(metadata["index"])
        loaded = []
        for number, recording in enumerate(index):
            features = {}
            for position, entry in enumerate(recording["features"]):
                prefix = f"{number}/{position}/"
                fields = {name[len(prefix):]: archive.get_tensor(name) for name in archive.keys() if name.startswith(prefix)}
                if entry["type"] == "Tensor":
                    features[_decode_site(entry["site"])] = fields["tensor"]
                else:
                    features[_decode_site(entry["site"])] = FEATURE_TYPES[entry["type"]](**fields)
            loaded.append((recording["tag"], recording["sigma"], features))
    total = sum(tensor_bytes(v) for _, _, features in loaded for v in features.values())
    store = FeatureStore(total if max_bytes is None else max_bytes, offload_device)
    for tag, sigma, features in loaded:
        store.put(sigma, features, tag)
    return store
