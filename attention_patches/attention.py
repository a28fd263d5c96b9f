"""The attention kernel the behaviours call, passed in explicitly so ComfyUI's own can be used."""

from typing import Protocol

import torch
import torch.nn.functional as F


class AttentionFunction(Protocol):
    def __call__(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int, attn_precision=None
    ) -> torch.Tensor: ...


def scaled_dot_product_attention(query, key, value, heads: int, attn_precision=None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v per head, on (batch, tokens, heads * dim_head) tensors."""
    batch, _, inner_dim = query.shape
    dim_head = inner_dim // heads
    out_dtype = query.dtype
    if attn_precision == torch.float32:
        query, key, value = query.float(), key.float(), value.float()
    query, key, value = (t.reshape(batch, -1, heads, dim_head).transpose(1, 2) for t in (query, key, value))
    out = F.scaled_dot_product_attention(query, key, value)
    return out.transpose(1, 2).reshape(batch, -1, inner_dim).to(out_dtype)
