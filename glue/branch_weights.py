"""A styled branch's weights as low-rank deltas on the base's layers, so that several LoRA branches
run in one step on one copy of the UNet.

A branch MODEL is the base MODEL with other weight patches (a style LoRA). Swapping patched weights
in and out every step (what ComfyUI's hooks do, with a cached copy of the patched layers per hook
group) costs a copy of those layers per style; here each patched layer keeps its base weight and
adds, while its branch's call runs, up(down(x)) * strength * alpha / rank for the LoRAs the branch
has and the base lacks (minus those the base has and the branch lacks). The layer that does so is a
stand-in for the base layer (stand_ins.py), so ModelPatcher's own weight patches, casts and offloading
still apply to it.
"""

from dataclasses import dataclass, field

import torch

import comfy.weight_adapter

from .masked_calls import ActiveBranch


class BranchWeightError(ValueError):
    pass


@dataclass
class DeviceCopies:
    """The LoRA matrices moved to the sampling device, once per device and dtype; a ModelPatcher detach
    callback of the blend: a real unload drops them."""

    moved: dict = field(default_factory=dict)

    def of(self, delta: "LowRankDelta", like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (id(delta), like.device, like.dtype)
        if key not in self.moved:
            self.moved[key] = (delta.up.to(like), delta.down.to(like))
        return self.moved[key]

    def __call__(self, patcher, unpatch_all: bool) -> None:
        if unpatch_all:
            self.moved.clear()


@dataclass(frozen=True)
class LowRankDelta:
    """strength * alpha / rank * up(down(x)) for a linear layer, or its convolution form."""

    up: torch.Tensor  # (out, rank) or (out, rank, 1, 1)
    down: torch.Tensor  # (rank, in) or (rank, in, kh, kw), or flattened (rank, in * kh * kw)
    scale: float

    def __call__(self, layer: torch.nn.Module, x: torch.Tensor, copies: DeviceCopies) -> torch.Tensor:
        up, down = copies.of(self, x)
        if isinstance(layer, torch.nn.Conv2d):
            down = down.reshape(down.shape[0], layer.in_channels, *layer.kernel_size)
            inner = torch.nn.functional.conv2d(x, down, None, layer.stride, layer.padding, layer.dilation)
            return torch.nn.functional.conv2d(inner, up.reshape(*up.shape[:2], 1, 1)) * self.scale
        return torch.nn.functional.linear(torch.nn.functional.linear(x, down.flatten(1)), up.flatten(1)) * self.scale


def low_rank(patch: tuple, key: str, sign: float) -> LowRankDelta:
    strength, adapter, strength_model, offset, function = patch
    plain_lora = (isinstance(adapter, comfy.weight_adapter.LoRAAdapter) and strength_model == 1.0 and offset is None
                  and function is None and adapter.weights[3] is None and adapter.weights[4] is None
                  and adapter.weights[5] is None)
    if not plain_lora or not key.endswith(".weight"):
        kind = adapter[0] if isinstance(adapter, tuple) and adapter else getattr(adapter, "name", type(adapter).__name__)
        raise BranchWeightError(
            f"the patch at {key} ({kind}) is not a plain LoRA (no DoRA, mid, offset or model strength); a branch's "
            "weights apply as low-rank deltas: merge that patch into the checkpoint, or put it on the base model")
    up, down, alpha = adapter.weights[:3]
    rank = down.shape[0]
    return LowRankDelta(up, down, sign * strength * (1.0 if alpha is None else float(alpha) / rank))


def weight_deltas(base, branch) -> dict[str, list[LowRankDelta]]:
    """{layer path: deltas} turning the base's weight patches into the branch's."""
    deltas: dict[str, list[LowRankDelta]] = {}
    for key in set(base.patches) | set(branch.patches):
        mine, theirs = base.patches.get(key, []), branch.patches.get(key, [])
        added = [patch for patch in theirs if not any(patch is other for other in mine)]
        removed = [patch for patch in mine if not any(patch is other for other in theirs)]
        terms = [low_rank(p, key, 1.0) for p in added] + [low_rank(p, key, -1.0) for p in removed]
        if terms:
            deltas[key.removesuffix(".weight")] = terms
    return deltas


@dataclass(frozen=True, eq=False)
class BranchDeltas:
    """What a stand-in for a Linear/Conv2d does in a blend (stand_ins.py: the layer itself seen through a
    subclass, so ModelPatcher's own weight patches, casts and offloading still apply to it): adds the
    active branch's deltas to the layer's output."""

    deltas: dict  # {branch index: [LowRankDelta]}
    active: ActiveBranch
    copies: DeviceCopies

    def __call__(self, layer: torch.nn.Module, x: torch.Tensor, forward) -> torch.Tensor:
        out = forward(x)
        for delta in self.deltas.get(self.active.current, ()):
            out = out + delta(layer, x, self.copies)
        return out


def branch_deltas(layer: torch.nn.Module, deltas: dict[int, list[LowRankDelta]], active: ActiveBranch,
                  path: str, copies: DeviceCopies) -> BranchDeltas:
    """The behaviour adding deltas[active.current] to layer's output; refused on a layer it cannot serve."""
    if not isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)) or getattr(layer, "groups", 1) != 1:
        raise BranchWeightError(f"the LoRA at {path} patches a {type(layer).__name__}; branches apply LoRAs to "
                                "linear and convolution layers")
    return BranchDeltas(deltas, active, copies)


def delta_bytes(deltas: dict[int, list[LowRankDelta]]) -> int:
    return sum(t.numel() * t.element_size() for terms in deltas.values() for d in terms for t in (d.up, d.down))
