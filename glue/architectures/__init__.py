"""One adapter per model family: where its attention sites are and what they are called, its presets,
the token layout of each attention call, and how a behaviour is installed there. Nodes pick the
adapter from the model (adapter_for) and never name a block themselves; methods stay
architecture-free.

Adding an architecture: docs/ADDING_A_METHOD.md, "Adding an architecture"."""

import comfy.model_patcher

from .unet import UNetAdapter

ADAPTERS = (UNetAdapter,)


class UnsupportedModelError(ValueError):
    pass


def adapter_for(model: comfy.model_patcher.ModelPatcher, node_name: str):
    """The adapter of this model's family; a model no adapter covers is refused by name."""
    for adapter in ADAPTERS:
        found = adapter.of(model)
        if found is not None:
            return found
    families = "; ".join(adapter.family for adapter in ADAPTERS)
    raise UnsupportedModelError(f"{node_name} works on UNet models (SD1.x, SD2.x, SDXL); this model is "
                                f"{type(model.get_model_object('diffusion_model')).__name__} (supported: {families})")
