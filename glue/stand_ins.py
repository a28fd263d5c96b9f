"""The one way this pack stands in for a layer of the model: a view of the layer itself.

Some behaviours act inside a module that sees no transformer_options (StyleAligned's shared
GroupNorm, Style Injection's ResBlock output, a masked blend's LoRA deltas). Each is installed as a
ModelPatcher object patch, and ComfyUI applies weight patches (LoRA, LoCon, LyCORIS norms, model
merges) by the weight's name in the model. A wrapper that kept the layer as a child would rename its
weights (".../norm.weight" for ".../weight") and ComfyUI would skip their patches, in full and in
partial loading, and (the model staying loaded with "its" patches) in later runs of the same MODEL.

So a stand-in is the layer seen through a subclass of the layer's own class: it shares the layer's
instance dictionary (its parameters, buffers, ComfyUI's load flags, casts and per-layer weight
functions), so every name is the layer's and whatever ModelPatcher does to the stand-in (patching,
casting, offloading, restoring) it does to the layer. What the stand-in adds lives on its class: the
layer it stands in for and its behaviours, called outermost last:

    behaviour(layer, x, forward) -> output, forward(x) being the layer (and the inner behaviours).
"""

import comfy.ops
import torch


class StandIn:
    """Mixed in before the layer's class; a class of its own per stand-in holds what it adds."""

    stand_in_for: torch.nn.Module
    stand_in_behaviours: tuple

    def forward(self, x, *args, **kwargs):
        forward = lambda y: super(StandIn, self).forward(y, *args, **kwargs)  # noqa: E731  the layer's own
        for behaviour in self.stand_in_behaviours:
            forward = _bind(behaviour, self, forward)
        return forward(x)


def _bind(behaviour, layer, forward):
    return lambda y: behaviour(layer, y, forward)


def original_layer(module: torch.nn.Module) -> torch.nn.Module:
    """The layer a stand-in stands in for (module itself if it is none)."""
    return module.stand_in_for if isinstance(module, StandIn) else module


def behaviours_of(module: torch.nn.Module) -> tuple:
    return module.stand_in_behaviours if isinstance(module, StandIn) else ()


def stand_in(layer: torch.nn.Module, *behaviours) -> torch.nn.Module:
    """A stand-in for layer (or for the layer a stand-in stands in for) with these behaviours."""
    layer = original_layer(layer)
    cls = type(layer)
    view = type(f"StandIn{cls.__name__}", (StandIn, cls),
                {"stand_in_for": layer, "stand_in_behaviours": tuple(behaviours), "__module__": __name__})
    module = object.__new__(view)
    object.__setattr__(module, "__dict__", layer.__dict__)
    return module


def layer_weights(layer: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight and bias the layer's own forward would use on x: cast to x's dtype and device and
    patched per layer where ComfyUI casts this layer (manual cast, fp8 weights, partial loading)."""
    if getattr(layer, "comfy_cast_weights", False) or getattr(layer, "weight_function", None):
        return comfy.ops.cast_bias_weight(layer, x)[:2]  # (weight, bias): the legacy form on every host
    return layer.weight, layer.bias
