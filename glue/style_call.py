"""What runs inside each model call for a style node: its apply_model wrapper (StyleCallWrapper),
which decides per call whether the style is on, runs an external reference's own pass, keeps its
recordings in the node's cache, and fills the node's shared-norm slot."""

from collections.abc import Callable
from dataclasses import dataclass, field

import comfy.model_patcher
import comfy.patcher_extension

from ..attention_patches.feature_store import FeatureStore
from ..attention_patches.reference import ReferenceFeatureStore
from ..attention_patches.sigma_range import SigmaRange
from ..attention_patches.style_call import (BRANCH_OPTION, CALLS_OPTION, NEGATIVE_OPTION, NORM_SLOTS_OPTION,
                                           RECORDING_OPTION, ModelCallSlot, StyleCall, StyleOwner)
from ..attention_patches.reference_set import mixed_recording
from .references import ExternalReference, ReferenceSet

WRAPPER_KEY_PREFIX = "style_attention_nodes.style_call."


@dataclass(frozen=True)
class StyleCallWrapper:
    """A style node's apply_model wrapper: decides once per model call whether its style is on and
    hands its layers (and its shared norms) a StyleCall.

    With an external reference it first runs the reference alone (every other style of this pack
    off), recording its features, or takes them from the cache; then the targets replay them (a
    ReferenceSet: each of its references so, their recordings read together, reference_set.py). The
    layers and the modules behind norm_call may act on different sigma ranges (plug-and-play injects
    attention and features for different parts of the schedule); the reference pass records both.
    """

    owner: StyleOwner
    reference: ExternalReference | ReferenceSet | None
    active_range: SigmaRange
    norm_call: ModelCallSlot | None = None
    cache: FeatureStore | tuple[FeatureStore | None, ...] | None = None  # a set's: one per reference
    slot_range: SigmaRange | None = None  # where norm_call's modules act, when not active_range
    with_timestep: bool = False  # StyleCalls carry the model timestep
    recorded: FeatureStore | None = None  # the reference's features recorded by another run: no pass here
    tokens: Callable | None = None  # a DiT adapter's token_grid(x, c_crossattn) -> TokenGrid; None on a UNet
    memory: "StepMemory" = field(default_factory=lambda: StepMemory(), compare=False, repr=False)

    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        # another node's reference pass, or outside this style's steps: its layers find no StyleCall
        if RECORDING_OPTION in transformer_options:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        sigma = float(t[0])  # the one device-to-host read of the call
        layers_on = self.active_range.contains(sigma)
        slot_on = self.norm_call is not None and (self.slot_range or self.active_range).contains(sigma)
        if not (layers_on or slot_on):
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        store = None
        if self.recorded is not None:
            store = ReferenceFeatureStore(recording=False, features=self.recorded.at(sigma, x.device))
        elif self.reference is not None:
            store = self._reference_features(executor, t[:1], sigma, x, transformer_options)
        call = StyleCall(tuple(transformer_options["cond_or_uncond"]), store, self._timestep(executor, t, sigma),
                         negative=transformer_options.get(NEGATIVE_OPTION) == self.owner,
                         tokens=None if self.tokens is None else self.tokens(x, c_crossattn))
        options = dict(transformer_options)
        if layers_on:
            options[CALLS_OPTION] = {**transformer_options.get(CALLS_OPTION, {}), self.owner: call}
        if not slot_on:
            return executor(x, t, c_concat, c_crossattn, control, options, **kwargs)
        options[NORM_SLOTS_OPTION] = (*transformer_options.get(NORM_SLOTS_OPTION, ()), self.norm_call)
        self.norm_call.current = call
        try:
            return executor(x, t, c_concat, c_crossattn, control, options, **kwargs)
        finally:
            self.norm_call.current = None

    def _timestep(self, executor, t, sigma: float) -> float | None:
        """The model timestep at this sigma, for styles that follow the schedule (read once per sigma)."""
        if not self.with_timestep:
            return None
        timesteps = self.memory.timesteps
        if sigma not in timesteps:
            timesteps[sigma] = float(executor.class_obj.model_sampling.timestep(t[:1])[0])
        return timesteps[sigma]

    def _reference_features(self, executor, sigma, sigma_value: float, x, transformer_options) -> ReferenceFeatureStore:
        """The step's reference features: one reference's recording, or a set's recordings mixed."""
        # the loaded weights, and which masked-blend branch's deltas act on them in this call
        weights = (getattr(executor.class_obj, "current_weight_patches_uuid", None), transformer_options.get(BRANCH_OPTION))
        step = (sigma_value, weights, x.device)
        memory = self.memory
        if memory.step is None or memory.step != step:
            if isinstance(self.reference, ReferenceSet):
                recordings = [self._recording(executor, member, cache, sigma, sigma_value, x, transformer_options, weights)
                              for member, cache in zip(self.reference.members, self.cache)]
                features = mixed_recording(recordings, self.reference.weights)
            else:
                features = self._recording(executor, self.reference, self.cache, sigma, sigma_value, x,
                                           transformer_options, weights)
            memory.step, memory.features = step, features
        return ReferenceFeatureStore(recording=False, features=memory.features)

    def _recording(self, executor, reference: ExternalReference, cache: FeatureStore | None, sigma, sigma_value: float,
                   x, transformer_options, weights) -> dict:
        """One reference's features at this step: from its cache, or recorded by a pass of its own (then kept)."""
        if cache is not None:
            cached = cache.get(sigma_value, x.device, tag=weights)
            if cached is not None:
                return cached
        base_model = executor.class_obj
        reference_x = reference.state_at(base_model, sigma.cpu()).to(x)
        inputs = reference.model_inputs(base_model, reference_x)
        options = {**transformer_options, "cond_or_uncond": [0], "sigmas": sigma}
        # shared norms of other nodes, filled by wrappers outside this one, are off during the pass
        others = transformer_options.get(NORM_SLOTS_OPTION, ())
        saved = [slot.current for slot in others]
        for slot in others:
            slot.current = None
        try:
            c_concat, c_crossattn = inputs.pop("c_concat", None), inputs.pop("c_crossattn", None)
            tokens = None if self.tokens is None else self.tokens(reference_x, c_crossattn)
            _, store = recording_pass(executor, self.owner, self.norm_call, self._timestep(executor, sigma, sigma_value),
                                      reference_x, sigma, c_concat, c_crossattn, None, options, tokens=tokens, **inputs)
        finally:
            for slot, current in zip(others, saved):
                slot.current = current
        if cache is not None:
            cache.put(sigma_value, store.features, tag=weights)
        return store.features


def recording_pass(executor, owner: StyleOwner, slot: ModelCallSlot | None, timestep: float | None, x, t, c_concat,
                   c_crossattn, control, transformer_options: dict, tokens=None, **kwargs):
    """One model call in which owner's layers (and the modules behind slot) record what they see and
    every other style of this pack is off: (the call's output, its ReferenceFeatureStore)."""
    store = ReferenceFeatureStore()
    call = StyleCall((0,), store, timestep, tokens=tokens)
    options = {**transformer_options, RECORDING_OPTION: owner, CALLS_OPTION: {owner: call}}
    if slot is not None:
        slot.current = call
    try:
        out = executor(x, t, c_concat, c_crossattn, control, options, **kwargs)
    finally:
        if slot is not None:
            slot.current = None
    return out, store


def install_style_call(model: comfy.model_patcher.ModelPatcher, owner: StyleOwner,
                       reference: ExternalReference | ReferenceSet | None,
                       active_range: SigmaRange, norm_call: ModelCallSlot | None = None,
                       slot_range: SigmaRange | None = None, with_timestep: bool = False,
                       recorded: FeatureStore | None = None, tokens=None) -> None:
    """The wrapper (and, with a cache, its unload callback) under keys of this node's own."""
    cache = None if reference is None else reference.new_cache()
    key = f"{WRAPPER_KEY_PREFIX}{owner.node_id}.{owner.uid}"
    wrapper = StyleCallWrapper(owner, reference, active_range, norm_call, cache, slot_range, with_timestep, recorded,
                               tokens=tokens)
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, key, wrapper)
    if reference is not None:
        model.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_CLEANUP, key, ForgetStep(wrapper.memory))
    stores = {key: cache} if not isinstance(cache, tuple) else {f"{key}.{n}": store for n, store in enumerate(cache)}
    for store_key, store in stores.items():
        if store is not None:
            model.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_DETACH, store_key, ClearOnUnload(store))


@dataclass(eq=False)
class StepMemory:
    """What a StyleCallWrapper remembers between the model calls of a run (its one mutable part):
    the model timestep of each sigma seen, and the current step's reference features for the step's
    other model calls (cond and uncond run apart, the negative branch), whatever the cache holds.
    The features go when sampling ends (ForgetStep)."""

    timesteps: dict = field(default_factory=dict)
    step: tuple | None = None  # (sigma, loaded weights and branch, device) of features
    features: dict | None = None


@dataclass(frozen=True, eq=False)
class ForgetStep:
    """ModelPatcher cleanup callback (after each sampling run): the last step's reference features go."""

    memory: StepMemory

    def __call__(self, patcher) -> None:
        self.memory.step = self.memory.features = None


@dataclass(frozen=True)
class ClearOnUnload:
    """ModelPatcher detach callback. ComfyUI also detaches a model (unpatch_all False) when it swaps in
    the next sampling run's clone of it; only a real unload (unpatch_all True) drops the recordings."""

    cache: FeatureStore

    def __call__(self, patcher, unpatch_all: bool) -> None:
        if unpatch_all:
            self.cache.clear()
