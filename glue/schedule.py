"""The part of a model's noise schedule a behaviour acts in, from the nodes' start/end percents."""

import comfy.model_patcher

from ..attention_patches.sigma_range import SigmaRange


def active_sigma_range(model: comfy.model_patcher.ModelPatcher, start_percent: float, end_percent: float) -> SigmaRange:
    if start_percent > end_percent:
        raise ValueError(f"start_percent ({start_percent}) must not be greater than end_percent ({end_percent})")
    model_sampling = model.get_model_object("model_sampling")
    return SigmaRange(
        sigma_start=float(model_sampling.percent_to_sigma(start_percent)),
        sigma_end=float(model_sampling.percent_to_sigma(end_percent)),
    )
