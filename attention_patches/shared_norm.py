"""StyleAligned's shared GroupNorm: a target's statistics are computed jointly with the reference's.

The original concatenates [target ; reference] along the height axis and normalises the result,
keeping the target part. Here the same pooled mean and variance are computed from per-group
moments (the reference's are all an external reference needs to record), which also allows a
reference of another size. The reference itself is normalised alone (joining it with itself would
change nothing).

Layer norms are not shared: in the UNet's transformers each token is normalised over its own
channels, so normalising [target ; reference] tokens jointly gives exactly the plain result.
"""

from dataclasses import dataclass, field

import torch

from .reference import ReferenceFeatureStore, in_batch_references


@dataclass
class ModelCall:
    """What shared norms need to know about the model call in progress."""

    cond_or_uncond: list[int]
    store: ReferenceFeatureStore | None  # external reference (recording or replaying), or None: in-batch


@dataclass
class ModelCallSlot:
    """Shared by a model's shared norms; a wrapper fills it for the duration of each model call."""

    current: ModelCall | None = field(default=None)


@dataclass(frozen=True)
class GroupMoments:
    """Per-group statistics of one image: what joint normalisation needs of the reference."""

    count: torch.Tensor  # () positions * channels per group
    mean: torch.Tensor  # (groups,)
    variance: torch.Tensor  # (groups,), biased, as GroupNorm uses


def group_moments(x: torch.Tensor, groups: int) -> GroupMoments:
    grouped = x.reshape(x.shape[0], groups, -1)
    variance, mean = torch.var_mean(grouped, dim=-1, unbiased=False)
    return GroupMoments(torch.tensor(float(grouped.shape[-1])), mean[0], variance[0])


class SharedGroupNorm(torch.nn.Module):
    """Stands in for one GroupNorm (as a ModelPatcher object patch, removed when the model unpatches)."""

    def __init__(self, norm: torch.nn.GroupNorm, name: str, call: ModelCallSlot):
        super().__init__()
        self.norm = norm
        self.name = name
        self.call = call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        call = self.call.current
        if call is None:
            return self.norm(x)
        if call.store is not None:
            if call.store.recording:
                call.store.record(self.name, group_moments(x, self.norm.num_groups))
                return self.norm(x)
            return self._joint(x, call.store.get(self.name))
        outputs = []
        for ref, targets in in_batch_references(x.shape[0], call.cond_or_uncond):
            outputs.append(self.norm(x[ref]))
            outputs.append(self._joint(x[targets], group_moments(x[ref], self.norm.num_groups)))
        return torch.cat(outputs)

    def _joint(self, targets: torch.Tensor, reference: GroupMoments) -> torch.Tensor:
        """GroupNorm with each target's statistics pooled with the reference's (any size of either)."""
        groups = self.norm.num_groups
        grouped = targets.reshape(targets.shape[0], groups, -1)
        variance, mean = torch.var_mean(grouped, dim=-1, unbiased=False, keepdim=True)
        own, ref = grouped.shape[-1], reference.count.to(targets)
        ref_mean, ref_variance = reference.mean.to(targets)[:, None], reference.variance.to(targets)[:, None]
        joint_mean = (own * mean + ref * ref_mean) / (own + ref)
        joint_variance = (own * (variance + (mean - joint_mean) ** 2) + ref * (ref_variance + (ref_mean - joint_mean) ** 2)) / (own + ref)
        normalised = ((grouped - joint_mean) / torch.sqrt(joint_variance + self.norm.eps)).reshape(targets.shape)
        if not self.norm.affine:
            return normalised
        shape = (1, -1) + (1,) * (targets.ndim - 2)
        return normalised * self.norm.weight.to(targets).reshape(shape) + self.norm.bias.to(targets).reshape(shape)
