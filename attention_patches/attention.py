"""The attention kernel the behaviours call, passed in explicitly so ComfyUI's own can be used."""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F


class AttentionFunction(Protocol):
    """bias, when given, is added to every query's scores, one value per key (shape (keys,))."""

    def __call__(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int, attn_precision=None,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor: ...


def scaled_dot_product_attention(query, key, value, heads: int, attn_precision=None, bias=None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias) v per head, on (batch, tokens, heads * dim_head) tensors."""
    batch, _, inner_dim = query.shape
    dim_head = inner_dim // heads
    out_dtype = query.dtype
    if attn_precision == torch.float32:
        query, key, value = query.float(), key.float(), value.float()
    query, key, value = (t.reshape(batch, -1, heads, dim_head).transpose(1, 2) for t in (query, key, value))
    mask = None if bias is None else bias.to(query.dtype)[None, :]
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
    return out.transpose(1, 2).reshape(batch, -1, inner_dim).to(out_dtype)


@dataclass(frozen=True)
class KernelAttention:
    """ComfyUI's attention kernel (whichever it picked: xformers, sage, PyTorch, sub-quadratic ...).

    Calls with a score bias go to PyTorch's kernel: ComfyUI's kernels broadcast masks differently and
    some accept and ignore arguments they do not know.
    """

    kernel: Callable

    def __call__(self, query, key, value, heads: int, attn_precision=None, bias=None) -> torch.Tensor:
        if bias is None:
            return self.kernel(query, key, value, heads, attn_precision=attn_precision)
        return scaled_dot_product_attention(query, key, value, heads, attn_precision=attn_precision, bias=bias)
