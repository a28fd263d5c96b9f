"""One model call of a masked style blend: the base MODEL and each styled branch run on the same
latent, each with its own transformer_options (its attention patches, its apply_model wrappers,
this pack's style calls) and its own weights (glue/branch_weights.py); the predictions are fused
by the branches' masks (mask/fusion.py). n branches cost n + 1 model evaluations per step."""

import math
from dataclasses import dataclass, field

import torch

from ..attention_patches.style_call import BRANCH_OPTION
from ..mask.fusion import fuse
from ..mask.latent_mask import MaskSizeError, latent_mask, per_image


class BlendError(ValueError):
    pass


@dataclass
class ActiveBranch:
    """Which branch's call is running (None: the base's): read by the branch weight layers and the
    blend's merged object patches, which see no transformer_options."""

    current: int | None = None


@dataclass(frozen=True)
class Branch:
    name: str  # the node input, named in errors
    options: dict  # the branch's own transformer_options (with its wrappers and callbacks)
    mask: torch.Tensor  # MASK (batch, H, W) of the image's size
    edges: str
    prompt: torch.Tensor | None = None  # its own positive prompt's embedding (1, tokens, channels), if any


@dataclass(frozen=True)
class MaskedBlendWrapper:
    """The blend's apply_model wrapper (its only one): the base's call, then each branch's."""

    base_options: dict
    static_keys: frozenset  # the blended MODEL's own transformer_options keys; the rest is per call
    branches: tuple[Branch, ...]
    active: ActiveBranch
    _masks: dict = field(default_factory=dict, compare=False, repr=False)

    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        model = executor.class_obj
        per_call = {key: value for key, value in transformer_options.items() if key not in self.static_keys}
        base = model.apply_model(x, t, c_concat, c_crossattn, control, {**per_call, **self.base_options}, **kwargs)
        chunks = len(transformer_options.get("cond_or_uncond", [None]))
        predictions = []
        for index, branch in enumerate(self.branches):
            self.active.current = index
            try:
                text = with_prompt(c_crossattn, branch.prompt, transformer_options.get("cond_or_uncond", [0]))
                options = {**per_call, **branch.options, BRANCH_OPTION: index}
                out = model.apply_model(x, t, c_concat, text, control, options, **kwargs)
            finally:
                self.active.current = None
            predictions.append((out, self._mask(index, branch, x, chunks)))
        return fuse(base, predictions)

    def _mask(self, index: int, branch: Branch, x: torch.Tensor, chunks: int) -> torch.Tensor:
        key = (index, x.shape, chunks, x.device)
        if key not in self._masks:
            try:
                mask = latent_mask(branch.mask, x.shape[-2], x.shape[-1], branch.edges)
                self._masks[key] = per_image(mask, x.shape[0] // chunks, chunks).to(x.device)
            except MaskSizeError as error:
                raise MaskSizeError(f"{branch.name} {error}") from None
        return self._masks[key]


def with_prompt(c_crossattn: torch.Tensor | None, prompt: torch.Tensor | None, cond_or_uncond: list[int]):
    """The call's text embeddings with every cond chunk's replaced by the branch's own prompt (the
    uncond chunks keep theirs). Prompts of different lengths are repeated to a common length, as
    ComfyUI batches them (attention over a key sequence repeated k times is the same attention)."""
    if prompt is None or c_crossattn is None:
        return c_crossattn
    prompt = prompt.to(c_crossattn)
    tokens, own = c_crossattn.shape[1], prompt.shape[1]
    if tokens != own:
        common = math.lcm(tokens, own)
        c_crossattn, prompt = c_crossattn.repeat(1, common // tokens, 1), prompt.repeat(1, common // own, 1)
    rows = c_crossattn.shape[0] // len(cond_or_uncond)
    out = c_crossattn.clone()
    for chunk, kind in enumerate(cond_or_uncond):
        if kind == 0:
            out[chunk * rows:(chunk + 1) * rows] = prompt
    return out
