"""Masked Style Blend (DiffStyler's mask-wise style transfer, eq. 7): each styled model denoises its
mask's region, the base model everything else, on one latent, in one step."""

from comfy_api.latest import io

from ..glue.masked_blend import masked_style_blend
from ..mask.latent_mask import EDGE_RULES

BRANCHES = 4


def branch_inputs(index: int) -> list:
    optional = index > 1
    return [
        io.Model.Input(f"styled_model_{index}", optional=optional,
                       tooltip="The base model with a style on it (a LoRA, Style Injection, Visual Style Prompting, "
                       "StyleAligned ...), the same checkpoint: it denoises its mask's region."),
        io.Mask.Input(f"mask_{index}", optional=optional,
                      tooltip="Where this style applies, at the encoded image's size (FastSAM Segment or any MASK; "
                      "one mask or one per latent); later masks win where they overlap; soft masks blend."),
        io.Conditioning.Input(f"positive_{index}", optional=True,
                              tooltip="This style's own prompt in its region (the authors give each LoRA the prompt "
                              "it was fitted with); not connected: the sampler's positive. Replaces the text "
                              "embedding only (SDXL keeps the sampler's pooled prompt)."),
    ]


class MaskedStyleBlend(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MaskedStyleBlend",
            display_name="Masked Style Blend",
            category="style_attention/diffstyler",
            description="Several styles in one image (DiffStyler eq. 7): at every step the base model and each "
            "styled model predict the same latent; inside each mask the prediction is that style's, outside every "
            "mask the base's. n styles cost n + 1 model evaluations per step on one copy of the UNet (LoRAs "
            "apply as low-rank deltas during their branch's evaluation). Connect it after every style node and "
            "before the sampler.",
            inputs=[
                io.Model.Input("model", tooltip="The base: it denoises everything outside the masks (DiffStyler: "
                               "the plain model, with Style Injection for the content)."),
                io.Combo.Input("mask_edges", options=list(EDGE_RULES), default="coverage",
                               tooltip="How a mask's edge meets the 8x smaller latent: coverage: the fraction of each "
                               "latent pixel the mask covers (soft edge); any: every latent pixel the mask touches "
                               "(the authors' code)."),
                *(item for index in range(1, BRANCHES + 1) for item in branch_inputs(index)),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, mask_edges, **pairs) -> io.NodeOutput:
        branches = []
        for index in range(1, BRANCHES + 1):
            styled, mask = pairs.get(f"styled_model_{index}"), pairs.get(f"mask_{index}")
            if (styled is None) != (mask is None):
                missing = f"mask_{index}" if mask is None else f"styled_model_{index}"
                raise ValueError(f"{missing}: connect it too, or disconnect its pair: each styled model needs its mask")
            positive = pairs.get(f"positive_{index}")
            if positive is not None and styled is None:
                raise ValueError(f"positive_{index}: connect styled_model_{index} and mask_{index} too, or disconnect it")
            if styled is not None:
                prompt = prompt_embedding(positive, f"positive_{index}")
                branches.append((f"styled_model_{index}", f"mask_{index}", styled, mask, mask_edges, prompt))
        return io.NodeOutput(masked_style_blend(model, branches))


def prompt_embedding(conditioning, name: str):
    if conditioning is None:
        return None
    if len(conditioning) != 1 or conditioning[0][0].shape[0] != 1:
        raise ValueError(f"{name}: give one prompt (one CLIP Text Encode), not {len(conditioning)} conditionings "
                         "or a batch")
    return conditioning[0][0]
