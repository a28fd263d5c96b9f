"""The attention kernel the behaviours call, passed in explicitly so ComfyUI's own can be used."""

import inspect
from collections.abc import Callable
from dataclasses import dataclass, replace
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
    """softmax(q k^T / sqrt(d) + bias) v per head, on (batch, tokens, heads * dim_head) tensors.

    In the inputs' dtype unless attn_precision asks for float32, as ComfyUI's kernels: PyTorch's
    fused kernels (flash, memory-efficient, CPU flash) keep scores and the softmax's sums in float32
    and its math fallback upcasts half inputs, so float16 costs only the output's rounding."""
    batch, _, inner_dim = query.shape
    dim_head = inner_dim // heads
    out_dtype = query.dtype
    if attn_precision == torch.float32:
        query, key, value = query.float(), key.float(), value.float()
    query, key, value = (t.reshape(batch, -1, heads, dim_head).transpose(1, 2) for t in (query, key, value))
    mask = None if bias is None else bias.to(query.dtype)[None, :]
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
    return out.transpose(1, 2).reshape(batch, -1, inner_dim).to(out_dtype)


# Where ComfyUI's kernels look for an attention back-end another node chose.
ATTENTION_OVERRIDE_OPTION = "optimized_attention_override"


def takes_transformer_options(kernel: Callable) -> bool:
    """Whether a ComfyUI kernel accepts transformer_options (those behind its wrap_attn do, and then
    honour an `optimized_attention_override` found there)."""
    parameters = inspect.signature(kernel).parameters.values()
    return any(p.kind is p.VAR_KEYWORD or p.name == "transformer_options" for p in parameters)


@dataclass(frozen=True)
class KernelAttention:
    """ComfyUI's attention kernel (whichever it picked: xformers, sage, PyTorch, sub-quadratic ...).

    Bound to a model call's transformer_options (for_call), it hands them to the kernel, so an
    attention back-end another node chose through `optimized_attention_override` runs in the layers
    this pack patches too, as in every other layer. Calls with a score bias go to PyTorch's kernel:
    ComfyUI's kernels broadcast masks differently, some accept and ignore arguments they do not
    know, and an override's back-end may take no mask at all.
    """

    kernel: Callable
    passes_options: bool = False
    transformer_options: dict | None = None

    @classmethod
    def of(cls, kernel: Callable) -> "KernelAttention":
        return cls(kernel, passes_options=takes_transformer_options(kernel))

    def for_call(self, transformer_options: dict) -> "KernelAttention":
        """Bound only when an override is there: without one the kernel ignores the options."""
        if self.passes_options and ATTENTION_OVERRIDE_OPTION in transformer_options:
            return replace(self, transformer_options=transformer_options)
        return self

    def __call__(self, query, key, value, heads: int, attn_precision=None, bias=None) -> torch.Tensor:
        if bias is not None:
            return scaled_dot_product_attention(query, key, value, heads, attn_precision=attn_precision, bias=bias)
        if self.transformer_options is None:
            return self.kernel(query, key, value, heads, attn_precision=attn_precision)
        return self.kernel(query, key, value, heads, attn_precision=attn_precision,
                           transformer_options=self.transformer_options)


def for_call(attention: AttentionFunction, transformer_options: dict) -> AttentionFunction:
    """attention bound to this model call's transformer_options, where it can use them."""
    bind = getattr(attention, "for_call", None)
    return attention if bind is None else bind(transformer_options)
