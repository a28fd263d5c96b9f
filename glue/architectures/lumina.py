"""The Lumina 2 adapter (Lumina Image 2.0, Z-Image: ComfyUI's NextDiT): the attention sites are the joint
attentions of its main layers (not the context and noise refiners), named ("double", i) as the
block_type "double" ComfyUI gives them.

How a behaviour is installed, and why: NextDiT has no block replacement. ComfyUI (0.8.0 on; 0.3.75 is
refused by name) sets transformer_options["block_index"] and block_type "double" before each main
layer, whose attention calls the optimized_attention_override with those options. So the pack keeps
its patch per site in a registry in transformer_options (copied with each clone, where the conflict
check reads it), and one apply_model wrapper per model puts a dispatcher override into each model
call, chained to the override the call already carries (a user's attention back-end): a main layer's
call goes to its site's patch (as JointAttention, with the call's layout), every other call (the
refiners, the layers without a patch) through unchanged. The weights stay where they are, so LoRAs,
merges and lowvram casting reach them. Another pack's override set on the model is the inner one
here; another pack cannot claim a layer, so no foreign claim can be seen.

Token layout: the caption's tokens (padded to pad_tokens_multiple, Z-Image's 32), then ceil(h / 2) *
ceil(w / 2) image rows, then the image's padding rows. Queries and keys arrive after QK-norm and RoPE
(caption positions (i + 1, 0, 0), image positions (caption + 1, row, column) scaled by rope_options),
which the dispatcher recomputes with the model's own EmbedND settings to take it off and put it back.
"""

import inspect
from dataclasses import dataclass, field

import torch

import comfy.ldm.lumina.model
import comfy.model_patcher
import comfy.patcher_extension
from comfy.ldm.flux.layers import EmbedND

from ...attention_patches.attention import ATTENTION_OVERRIDE_OPTION
from ...attention_patches.token_layout import TokenGrid, TokenLayout
from .joint_blocks import (DOUBLE_BLOCK_AUTO, DOUBLE_BLOCK_PRESETS, HostTooOld, JointAttention, JointBlocksAdapter,
                           acting_tokens)

SITES_OPTION = "style_attention_nodes.lumina_sites"  # transformer_options: {site: patch}
DISPATCH_KEY = "style_attention_nodes.lumina_dispatch"


@dataclass(frozen=True)
class LuminaAdapter(JointBlocksAdapter):
    depth: int
    patch_size: int
    pad_tokens_multiple: int | None
    theta: float
    axes_dim: tuple[int, ...]
    family = "Lumina 2 (Lumina Image 2.0, Z-Image)"
    models = "Lumina 2 models (Lumina Image 2.0, Z-Image)"
    presets = DOUBLE_BLOCK_PRESETS
    auto = DOUBLE_BLOCK_AUTO
    block_keys = {"double": "double_block"}

    @classmethod
    def of(cls, model: comfy.model_patcher.ModelPatcher) -> "LuminaAdapter | None":
        dit = model.get_model_object("diffusion_model")
        if not isinstance(dit, comfy.ldm.lumina.model.NextDiT):
            return None
        if "block_index" not in inspect.getsource(comfy.ldm.lumina.model.NextDiT._forward):
            raise HostTooOld("this ComfyUI's Lumina 2 / Z-Image model gives its attention calls no block index, "
                             "which this pack needs to find a layer: update ComfyUI (0.8.0 has it)")
        return cls(len(dit.layers), dit.patch_size, dit.pad_tokens_multiple, float(dit.rope_embedder.theta),
                   tuple(dit.rope_embedder.axes_dim))

    @property
    def block_counts(self) -> dict[str, int]:
        return {"double": self.depth}

    def text_rows(self, c_crossattn: torch.Tensor) -> int:
        tokens = c_crossattn.shape[1]
        return tokens + (-tokens % self.pad_tokens_multiple if self.pad_tokens_multiple else 0)

    def installed(self, model: comfy.model_patcher.ModelPatcher, site, kind: str):
        return model.model_options.get("transformer_options", {}).get(SITES_OPTION, {}).get(site)

    def install(self, model: comfy.model_patcher.ModelPatcher, site, kind: str, patch) -> None:
        if kind != "attn1":
            raise ValueError(f"a {self.family} layer has one (joint) attention; {kind!r} has no meaning here")
        options = model.model_options.setdefault("transformer_options", {})
        options[SITES_OPTION] = {**options.get(SITES_OPTION, {}), site: patch}  # the clone's own registry
        if not model.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, DISPATCH_KEY):
            model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, DISPATCH_KEY,
                                       DispatchToSites(self))

    def rotations(self, grid: TokenGrid, rows: int, options: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(the call's rotation, every row, as NextDiT's patchify_and_embed places them; the rotation of one
        image width along the width axis), each (1, 1, rows, dim_head / 2, 2, 2)."""
        rope = options.get("rope_options") or {}
        scale_y, scale_x = rope.get("scale_y", 1.0), rope.get("scale_x", 1.0)
        ids = torch.zeros(rows, 3, device=device)
        ids[:grid.text, 0] = torch.arange(grid.text, device=device) + 1.0
        image = slice(grid.text, grid.text + grid.height * grid.width)
        ids[image, 0] = grid.text + 1
        ids[image, 1] = (torch.arange(grid.height, device=device) * scale_y + rope.get("shift_y", 0.0)).repeat_interleave(
            grid.width)
        ids[image, 2] = (torch.arange(grid.width, device=device) * scale_x + rope.get("shift_x", 0.0)).repeat(grid.height)
        embed = EmbedND(sum(self.axes_dim), self.theta, list(self.axes_dim))
        shift = torch.zeros(1, 1, 3, device=device)
        shift[..., 2] = grid.width * scale_x
        return embed(ids[None]), embed(shift)


@dataclass(frozen=True)
class DispatchToSites:
    """The apply_model wrapper: the model call's attention override becomes a dispatcher to the sites."""

    adapter: LuminaAdapter

    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        if not transformer_options.get(SITES_OPTION):
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        dispatch = SiteDispatch(self.adapter, transformer_options.get(ATTENTION_OVERRIDE_OPTION))
        options = {**transformer_options, ATTENTION_OVERRIDE_OPTION: dispatch}
        return executor(x, t, c_concat, c_crossattn, control, options, **kwargs)


@dataclass(frozen=True)
class SiteDispatch:
    """One model call's optimized_attention_override: a main layer's call to its site's patch, where the patch
    acts in this call; every other call to the override the call had (inner), or to ComfyUI's kernel."""

    adapter: LuminaAdapter
    inner: object = None
    positions: dict = field(default_factory=dict, compare=False)  # the call's rotations, by token grid

    def __call__(self, func, query, key, value, heads, *args, transformer_options=None, **kwargs):
        options = transformer_options or {}
        index = options.get("block_index")
        site = ("double", index)
        patch = options.get(SITES_OPTION, {}).get(site) if options.get("block_type") == "double" else None
        grid = None if patch is None or index is None else acting_tokens(patch, site, options)
        if grid is None:
            if self.inner is not None:
                return self.inner(func, query, key, value, heads, *args, transformer_options=options, **kwargs)
            return func(query, key, value, heads, *args, transformer_options=options, **kwargs)
        rows = query.shape[2] if kwargs.get("skip_reshape") else query.shape[1]
        if grid not in self.positions:
            self.positions[grid] = self.adapter.rotations(grid, rows, options, query.device)
        rotation, beside = self.positions[grid]
        layout = TokenLayout(grid.text, grid.height * grid.width, rotation, beside)
        return JointAttention(patch, layout, self.inner)(func, query, key, value, heads, *args,
                                                         transformer_options=options, **kwargs)
