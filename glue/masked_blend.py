"""Builds a masked style blend: one MODEL (a clone of the base) whose every model call runs the base
and each styled branch on the same latent and fuses their predictions by mask.

The branches are the base's UNet with other patches. What a branch adds is carried into the blend:
- weight patches (its LoRA): low-rank deltas active during its call only (branch_weights.py);
- transformer_options (attention patches, apply_model wrappers, this pack's styles): its own per call;
- object patches: this pack's slot-driven stand-ins (content injection) are merged with the base's
  and the other branches' at the same layer; each acts only while its own node's call runs.
The base's and branches' sampler-level options (CFG functions, the model function wrapper) are the
blend's own, i.e. the base's: CFG is applied once, to the fused prediction.
"""

import comfy.patcher_extension

from ..attention_patches.injection import InjectedResidual
from ..attention_patches.shared_norm import SharedGroupNorm
from .branch_weights import BranchWeightError, DeviceCopies, branch_deltas, weight_deltas
from .masked_calls import ActiveBranch, BlendError, Branch, MaskedBlendWrapper
from .stand_ins import behaviours_of, original_layer, stand_in

APPLY_MODEL = comfy.patcher_extension.WrappersMP.APPLY_MODEL
WRAPPER_KEY = "style_attention_nodes.masked_style_blend"


SLOT_DRIVEN = (InjectedResidual, SharedGroupNorm)  # act only while their own node's call runs


def slot_driven(patch) -> bool:
    """A stand-in of this pack whose every behaviour acts only while its own node's call runs."""
    behaviours = behaviours_of(patch)
    return bool(behaviours) and all(isinstance(behaviour, SLOT_DRIVEN) for behaviour in behaviours)


def sole_injection(patch) -> InjectedResidual | None:
    """The content injection a stand-in does, where that is all it does."""
    behaviours = behaviours_of(patch)
    return behaviours[0] if len(behaviours) == 1 and isinstance(behaviours[0], InjectedResidual) else None


def own_transformer_options(model) -> dict:
    """The transformer_options a model's calls start from: its model_options' and its ModelPatcher
    wrappers and callbacks (as ComfyUI merges them when sampling)."""
    options = dict(model.model_options.get("transformer_options", {}))
    for name in ("wrappers", "callbacks"):
        merged = {kind: {key: list(items) for key, items in by_key.items()}
                  for kind, by_key in options.get(name, {}).items()}
        for kind, by_key in getattr(model, name).items():
            for key, items in by_key.items():
                merged.setdefault(kind, {}).setdefault(key, []).extend(items)
        options[name] = merged
    return options


def merge_object_patches(blended, branch, base, name: str) -> None:
    for path, patch in branch.object_patches.items():
        if patch is base.object_patches.get(path):
            continue
        current = blended.object_patches.get(path)
        if current is patch:
            continue
        if not slot_driven(patch):  # it would act on the base and every branch
            raise BlendError(
                f"{name}: its model replaces {path} ({described(patch)}), which the base model does not: in a "
                "blend it would act everywhere; put that node on the base model (before the blend), or leave it out")
        if current is None:
            blended.add_object_patch(path, patch)
        elif sole_injection(current) is not None and sole_injection(patch) is not None:
            blended.add_object_patch(path, stand_in(current, sole_injection(current).merged_with(sole_injection(patch))))
        else:
            raise BlendError(
                f"{name}: its model replaces {path} ({described(patch)}) where the base or another branch "
                f"replaces it too ({described(current)}); only this pack's content injections share a layer")


def described(patch) -> str:
    """An object patch as named in errors: this pack's behaviours, or another pack's class."""
    behaviours = behaviours_of(patch)
    return " + ".join(type(b).__name__ for b in behaviours) if behaviours else type(patch).__name__


def check_no_guidance_of_its_own(name: str, branch, base) -> None:
    """CFG runs once, on the fused prediction, with the base's functions: a branch's own post-CFG
    function (StyleKeeper's NVQG or colour calibration on a style node) would be lost silently."""
    theirs = branch.model_options.get("sampler_post_cfg_function", [])
    mine = base.model_options.get("sampler_post_cfg_function", [])
    added = theirs[len(mine):]  # a clone's list starts with (copies of) the base's: ModelPatcher.clone deep-copies
    if added:
        raise BlendError(
            f"{name}: its model adds a post-CFG function ({type(added[0]).__name__}: e.g. Visual Style Prompting's "
            "nvqg_weight or calibrate_colors) that a blend cannot keep (CFG runs once, on the fused prediction): "
            "turn it off on that branch, or put that node on the base model before the blend")


def masked_style_blend(base, branches: list[tuple[str, str, object, object, str, object]]):
    """base MODEL and (model input, mask input, styled MODEL, MASK, edge rule, its own prompt's
    embedding or None) per branch -> the blend."""
    if not branches:
        raise BlendError("connect at least one styled model and its mask")
    for name, _, model, _, _, _ in branches:
        if not model.is_clone(base):
            raise BlendError(
                f"{name}: this model is not the base model's UNet (another checkpoint, or loaded separately); "
                "a branch is the base MODEL with a LoRA or style nodes after it, so that one copy of the UNet serves all")
        check_no_guidance_of_its_own(name, model, base)
    blended = base.clone()
    for key in list(blended.wrappers.get(APPLY_MODEL, {})):
        blended.remove_wrappers_with_key(APPLY_MODEL, key)
    topts = blended.model_options.setdefault("transformer_options", {})
    if APPLY_MODEL in topts.get("wrappers", {}):
        topts["wrappers"] = {kind: by_key for kind, by_key in topts["wrappers"].items() if kind != APPLY_MODEL}
    active = ActiveBranch()
    per_layer: dict[str, dict[int, list]] = {}
    for index, (name, _, model, _, _, _) in enumerate(branches):
        merge_object_patches(blended, model, base, name)
        try:
            deltas = weight_deltas(base, model)
        except BranchWeightError as error:
            raise BlendError(f"{name}: {error}") from None
        for path, terms in deltas.items():
            per_layer.setdefault(path, {})[index] = terms
    copies = DeviceCopies()
    for path, deltas in per_layer.items():
        current = blended.object_patches.get(path)
        if current is not None and sole_injection(current) is None:
            raise BlendError(f"a branch's LoRA patches {path}, which {described(current)} already replaces")
        layer = original_layer(current) if current is not None else blended.get_model_object(path)
        try:
            added = branch_deltas(layer, deltas, active, path, copies)
        except BranchWeightError as error:
            raise BlendError(str(error)) from None
        # the deltas act inside the injection: a branch's recorded source is its own layer's output
        blended.add_object_patch(path, stand_in(layer, added, *behaviours_of(current) if current is not None else ()))
    blended.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_DETACH, WRAPPER_KEY, copies)
    for _, _, model, _, _, _ in branches:  # the branches' style nodes release what they hold with the blend
        for kind in (comfy.patcher_extension.CallbacksMP.ON_DETACH, comfy.patcher_extension.CallbacksMP.ON_CLEANUP):
            for key, callbacks in model.callbacks.get(kind, {}).items():
                if key not in blended.callbacks.get(kind, {}):
                    for callback in callbacks:
                        blended.add_callback_with_key(kind, key, callback)
    wrapper = MaskedBlendWrapper(
        base_options=own_transformer_options(base),
        static_keys=frozenset(topts) | {"wrappers", "callbacks"},
        branches=tuple(Branch(mask_name, own_transformer_options(model), mask, edges, prompt)
                       for _, mask_name, model, mask, edges, prompt in branches),
        active=active,
    )
    blended.add_wrapper_with_key(APPLY_MODEL, WRAPPER_KEY, wrapper)
    return blended
