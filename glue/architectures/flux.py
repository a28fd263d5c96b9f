"""The Flux adapter (Flux.1 dev/schnell/Krea, Kontext, Chroma): the attention sites are the joint
attentions of the double and single blocks, named ("double", i) / ("single", i).

How a behaviour is installed, and why: a site is ComfyUI's block replacement
patches_replace["dit"][("double_block" | "single_block", i)]. The patch runs the model's own block
(original_block) with a copy of transformer_options that carries an optimized_attention_override for
that block alone (chained to any override the user set). The block key is a claim the conflict check
can see and name, the block's weights stay where LoRAs, merges and lowvram casting find them, and
nothing outside the chosen blocks is touched. The override receives the joint attention's queries
and keys after QK-norm and RoPE, (batch, heads, rows, dim_head), text rows first.

Token layout: text rows are the prompt's tokens (the context's length, read once per model call),
then ceil(h / 2) * ceil(w / 2) image rows, then Kontext's reference-image rows, if any.
"""

import math
from dataclasses import dataclass

import torch

import comfy.ldm.chroma.model
import comfy.ldm.flux.model
import comfy.model_patcher
from comfy.ldm.flux.layers import EmbedND

from ...attention_patches.attention import ATTENTION_OVERRIDE_OPTION
from ...attention_patches.attention_maps import captured_tokens
from ...attention_patches.layers import CUSTOM, LayerSelectionError, format_layers
from ...attention_patches.style_call import style_call
from ...attention_patches.token_layout import LAYOUT_OPTION, TokenGrid, TokenLayout

VITAL_BLOCKS = "vital_blocks"
SINGLE_BLOCKS = "single_blocks"
ALL_BLOCKS = "all_blocks"
PRESETS = (VITAL_BLOCKS, SINGLE_BLOCKS, ALL_BLOCKS, CUSTOM)
# Stable Flow's vital layers of Flux.1 (19 double, 38 single blocks), by block: the layers whose
# removal changes the image most; on another depth the same relative positions are taken.
VITAL = {"double": (0, 1, 17, 18), "single": (6, 9, 34, 35, 37)}
FLUX1_DEPTH = {"double": 19, "single": 38}
BLOCK_KEYS = {"double": "double_block", "single": "single_block"}
WIDTH_AXIS = 2  # process_img's image positions: (index, row, column[, ...])


@dataclass(frozen=True)
class FluxAdapter:
    double: int
    single: int
    patch_size: int
    theta: int
    axes_dim: tuple[int, ...]
    family = "Flux (Flux.1, Kontext, Chroma)"
    models = "Flux models (Flux.1, Kontext, Chroma)"
    presets = PRESETS
    auto = {"visual_style_prompting": VITAL_BLOCKS, "style_aligned": SINGLE_BLOCKS, "attention_maps": VITAL_BLOCKS}
    kind_names = {"attn1": "joint attention"}
    # where each kind of attention map is read: both from a block's one joint attention
    map_kinds = {"self": "attn1", "cross": "attn1"}

    @classmethod
    def of(cls, model: comfy.model_patcher.ModelPatcher) -> "FluxAdapter | None":
        dit = model.get_model_object("diffusion_model")
        # by class: HunyuanVideo has the same block lists with image rows first and 5-D latents
        if not isinstance(dit, (comfy.ldm.flux.model.Flux, comfy.ldm.chroma.model.Chroma)):
            return None
        if not isinstance(dit.patch_size, int):
            return None
        return cls(len(dit.double_blocks), len(dit.single_blocks), dit.patch_size, dit.pe_embedder.theta,
                   tuple(dit.pe_embedder.axes_dim))

    @property
    def sites(self) -> tuple:
        return (*(("double", i) for i in range(self.double)), *(("single", i) for i in range(self.single)))

    def layers(self) -> list:
        return list(self.sites)

    def resolve(self, preset: str, custom_layers: str = "") -> list:
        """The blocks a preset (or the custom list) selects on this model; never empty."""
        if preset == VITAL_BLOCKS:
            return [(kind, i) for kind, count in (("double", self.double), ("single", self.single))
                    for i in sorted({round(v * (count - 1) / (FLUX1_DEPTH[kind] - 1)) for v in VITAL[kind]})
                    if count > 0]
        if preset == SINGLE_BLOCKS:
            return [("single", i) for i in range(self.single)]
        if preset == ALL_BLOCKS:
            return self.layers()
        if preset == CUSTOM:
            return self._custom(custom_layers)
        raise LayerSelectionError(f"layers: {preset!r} is not a preset of this model ({self.family}); expected "
                                  f"auto or one of {', '.join(PRESETS)}")

    def _custom(self, text: str) -> list:
        chosen = []
        for kind, number in _parse_blocks(text, self.family, "custom_layers"):
            count = self.double if kind == "double" else self.single
            if number is not None and number >= count:
                raise LayerSelectionError(f"custom_layers: this model has no {kind}.{number} ({self.double} double "
                                          f"and {self.single} single blocks)")
            chosen.extend(site for site in ((kind, i) for i in ([number] if number is not None else range(count)))
                          if site not in chosen)
        if not chosen:
            raise LayerSelectionError("custom_layers: empty; list blocks such as double.0, single.3")
        return chosen

    def select(self, sites: list, text: str, input_name: str, missing: str) -> list:
        """The sites among `sites` that the names in text select (double.N, single.N, double, single);
        a name selecting none raises missing formatted with its {name} and the {layers}."""
        chosen = []
        for kind, number in _parse_blocks(text, self.family, input_name):
            matches = [site for site in sites if site[0] == kind and number in (None, site[1])]
            if not matches:
                name = kind if number is None else f"{kind}.{number}"
                raise LayerSelectionError(missing.format(name=name, layers=format_layers(sites)))
            chosen.extend(site for site in matches if site not in chosen)
        return chosen

    def check_latent_size(self, height: int, width: int, input_name: str, what: str = "") -> None:
        """Any size goes through: the model pads a latent to its patch size."""

    @staticmethod
    def name(site) -> str:
        return f"{site[0]}.{site[1]}"

    @staticmethod
    def installed(model: comfy.model_patcher.ModelPatcher, site, kind: str):
        """What acts at a site on this clone (this pack's patch inside its block replacement, another
        node's block replacement), or None (a block has one attention)."""
        replaced = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
        existing = replaced.get((BLOCK_KEYS[site[0]], site[1]))
        return existing.patch if isinstance(existing, JointAttentionSite) else existing

    def install(self, model: comfy.model_patcher.ModelPatcher, site, kind: str, patch) -> None:
        if kind != "attn1":
            raise ValueError(f"a Flux block has one (joint) attention; {kind!r} has no meaning here")
        model.set_model_patch_replace(JointAttentionSite(patch, site, self.theta, self.axes_dim), "dit",
                                      BLOCK_KEYS[site[0]], site[1])

    def token_grid(self, x: torch.Tensor, c_crossattn: torch.Tensor) -> TokenGrid:
        """The tokens of a model call on latent x with prompt c_crossattn."""
        return TokenGrid(c_crossattn.shape[1], math.ceil(x.shape[-2] / self.patch_size),
                         math.ceil(x.shape[-1] / self.patch_size))


def _parse_blocks(text: str, family: str, input_name: str) -> list[tuple[str, int | None]]:
    """ "double.3, single" -> [("double", 3), ("single", None)] (None: every block of that kind)."""
    parsed = []
    for token in text.replace(",", " ").split():
        kind, _, number = token.partition(".")
        if kind not in BLOCK_KEYS or (number and not number.isdigit()):
            raise LayerSelectionError(f"{input_name}: cannot read {token!r}; on {family} expected "
                                      "double.N, single.N, double or single (e.g. single.3, double)")
        parsed.append((kind, int(number) if number else None))
    return parsed


@dataclass(frozen=True)
class JointAttentionSite:
    """A block replacement that runs the block's own forward, its joint attention through `patch` (a
    StyledAttention, or an attention-map capture's CapturingAttention) in the calls it acts on."""

    patch: object
    site: tuple
    theta: int
    axes_dim: tuple[int, ...]

    def _tokens(self, options: dict) -> TokenGrid | None:
        """The call's tokens where the patch acts in this call: its style is on, or a capture asks."""
        owner = getattr(self.patch, "owner", None)
        call = None if owner is None else style_call(options, owner)
        return call.tokens if call is not None else captured_tokens(options, self.site)

    def __call__(self, args: dict, extra: dict) -> dict:
        options = args["transformer_options"]
        grid = self._tokens(options)
        if grid is None:
            return extra["original_block"](args)
        rotation = args.get("pe")
        beside = None
        if rotation is not None:
            # the rotation of one image width along the width axis (in rope_options' units, 0.8.0's scale_x)
            scale_x = (options.get("rope_options") or {}).get("scale_x", 1.0)
            position = rotation.new_zeros(1, 1, len(self.axes_dim))
            position[..., WIDTH_AXIS] = grid.width * scale_x  # filled in place: no host-to-device copy
            beside = EmbedND(sum(self.axes_dim), self.theta, list(self.axes_dim))(position)
            rotation = rotation[:1]  # every item of a call has the same positions
        layout = TokenLayout(grid.text, grid.height * grid.width, rotation, beside)
        override = JointAttention(self.patch, layout, options.get(ATTENTION_OVERRIDE_OPTION))
        options = {**options, ATTENTION_OVERRIDE_OPTION: override}
        return extra["original_block"]({**args, "transformer_options": options})


@dataclass(frozen=True)
class JointAttention:
    """The optimized_attention_override of one block: its joint attention through `patch` with the
    call's layout; the override the user had (inner) serves the kernel calls."""

    patch: object  # StyledAttention or CapturingAttention: (query, key, value, extra_options) -> output
    layout: TokenLayout
    inner: object = None

    def __call__(self, func, query, key, value, heads, *args, mask=None, skip_reshape=False, transformer_options=None,
                 **kwargs):
        if mask is not None:
            node = getattr(self.patch, "owner", None) or "CaptureAttentionMaps"
            raise ValueError(f"{node}: this model's attention has a mask (e.g. Chroma's text padding mask), which "
                             "this pack's nodes do not support yet; run without the attention mask")
        if skip_reshape:  # (batch, heads, rows, dim_head) -> (batch, rows, heads * dim_head)
            query, key, value = (t.transpose(1, 2).flatten(2) for t in (query, key, value))
        options = {k: v for k, v in (transformer_options or {}).items() if k != ATTENTION_OVERRIDE_OPTION}
        if self.inner is not None:
            options[ATTENTION_OVERRIDE_OPTION] = self.inner
        out = self.patch(query, key, value, {**options, "n_heads": heads, LAYOUT_OPTION: self.layout})
        if kwargs.get("skip_output_reshape"):  # the caller wants (batch, heads, rows, dim_head) back
            return out.unflatten(2, (heads, -1)).transpose(1, 2)
        return out
