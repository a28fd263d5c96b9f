"""The style node's reference pass (its apply_model wrapper, which holds the reference K/V cache) and a
count of the model calls that run the reference alone."""

import comfy.patcher_extension


def reference_pass_of(model):
    """The style node's apply_model wrapper (the one of this pack's on the model)."""
    wrappers = model.wrappers[comfy.patcher_extension.WrappersMP.APPLY_MODEL]
    (key,) = [key for key in wrappers if key.startswith("style_attention_nodes.style_call.")]
    (wrapper,) = wrappers[key]
    return wrapper


def counting_reference_passes(model):
    """Counts the model calls that carry the reference alone (batch 1 while the targets are 2)."""
    unet = model.get_model_object("diffusion_model")
    calls = []
    handle = unet.register_forward_pre_hook(lambda m, args: calls.append(1) if args[0].shape[0] == 1 else None)
    return calls, handle
