"""What the DiT families whose blocks ComfyUI lets a node replace share (Flux, Chroma, SD3, Qwen-Image):
sites that are blocks, named kind.N ("double.3", "single.0"), each with one joint attention over
[text | image | extra] rows, and one way to install a behaviour there. Lumina 2 (lumina.py) shares
all of it but the install (it has no block replacement).

How a behaviour is installed, and why: a site is ComfyUI's block replacement
patches_replace["dit"][(block key, i)]. The patch runs the model's own block (original_block) with a
copy of transformer_options that carries an optimized_attention_override for that block alone
(chained to any override the user set). The block key is a claim the conflict check can see and
name, the block's weights stay where LoRAs, merges and lowvram casting find them, and nothing outside
the chosen blocks is touched. The override receives the joint attention's queries and keys after
QK-norm (and RoPE where the family has it), text rows first.
"""

import dataclasses
import math
from dataclasses import dataclass

import torch

import comfy.model_patcher
from comfy.ldm.flux.layers import EmbedND

from ...attention_patches.attention import ATTENTION_OVERRIDE_OPTION
from ...attention_patches.attention_maps import captured_tokens
from ...attention_patches.layers import CUSTOM, LayerSelectionError, format_layers
from ...attention_patches.style_call import style_call
from ...attention_patches.token_layout import LAYOUT_OPTION, UNET_LAYOUT, TokenGrid, TokenLayout

IMAGE_ONLY = "image_only"  # a block's second, image-only attention (SD3.5 Medium): site (kind, i, IMAGE_ONLY)
LATE_BLOCKS = "late_blocks"
ALL_BLOCKS = "all_blocks"
# The presets of a family with one kind of block (SD3, Qwen-Image, Lumina 2). late_blocks is VSP's default there,
# as the VSP paper swaps in a UNet's late (decoder) self-attention, where style lives once the layout
# is set; StyleAligned shares every self-attention, as on a UNet.
DOUBLE_BLOCK_PRESETS = (LATE_BLOCKS, ALL_BLOCKS, CUSTOM)
DOUBLE_BLOCK_AUTO = {"visual_style_prompting": LATE_BLOCKS, "style_aligned": ALL_BLOCKS, "attention_maps": LATE_BLOCKS}


class HostTooOld(ValueError):
    """The model is of a supported family, but this ComfyUI lacks what the pack needs to reach its layers."""


class JointBlocksAdapter:
    """The part of an adapter every block-replacing DiT family shares. A subclass (a frozen dataclass)
    gives block_counts (kind -> number of blocks, in the model's order), block_keys (kind -> ComfyUI's
    replacement key), patch_size, and where they differ text_rows, positions and image_only_blocks."""

    kind_names = {"attn1": "joint attention"}
    map_kinds = {"self": "attn1", "cross": "attn1"}  # both kinds of attention map from the joint attention
    block_keys = {"double": "double_block", "single": "single_block"}
    positions = None  # a RotaryPositions where the family's blocks receive RoPE

    @property
    def block_counts(self) -> dict[str, int]:
        raise NotImplementedError

    @property
    def sites(self) -> tuple:
        return tuple((kind, i) for kind, count in self.block_counts.items() for i in range(count))

    def layers(self) -> list:
        return list(self.sites)

    @property
    def blocks_described(self) -> str:
        return " and ".join(f"{count} {kind}" for kind, count in self.block_counts.items()) + " blocks"

    def custom(self, text: str) -> list:
        """The blocks a custom list names ("double.3, single": a bare kind is all of its blocks); never empty."""
        chosen = []
        for kind, number in self._parse(text, "custom_layers"):
            count = self.block_counts[kind]
            if number is not None and number >= count:
                raise LayerSelectionError(f"custom_layers: this model has no {kind}.{number} ({self.blocks_described})")
            chosen.extend(site for site in ((kind, i) for i in ([number] if number is not None else range(count)))
                          if site not in chosen)
        if not chosen:
            raise LayerSelectionError(f"custom_layers: empty; list blocks such as {self._example}")
        return chosen

    def select(self, sites: list, text: str, input_name: str, missing: str) -> list:
        """The sites among `sites` that the names in text select; a name selecting none raises missing
        formatted with its {name} and the {layers}."""
        chosen = []
        for kind, number in self._parse(text, input_name):
            matches = [site for site in sites if site[0] == kind and number in (None, site[1])]
            if not matches:
                name = kind if number is None else f"{kind}.{number}"
                raise LayerSelectionError(missing.format(name=name, layers=format_layers(sites)))
            chosen.extend(site for site in matches if site not in chosen)
        return chosen

    @property
    def _example(self) -> str:
        kinds = list(self.block_counts)
        return f"{kinds[-1]}.3, {kinds[0]}" if len(kinds) > 1 else f"{kinds[0]}.3, {kinds[0]}.5"

    def _parse(self, text: str, input_name: str) -> list[tuple[str, int | None]]:
        """ "double.3, single" -> [("double", 3), ("single", None)] (None: every block of that kind)."""
        parsed = []
        for token in text.replace(",", " ").split():
            kind, _, number = token.partition(".")
            if kind not in self.block_counts or (number and not number.isdigit()):
                kinds = list(self.block_counts)
                raise LayerSelectionError(
                    f"{input_name}: cannot read {token!r}; on {self.family} expected "
                    f"{', '.join(f'{k}.N' for k in kinds)}, {' or '.join(kinds)} (e.g. {self._example})")
            parsed.append((kind, int(number) if number else None))
        return parsed

    def check_latent_size(self, height: int, width: int, input_name: str, what: str = "") -> None:
        """Any size goes through: the model pads a latent to its patch size."""

    @staticmethod
    def name(site) -> str:
        return f"{site[0]}.{site[1]}"

    def installed(self, model: comfy.model_patcher.ModelPatcher, site, kind: str):
        """What acts at a site on this clone (this pack's patch inside its block replacement, another
        node's block replacement), or None (a block has one attention)."""
        replaced = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
        existing = replaced.get((self.block_keys[site[0]], site[1]))
        return existing.patch if isinstance(existing, JointAttentionSite) else existing

    def install(self, model: comfy.model_patcher.ModelPatcher, site, kind: str, patch) -> None:
        if kind != "attn1":
            raise ValueError(f"a {self.family} block has one (joint) attention; {kind!r} has no meaning here")
        image_only = None
        if site[1] in self.image_only_blocks.get(site[0], ()):
            image_only = dataclasses.replace(patch, site=(*site, IMAGE_ONLY))
        model.set_model_patch_replace(JointAttentionSite(patch, site, self.positions, image_only), "dit",
                                      self.block_keys[site[0]], site[1])

    @property
    def image_only_blocks(self) -> dict:
        """kind -> the blocks with a second, image-only attention after the joint one (SD3.5 Medium)."""
        return {}

    def resolve(self, preset: str, custom_layers: str = "") -> list:
        """The blocks a preset (or the custom list) selects on a model of one kind of block; never empty.
        late_blocks: the second half."""
        (kind, depth), = self.block_counts.items()
        if preset == LATE_BLOCKS:
            return [(kind, i) for i in range(depth // 2, depth)]
        if preset == ALL_BLOCKS:
            return self.layers()
        if preset == CUSTOM:
            return self.custom(custom_layers)
        raise LayerSelectionError(f"layers: {preset!r} is not a preset of this model ({self.family}); expected "
                                  f"auto or one of {', '.join(self.presets)}")

    def text_rows(self, c_crossattn: torch.Tensor) -> int:
        return c_crossattn.shape[1]

    def token_grid(self, x: torch.Tensor, c_crossattn: torch.Tensor) -> TokenGrid:
        """The tokens of a model call on latent x (the last two dimensions its height and width) with
        prompt c_crossattn."""
        return TokenGrid(self.text_rows(c_crossattn), math.ceil(x.shape[-2] / self.patch_size),
                         math.ceil(x.shape[-1] / self.patch_size))


@dataclass(frozen=True)
class RotaryPositions:
    """A family whose block replacement receives its RoPE as args["pe"] (EmbedND's matrices)."""

    theta: int
    axes_dim: tuple[int, ...]
    width_axis: int = 2  # the image positions' (index, row, column) column

    def __call__(self, args: dict, options: dict, grid: TokenGrid):
        """(the call's rotation, the rotation of one image width along the width axis), or (None, None)."""
        rotation = args.get("pe")
        if rotation is None:
            return None, None
        # in rope_options' units (0.8.0's scale_x on Flux; a family without it: 1)
        scale_x = (options.get("rope_options") or {}).get("scale_x", 1.0)
        position = rotation.new_zeros(1, 1, len(self.axes_dim))
        position[..., self.width_axis] = grid.width * scale_x  # filled in place: no host-to-device copy
        beside = EmbedND(sum(self.axes_dim), self.theta, list(self.axes_dim))(position)
        return rotation[:1], beside  # every item of a call has the same positions


def acting_tokens(patch, site, options: dict) -> TokenGrid | None:
    """The call's tokens where a site's patch acts in this call (its style is on, or a capture asks), else None."""
    owner = getattr(patch, "owner", None)
    call = None if owner is None else style_call(options, owner)
    return call.tokens if call is not None else captured_tokens(options, site)


@dataclass(frozen=True)
class JointAttentionSite:
    """A block replacement that runs the block's own forward, its joint attention through `patch` (a
    StyledAttention, or an attention-map capture's CapturingAttention) in the calls it acts on, and a
    second, image-only attention of the block (SD3.5 Medium) through image_only."""

    patch: object
    site: tuple
    positions: RotaryPositions | None = None
    image_only: object = None

    def __call__(self, args: dict, extra: dict) -> dict:
        options = args["transformer_options"]
        grid = acting_tokens(self.patch, self.site, options)
        if grid is None:
            return extra["original_block"](args)
        rotation, beside = (None, None) if self.positions is None else self.positions(args, options, grid)
        layout = TokenLayout(grid.text, grid.height * grid.width, rotation, beside)
        override = JointAttention(self.patch, layout, options.get(ATTENTION_OVERRIDE_OPTION), self.image_only)
        options = {**options, ATTENTION_OVERRIDE_OPTION: override}
        return extra["original_block"]({**args, "transformer_options": options})


@dataclass(frozen=True)
class JointAttention:
    """The optimized_attention_override of one block: its joint attention through `patch` with the
    call's layout, a second call with the image rows alone (SD3.5 Medium) through image_only; the
    override the user had (inner) serves the kernel calls."""

    patch: object  # StyledAttention or CapturingAttention: (query, key, value, extra_options) -> output
    layout: TokenLayout
    inner: object = None
    image_only: object = None

    def __call__(self, func, query, key, value, heads, *args, mask=None, skip_reshape=False, transformer_options=None,
                 **kwargs):
        if mask is not None:
            node = getattr(self.patch, "owner", None) or "CaptureAttentionMaps"
            raise ValueError(f"{node}: this model's attention has a mask (e.g. Chroma's text padding mask), which "
                             "this pack's nodes do not support yet; run without the attention mask")
        if skip_reshape:  # (batch, heads, rows, dim_head) -> (batch, rows, heads * dim_head)
            query, key, value = (t.transpose(1, 2).flatten(2) for t in (query, key, value))
        elif value.ndim == 4:  # SD3 hands the values as (batch, rows, heads, dim_head)
            value = value.flatten(2)
        options = {k: v for k, v in (transformer_options or {}).items() if k != ATTENTION_OVERRIDE_OPTION}
        if self.inner is not None:
            options[ATTENTION_OVERRIDE_OPTION] = self.inner
        patch, layout = self.patch, self.layout
        if self.image_only is not None and layout.text and query.shape[1] == layout.image:
            patch, layout = self.image_only, UNET_LAYOUT  # the block's image-only attention: every row an image token
        out = patch(query, key, value, {**options, "n_heads": heads, LAYOUT_OPTION: layout})
        if kwargs.get("skip_output_reshape"):  # the caller wants (batch, heads, rows, dim_head) back
            return out.unflatten(2, (heads, -1)).transpose(1, 2)
        return out
