"""StyleAligned's shared GroupNorm: a target's statistics are computed jointly with the reference's.

The original concatenates [target ; reference] along the height axis and normalises the result,
keeping the target part; concatenating the flattened positions gives the same statistics for
references of any size. The reference itself is normalised alone (joining it with itself would
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
                call.store.record(self.name, x)
                return self.norm(x)
            return self._joint(x, call.store.get(self.name))
        outputs = []
        for ref, targets in in_batch_references(x.shape[0], call.cond_or_uncond):
            outputs.append(self.norm(x[ref]))
            outputs.append(self._joint(x[targets], x[ref]))
        return torch.cat(outputs)

    def _joint(self, targets: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """GroupNorm statistics span the spatial positions of both; they need not be the same size."""
        batch = targets.shape[0]
        positions = targets[0, 0].numel()
        joined = torch.cat([targets.flatten(2), reference.flatten(2).expand(batch, -1, -1)], dim=2)
        return self.norm(joined.unsqueeze(-1))[:, :, :positions, 0].reshape(targets.shape)
