"""Several style references at once, each with a weight, as the style methods read them at one layer.

A weight w acts as w copies of its reference: in attention each reference's scores are shifted by log w
(softmax over n identical keys is softmax over one with log n added), so weight 1 is the reference as it
alone would act, weights summing to 1 give the set the attention mass of one reference, and one reference
twice with weights a and b is that reference once with weight a + b. Statistics (StyleAligned's AdaIN,
shared GroupNorm) are the mixture's: with p_i = w_i / sum w, the mean is sum p_i mu_i and the variance
sum p_i (sigma_i^2 + (mu_i - mu)^2), each reference's own variance as the method computes it for one
(the mixture of the references' per-channel distributions, not a mean of their standard deviations).
A shared GroupNorm pools the targets with w_i copies of each reference's positions.
"""

import math
from dataclasses import dataclass
from functools import cached_property

import torch

from .precision import at_least_float32
from .reference import ReferenceFeatures, StyleReferenceError
from .shared_norm import GroupMoments


@dataclass(frozen=True)
class WeightedReferences:
    """The references' features at one layer (ReferenceFeatures, or PositionedFeatures on a DiT), in the
    order of their weights (each > 0)."""

    members: tuple[ReferenceFeatures, ...]
    weights: tuple[float, ...]

    @property
    def proportions(self) -> tuple[float, ...]:
        total = sum(self.weights)
        return tuple(w / total for w in self.weights)

    @cached_property  # joined once per step's recording, not at every styled layer call
    def key(self) -> torch.Tensor:
        """Every reference's keys, one after another (rows: the sum of theirs)."""
        return _joined([m.key for m in self.members])

    @cached_property
    def value(self) -> torch.Tensor:
        return _joined([m.value for m in self.members])

    def score_bias(self, before: int = 0, after: int = 0, shift: float = 0.0,
                   device: torch.device | None = None) -> torch.Tensor | None:
        """Per key, float32: 0 for `before` keys, shift + log w_i on reference i's keys, 0 for `after` keys;
        None where every entry is 0 (the attention then runs unbiased, as for one reference of weight 1)."""
        logs = [shift + math.log(w) for w in self.weights]
        if all(entry == 0.0 for entry in logs):
            return None
        pieces = [torch.zeros(before, device=device)]
        pieces += [torch.full((m.key.shape[1],), entry, device=device) for m, entry in zip(self.members, logs)]
        return torch.cat([*pieces, torch.zeros(after, device=device)])


def split_key_sources(key_sources: tuple[str, ...], reference) -> tuple[str, ...]:
    """A method's key_sources (attention maps' blocks of keys) with "reference" split into "reference 1",
    "reference 2", ... where the reference is a set of several (its keys are theirs, one after another)."""
    if not isinstance(reference, WeightedReferences) or len(reference.members) == 1:
        return key_sources
    numbered = tuple(f"reference {number}" for number in range(1, len(reference.members) + 1))
    return tuple(name for source in key_sources for name in (numbered if source == "reference" else (source,)))


def as_weighted(reference) -> WeightedReferences:
    """One reference's features as a set of one, weight 1 (a set stays as it is)."""
    return reference if isinstance(reference, WeightedReferences) else WeightedReferences((reference,), (1.0,))


def _joined(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=1)


def mixture(moments: list[tuple[torch.Tensor, torch.Tensor]], proportions: tuple[float, ...]):
    """(mean, variance) of the mixture of distributions given as (mean, variance) each, in proportions.
    One component gives its own moments exactly (1.0 * x and x + 0 are exact)."""
    mean = sum(p * m for p, (m, _) in zip(proportions, moments))
    variance = sum(p * (v + (m - mean).square()) for p, (m, v) in zip(proportions, moments))
    return mean, variance


def moments(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel, over tokens, in at least float32: (mean, unbiased variance), (batch, 1, channels) each,
    two passes as shared_attention.mean_std."""
    features = at_least_float32(features)
    mean = features.mean(dim=1, keepdim=True)
    return mean, (features - mean).square().sum(dim=1, keepdim=True) / (features.shape[1] - 1)


def mixed_group_moments(members: list[GroupMoments], weights: tuple[float, ...]) -> GroupMoments:
    """A shared GroupNorm's reference statistics for a set: the mixture's per-group mean and (biased)
    variance in proportions w_i / sum w, pooled with the targets as w_i copies of each reference's
    positions (count sum w_i n_i: weights 1 each count every reference in full, as in attention)."""
    total = sum(weights)
    mean, variance = mixture([(m.mean, m.variance) for m in members], tuple(w / total for w in weights))
    count = sum(w * m.count.double() for w, m in zip(weights, members)).to(members[0].count.dtype)
    return GroupMoments(count, mean, variance)


def mixed_recording(recordings: list[dict], weights: tuple[float, ...]) -> dict:
    """What the targets' pass reads at each site from the references' own recordings at one step."""
    mixed = {}
    for site, first in recordings[0].items():
        members = [recording[site] for recording in recordings]
        if isinstance(first, ReferenceFeatures):
            mixed[site] = WeightedReferences(tuple(members), weights)
        elif isinstance(first, GroupMoments):
            mixed[site] = mixed_group_moments(members, weights)
        else:
            raise StyleReferenceError(f"several references: nothing mixes what was recorded at {site} "
                                      f"({type(first).__name__})")
    return mixed
