"""Per-head cross-attention maps of the cond rows, kept with their gradient: StyleDiffusion's
attention regulariser holds the maps of the learned value input's run to those of the inversion.

An attn2 replace at each probed layer computes softmax(q k^T / sqrt(d)) explicitly (the maps are
needed, so no fused kernel) and hands the cond rows' maps to a MapSink the loop arms around the
calls whose maps it wants. The output is the same attention (probabilities times values).
"""

import math
from dataclasses import dataclass, field

import torch

from .layers import SelfAttentionLayer
from .precision import at_least_float32
from .reference import batch_chunks


def attention_probabilities(query: torch.Tensor, key: torch.Tensor, heads: int) -> torch.Tensor:
    """(batch, queries, heads * d) x (batch, keys, heads * d) -> (batch, heads, queries, keys).

    Scores and softmax in at least float32 (precision.py), the maps cast back to query's dtype:
    float16 scores of magnitude 64 are rounded by 0.03, a 3% error in the probabilities (the callers
    here pass float32 already)."""
    batch, queries, inner_dim = query.shape
    dim_head = inner_dim // heads
    q = at_least_float32(query).reshape(batch, queries, heads, dim_head).transpose(1, 2)
    k = at_least_float32(key).reshape(batch, -1, heads, dim_head).transpose(1, 2)
    return (q @ k.transpose(-1, -2) / math.sqrt(dim_head)).softmax(dim=-1).to(query.dtype)


def attend(probabilities: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """(batch, heads, queries, keys) x (batch, keys, heads * d) -> (batch, queries, heads * d).

    In the inputs' dtype, as ComfyUI's own attention: each output is a convex combination of values
    (probabilities sum to 1), so it cannot overflow."""
    batch, heads = probabilities.shape[:2]
    v = value.reshape(batch, value.shape[1], heads, -1).transpose(1, 2)
    return (probabilities @ v).transpose(1, 2).reshape(batch, probabilities.shape[2], -1)


@dataclass
class MapSink:
    """Where the probes leave the cond rows' maps (heads of all cond rows stacked) while armed."""

    armed: bool = False
    maps: dict = field(default_factory=dict)

    def take(self) -> dict:
        maps, self.maps = self.maps, {}
        return maps


@dataclass(frozen=True)
class CrossAttentionProbe:
    """attn2 replace at one layer: plain attention, its cond rows' per-head maps left in the sink."""

    layer: SelfAttentionLayer
    sink: MapSink

    def __call__(self, q, k, v, extra_options):
        heads = extra_options["n_heads"]
        probabilities = attention_probabilities(q.float(), k.float(), heads)
        if self.sink.armed:
            chunks = batch_chunks(q.shape[0], extra_options["cond_or_uncond"])
            cond = [probabilities[chunk] for chunk, kind in zip(chunks, extra_options["cond_or_uncond"]) if kind == 0]
            if cond:
                self.sink.maps[self.layer] = torch.cat(cond).flatten(0, 1)  # (cond rows * heads, queries, keys)
        return attend(probabilities.to(v.dtype), v)
