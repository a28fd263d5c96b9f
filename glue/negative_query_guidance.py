"""StyleKeeper's negative visual query guidance (NVQG) in ComfyUI: a post-CFG function that runs the
style's negative branch and subtracts it.

The negative branch is the unconditional prompt's pass in which the style's NVQG layers give the
targets the reference's queries (attention_patches/query_swap.py), every other layer acting as in the
unconditional branch. With D the denoised predictions ComfyUI guides (x - sigma * eps, so any
combination whose weights sum to 1 is the same in eps):

    D = D_empty + cfg * (D_positive - D_empty) - weight * (D_negative - D_empty)

weight 0 installs nothing. The extra pass is one more batch of the unconditional size per step,
inside the style's own steps only; with an in-batch reference its row (latent item 0) keeps plain
guidance.
"""

from dataclasses import dataclass

import torch

import comfy.samplers

from ..attention_patches.sigma_range import SigmaRange
from ..attention_patches.style_call import NEGATIVE_OPTION, StyleOwner
from .references import ExternalReference


class NegativeGuidanceError(ValueError):
    pass


@dataclass(frozen=True)
class NegativeVisualQueryGuidance:
    owner: StyleOwner
    weight: float
    active_range: SigmaRange
    reference_size: tuple[int, int] | None  # an external reference latent's (height, width); None: in-batch

    def __call__(self, args: dict) -> torch.Tensor:
        denoised = args["denoised"]
        sigma = args["sigma"]
        if not self.active_range.contains(float(sigma.flatten()[0])):
            return denoised
        if args["uncond"] is None:
            raise NegativeGuidanceError(
                f"nvqg_weight: {self.owner}'s negative visual query guidance needs the unconditional branch, and "
                "this guider runs none (connect a negative conditioning to a CFG sampler, or set nvqg_weight to 0)")
        x = args["input"]
        if self.reference_size is not None and self.reference_size != tuple(x.shape[-2:]):
            height, width = self.reference_size
            raise NegativeGuidanceError(
                f"nvqg_weight: the reference latent is {height}x{width} and the generated latent "
                f"{x.shape[-2]}x{x.shape[-1]}; negative visual query guidance gives the targets the reference's "
                "queries, so both must have one size (resize the reference image to the output size)")
        options = dict(args["model_options"])
        options["transformer_options"] = {**options.get("transformer_options", {}), NEGATIVE_OPTION: self.owner}
        # index 1 of the list: ComfyUI marks the pass as unconditional (cond_or_uncond [1])
        negative = comfy.samplers.calc_cond_batch(args["model"], [None, args["uncond"]], x, sigma, options)[1]
        correction = self.weight * (negative - args["uncond_denoised"])
        if self.reference_size is None:
            correction[:1] = 0.0  # the in-batch reference row keeps its plain guidance
        return denoised - correction


def install_negative_query_guidance(model, owner: StyleOwner, weight: float, active_range: SigmaRange,
                                    reference: ExternalReference | None) -> None:
    """On model (a clone); the unconditional branch must also run at cfg 1, where ComfyUI skips it."""
    size = None if reference is None else tuple(int(side) for side in reference.latent_shape()[-2:])
    model.set_model_sampler_post_cfg_function(
        NegativeVisualQueryGuidance(owner, weight, active_range, size), disable_cfg1_optimization=True)
