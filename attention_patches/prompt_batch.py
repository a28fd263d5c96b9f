"""Stacking per-prompt text embeddings into one batched conditioning."""

import math

import torch


def stack_token_sequences(embeddings: list[torch.Tensor]) -> torch.Tensor:
    """Stack (1, tokens, dim) embeddings into (n, tokens, dim).

    A prompt longer than one 77-token window encodes to more tokens. Shorter sequences are repeated
    up to the least common multiple of the lengths, as ComfyUI does when it batches conditionings of
    different lengths.
    """
    if not embeddings:
        raise ValueError("no prompt to stack")
    length = math.lcm(*(e.shape[1] for e in embeddings))
    return torch.cat([e.repeat(1, length // e.shape[1], 1) for e in embeddings])
