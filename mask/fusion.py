"""Mask-wise fusion of predictions (DiffStyler eq. 7; the authors' diffstyler.py).

Each styled branch takes its mask's region of the base branch's prediction, in order: with hard
masks the last branch wins where masks overlap (the authors' code assigns each LoRA's prediction
in turn), and outside every mask the base's prediction stays bit for bit. A soft mask m composites
over what came before: out = out * (1 - m) + branch * m, so m = 0 keeps out and m = 1 is the branch,
both exactly.
"""

import torch


def fuse(base: torch.Tensor, branches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """base and each (prediction, mask) of the same batch; masks broadcast over channels."""
    out = base
    for prediction, mask in branches:
        mask = mask.to(prediction)
        out = out * (1 - mask) + prediction * mask
    return out
