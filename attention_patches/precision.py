"""The precision rule of the pack's pure functions: statistics, variances, softmaxes, norms and losses
are computed in at least float32, and results go back in the input's dtype.

On a GPU ComfyUI runs SD1.5/SDXL in float16 or bfloat16. A float16 sum of squares overflows (65504)
once a channel's std passes about 4 over 4096 tokens, eps terms such as 1e-8 round to 0, and scores
of magnitude 64 are rounded by 0.03; bfloat16 has float32's range but only 8 bits of mantissa.
Upcasting is a no-op (the same tensor) for float32 and float64, so those results stay bit-identical.
The one statement of the rule for every pure package (inversion/ddim.py and lora_fit/objective.py too).
"""

import torch


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """x in float32 where its dtype is narrower (float16, bfloat16), else x itself (float32, float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
