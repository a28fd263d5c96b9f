"""Which linear layers of a UNet a style LoRA adapts, resolved from the model's own module names."""

import re

# ComfyUI names a transformer block's projections <block>.attn1.to_q ... <block>.attn2.to_out.0
# (attn1 self-attention, attn2 cross-attention) in every UNet it loads (SD1.x, SD2.x, SDXL).
TARGET_PRESETS = {
    "attention q/k/v/out (authors' code)": r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$",
    "attention q/k/v (paper)": r"\.attn[12]\.(to_q|to_k|to_v)$",
    "self-attention q/k/v/out": r"\.attn1\.(to_q|to_k|to_v|to_out\.0)$",
    "custom pattern": None,
}
DEFAULT_TARGETS = "attention q/k/v/out (authors' code)"


class TargetError(ValueError):
    pass


def select_targets(linear_names: list[str], preset: str, pattern: str = "") -> list[str]:
    """The names of linear layers the preset (or, for "custom pattern", the regular expression
    searched in each name) picks, in model order; nothing picked is an error showing some names."""
    if preset not in TARGET_PRESETS:
        raise TargetError(f"target_modules must be one of {list(TARGET_PRESETS)}, not {preset!r}")
    expression = TARGET_PRESETS[preset]
    if expression is None:
        if not pattern.strip():
            raise TargetError("target_modules is 'custom pattern' but target_pattern is empty")
        expression = pattern.strip()
    try:
        compiled = re.compile(expression)
    except re.error as error:
        raise TargetError(f"target_pattern {expression!r} is not a regular expression: {error}") from None
    picked = [name for name in linear_names if compiled.search(name)]
    if not picked:
        examples = ", ".join(linear_names[:: max(1, len(linear_names) // 6)][:6])
        source = "target_pattern" if TARGET_PRESETS[preset] is None else f"target_modules {preset!r}"
        raise TargetError(f"{source} ({expression!r}) matches none of this model's {len(linear_names)} linear "
                          f"layers (for example {examples})")
    return picked
