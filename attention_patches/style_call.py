"""What each style node's layers know about the model call in progress, decided once per call.

Every style node of this pack is one StyleOwner. Its APPLY_MODEL wrapper decides, once per model
call, whether the style is on at this sigma and where its reference comes from, and hands that to
its layers as a StyleCall under CALLS_OPTION; the layers never read the sigma or the device
themselves. Nodes chained on one MODEL each have their own entry, so each layer uses the reference
of the node that styled it.

An external reference's own pass runs with every other style of this pack off (RECORDING_OPTION
names whose pass it is): a reference is recorded as its image alone, whatever else the chain does.
"""

from dataclasses import dataclass, field

from .reference import ReferenceFeatureStore
from .token_layout import TokenGrid

# The transformer_options keys this pack owns (ATTENTION_MAPS_OPTION in attention_maps.py too).
CALLS_OPTION = "style_attention_nodes.calls"  # {StyleOwner: StyleCall} of the styles on in this call
RECORDING_OPTION = "style_attention_nodes.recording_pass"  # the StyleOwner whose reference pass this call is
NORM_SLOTS_OPTION = "style_attention_nodes.norm_slots"  # shared-norm slots filled for this call
BRANCH_OPTION = "style_attention_nodes.branch"  # a masked blend's branch whose call this is (its weights differ)
NEGATIVE_OPTION = "style_attention_nodes.negative"  # the StyleOwner whose negative (NVQG) branch this call is


@dataclass(frozen=True)
class StyleOwner:
    """One style node's output: the node id names it in errors, uid tells two of a kind apart."""

    node_id: str
    uid: str

    def __str__(self) -> str:
        return self.node_id


@dataclass(frozen=True)
class StyleCall:
    """A style that is on in this model call: the call's cond/uncond layout, for an external
    reference its features (recording during the reference's own pass, replaying after), the
    model timestep of the call for behaviours that follow the schedule (None where none asks),
    whether the call is the style's negative branch (StyleKeeper's negative visual query guidance),
    and on a DiT the call's tokens (TokenGrid; None on a UNet, whose layers see image tokens alone)."""

    cond_or_uncond: tuple[int, ...]
    store: ReferenceFeatureStore | None
    timestep: float | None = None
    negative: bool = False
    tokens: TokenGrid | None = None


@dataclass
class ModelCallSlot:
    """Where modules that see no transformer_options (StyleAligned's shared norms, the injected
    ResBlocks) find their node's StyleCall: the node's wrapper puts it here for the duration of each
    model call, None while the style is off."""

    current: StyleCall | None = field(default=None)


def style_call(extra_options: dict, owner: StyleOwner) -> StyleCall | None:
    """owner's StyleCall, or None where its style is off in this call (outside its steps, or during
    another node's reference pass)."""
    recording = extra_options.get(RECORDING_OPTION)
    if recording is not None and recording != owner:
        return None
    calls = extra_options.get(CALLS_OPTION)
    return None if calls is None else calls.get(owner)
