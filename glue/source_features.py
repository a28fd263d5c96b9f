"""A content's source-branch features, recorded once (by any MODEL, e.g. the plain checkpoint) and
replayed into the runs of other models (each style's LoRA), or saved to a file.

The recording is a loop in ComfyUI's guider (glue/guided_loop.py): at each sigma of the sampling
schedule the content's inverted latent there goes through the model alone, with the injection sites
recording into a ReferenceFeatureStore, which is kept in an untagged FeatureStore.
"""

import json
from dataclasses import dataclass

import torch
from safetensors import safe_open

import comfy.patcher_extension

from ..attention_patches.feature_store import FeatureStore, load_store, save_store, tensor_bytes
from ..attention_patches.style_call import ModelCallSlot
from ..attention_patches.style_call import StyleOwner
from .guided_loop import run_guided_loop
from .references import InversionReference
from .style_call import recording_pass

RECORDER_KEY = "style_attention_nodes.source_recorder"


class FeatureBudgetError(ValueError):
    pass


@dataclass(frozen=True)
class RecordedSource:
    """CONTENT_FEATURES: what a source branch left at each recorded sigma, and where it was recorded."""

    store: FeatureStore  # untagged: {sigma: {site: feature}}
    layers: tuple  # self-attention layers (block, number, index)
    paths: tuple[str, ...]  # residual-branch module paths
    latent_shape: tuple[int, ...]  # (1, C, H, W) of the content
    cross_layers: tuple = ()  # cross-attention layers

    def missing(self, layers, cross_layers, paths) -> list[str]:
        return ([".".join(map(str, layer)) for layer in layers if tuple(layer) not in self.layers]
                + [".".join(map(str, layer)) + " (cross)" for layer in cross_layers if tuple(layer) not in self.cross_layers]
                + [path for path in paths if path not in self.paths])


@dataclass(frozen=True)
class RecordingWrapper:
    """apply_model wrapper of the recording clone: every call is a source pass whose features are kept."""

    owner: StyleOwner
    slot: ModelCallSlot | None
    store: FeatureStore

    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        out, features = recording_pass(executor, self.owner, self.slot, None, x, t, c_concat, c_crossattn, control,
                                       transformer_options, **kwargs)
        sigma = float(t[0])
        if not self.store.put(sigma, features.features):
            raise FeatureBudgetError(
                f"max_megabytes: {self.store.max_bytes / 2**20:.0f} MB hold {len(self.store)} of the schedule's "
                f"recordings (each about {sum(tensor_bytes(v) for v in features.features.values()) / 2**20:.1f} MB); "
                "raise max_megabytes or record a smaller fraction"
            )
        return out


def record_source(recording_model, owner: StyleOwner, slot: ModelCallSlot | None, source: InversionReference,
                  sigmas: torch.Tensor, store: FeatureStore) -> None:
    """Runs the content at each sigma (descending) on a clone carrying the recording sites."""
    model = recording_model.clone()
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, RECORDER_KEY,
                               RecordingWrapper(owner, slot, store))
    trajectory = source.trajectory
    for sigma in sigmas.tolist():
        trajectory.latent_at(sigma)  # a schedule the inversion does not hold fails before any model call

    def recording_loop(denoise, x, loop_sigmas, on_step):
        for i, sigma in enumerate(loop_sigmas[:-1]):
            state = trajectory.latent_at(float(sigma)).to(x)
            denoised = denoise(state, sigma.reshape(1).to(x))
            on_step(i, state, denoised)
        return x, None

    # the loop's sigmas end at 0 as a sampler's do; its latent only gives the guider the content's shape
    loop_sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    shape_only = torch.zeros(trajectory.latents.shape[1:])
    run_guided_loop(model, source.conditioning, source.conditioning, 1.0, loop_sigmas, shape_only, recording_loop)


FEATURES_FORMAT_KEY = "content_features"


def save_recorded(recorded: RecordedSource, path: str) -> None:
    meta = {"layers": [list(layer) for layer in recorded.layers], "paths": list(recorded.paths),
            "latent_shape": list(recorded.latent_shape), "cross_layers": [list(layer) for layer in recorded.cross_layers]}
    save_store(recorded.store, path, {FEATURES_FORMAT_KEY: json.dumps(meta)})


def load_recorded(path: str, offload_to_cpu: bool = True) -> RecordedSource:
    store = load_store(path, offload_device=torch.device("cpu") if offload_to_cpu else None)
    with safe_open(path, framework="pt") as archive:
        text = (archive.metadata() or {}).get(FEATURES_FORMAT_KEY)
    if text is None:
        raise ValueError(f"{path} is a feature store but not a content's features (saved by Save Content Features)")
    meta = json.loads(text)
    return RecordedSource(store, tuple(tuple(layer) for layer in meta["layers"]), tuple(meta["paths"]),
                          tuple(meta["latent_shape"]), tuple(tuple(layer) for layer in meta.get("cross_layers", [])))
