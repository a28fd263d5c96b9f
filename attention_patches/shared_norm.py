"""StyleAligned's shared GroupNorm: a target's statistics are computed jointly with the reference's.

The original concatenates [target ; reference] along the height axis and normalises the result,
keeping the target part. Here the same pooled mean and variance are computed from per-group
moments (the reference's are all an external reference needs to record), which also allows a
reference of another size. The reference itself is normalised alone (joining it with itself would
change nothing).

Layer norms are not shared: in the UNet's transformers each token is normalised over its own
channels, so normalising [target ; reference] tokens jointly gives exactly the plain result.
"""

from dataclasses import dataclass
from typing import Callable

import torch

from .feature_store import register_feature_type
from .reference import in_batch_references
from .style_call import ModelCallSlot, StyleOwner


@register_feature_type
@dataclass(frozen=True)
class GroupMoments:
    """Per-group statistics of one image: what joint normalisation needs of the reference."""

    count: torch.Tensor  # () positions * channels per group
    mean: torch.Tensor  # (groups,)
    variance: torch.Tensor  # (groups,), biased, as GroupNorm uses


def group_statistics(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per item and group: (mean, biased variance), each (batch, groups), in float32 as GroupNorm
    accumulates. Through the fused GroupNorm kernel: torch.var_mean is several times slower on CPU."""
    batch, channels = x.shape[:2]
    _, mean, rstd = torch.native_group_norm(x.float(), None, None, batch, channels, x[0, 0].numel(), groups, 0.0)
    return mean, rstd.pow(-2)


def group_moments(x: torch.Tensor, groups: int) -> GroupMoments:
    """Of one image (batch of 1)."""
    mean, variance = group_statistics(x, groups)
    return GroupMoments(torch.tensor(float(x.numel() // groups)), mean[0], variance[0])


LayerWeights = Callable[[torch.nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


@dataclass(frozen=True, eq=False)
class SharedGroupNorm:
    """What a stand-in for one GroupNorm does (glue/stand_ins.py: the norm itself, seen through a
    subclass, so its weights keep their names for ComfyUI's patches).

    weights gives the norm's weight and bias as its own forward would use them on x (cast and patched
    per layer where ComfyUI does so); the statistics are float32 whatever the model's dtype.
    """

    name: str
    call: ModelCallSlot
    weights: LayerWeights
    owner: StyleOwner | None = None  # the style node that installed it, named in errors

    def __call__(self, norm: torch.nn.GroupNorm, x: torch.Tensor, forward) -> torch.Tensor:
        call = self.call.current
        if call is None:
            return forward(x)
        if call.store is not None:
            if call.store.recording:
                call.store.record(self.name, group_moments(x, norm.num_groups))
                return forward(x)
            return self._joint(norm, x, call.store.get(self.name))
        outputs = []
        for ref, targets in in_batch_references(x.shape[0], call.cond_or_uncond):
            outputs.append(forward(x[ref]))
            outputs.append(self._joint(norm, x[targets], group_moments(x[ref], norm.num_groups)))
        return torch.cat(outputs)

    def _joint(self, norm: torch.nn.GroupNorm, targets: torch.Tensor, reference: GroupMoments) -> torch.Tensor:
        """GroupNorm with each target's statistics pooled with the reference's (any size of either).

        The pooled statistics are applied by batch_norm in inference mode over (batch x channels),
        a fused kernel that reads the activations once; in float32, the result cast back.
        """
        batch, channels = targets.shape[:2]
        groups = norm.num_groups
        mean, variance = group_statistics(targets, groups)
        ref_weight = reference.count.to(mean) / (targets[0].numel() / groups + reference.count.to(mean))
        ref_mean, ref_variance = reference.mean.to(mean), reference.variance.to(mean)
        joint_mean = torch.lerp(mean, ref_mean, ref_weight)
        joint_variance = torch.lerp(variance + (mean - joint_mean).square(), ref_variance + (ref_mean - joint_mean).square(), ref_weight)
        per_channel = channels // groups
        weight = bias = None
        if norm.affine:
            weight, bias = (p.to(mean).repeat(batch) for p in self.weights(norm, targets))
        normalised = torch.nn.functional.batch_norm(
            targets.reshape(1, batch * channels, -1).float(),
            joint_mean.repeat_interleave(per_channel, dim=1).flatten(),
            joint_variance.repeat_interleave(per_channel, dim=1).flatten(),
            weight, bias, training=False, eps=norm.eps,
        )
        return normalised.reshape(targets.shape).to(targets.dtype)
