"""One adapter per model family: where its attention sites are and what they are called, its presets,
the token layout of each attention call, and how a behaviour is installed there. Nodes pick the
adapter from the model (adapter_for) and never name a block themselves; methods stay
architecture-free.

Adding an architecture: docs/ADDING_A_METHOD.md, "Adding an architecture"."""

import comfy.model_patcher

from ...attention_patches.layers import CUSTOM, LayerSelectionError
from .flux import FluxAdapter
from .joint_blocks import HostTooOld
from .lumina import LuminaAdapter
from .mmdit import MMDiTAdapter
from .qwen_image import QwenImageAdapter
from .unet import UNetAdapter

ADAPTERS = (UNetAdapter, FluxAdapter, MMDiTAdapter, QwenImageAdapter, LuminaAdapter)
UNET_ONLY = (UNetAdapter,)
AUTO = "auto"  # the method's default preset on the model's family (each adapter's `auto`)
# Every family's presets in one list, for a node's layers input: auto first, custom last.
LAYER_CHOICES = (AUTO, *dict.fromkeys(p for adapter in ADAPTERS for p in adapter.presets if p != CUSTOM), CUSTOM)


class UnsupportedModelError(ValueError):
    pass


def adapter_for(model: comfy.model_patcher.ModelPatcher, node_name: str, families: tuple = UNET_ONLY):
    """The adapter of this model's family, among the families the node supports; any other model is
    refused by name."""
    for adapter in families:
        try:
            found = adapter.of(model)
        except HostTooOld as error:
            raise UnsupportedModelError(f"{node_name}: {error}") from None
        if found is not None:
            return found
    names = [adapter.models for adapter in families]
    covered = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
    model_name = type(model.get_model_object("diffusion_model")).__name__
    raise UnsupportedModelError(f"{node_name} works on {covered}; this model is {model_name}")


def resolve_layers(adapter, preset: str, custom_layers: str, method: str) -> list:
    """The sites a layers choice selects on this model: auto is the method's default on its family."""
    if preset == AUTO:
        preset = adapter.auto[method]
    elif preset not in adapter.presets:
        raise LayerSelectionError(f"layers: {preset!r} is a preset of another model family; this model is "
                                  f"{adapter.family}: choose {AUTO} or one of {', '.join(adapter.presets)}")
    return adapter.resolve(preset, custom_layers)
