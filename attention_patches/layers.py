"""Which self-attention layers a style method touches, resolved from the actual UNet.

A layer is named the way ComfyUI's attention-replace patches name it: (block, number, depth index),
e.g. ("output", 3, 1) is the second transformer block inside output block 3.
"""

from dataclasses import dataclass

SelfAttentionLayer = tuple[str, int, int]

BLOCK_NAMES = ("input", "middle", "output")

LATE_SELF_ATTENTION = "late_self_attention"
DECODER_SELF_ATTENTION = "decoder_self_attention"
ALL_SELF_ATTENTION = "all_self_attention"
CUSTOM = "custom"
PRESETS = (LATE_SELF_ATTENTION, DECODER_SELF_ATTENTION, ALL_SELF_ATTENTION, CUSTOM)
NVQG_LAYERS = ("style_layers", "other_layers", "all_layers")  # where StyleKeeper's negative branch swaps queries


class LayerSelectionError(ValueError):
    pass


@dataclass(frozen=True)
class TransformerSite:
    """A spatial transformer inside a UNet block."""

    block: str  # "input", "middle" or "output"
    number: int  # index of the block within its part of the UNet
    depth: int  # how many transformer blocks (each with one self-attention) it holds
    downsamplings: int  # 0 at full latent resolution, +1 per halving

    def layers(self) -> list[SelfAttentionLayer]:
        return [(self.block, self.number, index) for index in range(self.depth)]


def all_layers(sites: list[TransformerSite]) -> list[SelfAttentionLayer]:
    return [layer for site in sites for layer in site.layers()]


def late_decoder_sites(sites: list[TransformerSite]) -> list[TransformerSite]:
    """The decoder's transformers above its lowest-resolution attention level.

    Visual Style Prompting swaps in SDXL's up_blocks.1 (ComfyUI output blocks 3-5): the decoder's
    attention levels except the coarsest one, whose layers carry content rather than style. The
    same rule on SD1.5 selects output blocks 6-11 (up_blocks.2 and up_blocks.3).
    """
    decoder = [site for site in sites if site.block == "output" and site.depth > 0]
    if not decoder:
        return []
    coarsest = max(site.downsamplings for site in decoder)
    return [site for site in decoder if site.downsamplings < coarsest]


def negative_layers(every: list[SelfAttentionLayer], styled: list[SelfAttentionLayer],
                    choice: str) -> list[SelfAttentionLayer]:
    """Where the negative branch swaps queries: the styled layers (the issue's reading of the paper),
    the others (an outside port's), or all."""
    if choice not in NVQG_LAYERS:
        raise LayerSelectionError(f"nvqg_layers: unknown choice {choice!r}; expected one of {', '.join(NVQG_LAYERS)}")
    if choice == "style_layers":
        return list(styled)
    others = [layer for layer in every if layer not in styled]
    if choice == "other_layers" and not others:
        raise LayerSelectionError("nvqg_layers: other_layers is empty: layers already selects every self-attention layer")
    return others if choice == "other_layers" else list(every)


def parse_custom_layers(text: str, input_name: str = "custom_layers") -> list[tuple[str, int, int | None]]:
    """Parse "output.3, output.4.1, middle.0": block.number selects every depth, block.number.index one."""
    selections = []
    for token in text.replace(",", " ").split():
        parts = token.split(".")
        if len(parts) not in (2, 3) or parts[0] not in BLOCK_NAMES or not all(p.isdigit() for p in parts[1:]):
            raise LayerSelectionError(
                f"{input_name}: cannot read {token!r}; expected block.number or block.number.index "
                f"with block one of {', '.join(BLOCK_NAMES)} (e.g. output.3 or output.4.1)"
            )
        selections.append((parts[0], int(parts[1]), int(parts[2]) if len(parts) == 3 else None))
    return selections


def resolve_layers(sites: list[TransformerSite], preset: str, custom_layers: str = "") -> list[SelfAttentionLayer]:
    """The self-attention layers a preset (or the custom list) selects on this UNet; never empty."""
    if preset == LATE_SELF_ATTENTION:
        layers = all_layers(late_decoder_sites(sites))
    elif preset == DECODER_SELF_ATTENTION:
        layers = all_layers([site for site in sites if site.block == "output"])
    elif preset == ALL_SELF_ATTENTION:
        layers = all_layers(sites)
    elif preset == CUSTOM:
        layers = resolve_custom_layers(sites, custom_layers)
    else:
        raise LayerSelectionError(f"layers: unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
    if not layers:
        raise LayerSelectionError(
            f"layers: preset {preset!r} selects no self-attention layer on this model "
            f"(its layers: {format_layers(all_layers(sites))})"
        )
    return layers


def resolve_custom_layers(sites: list[TransformerSite], text: str, input_name: str = "custom_layers") -> list[SelfAttentionLayer]:
    selections = parse_custom_layers(text, input_name)
    if not selections:
        raise LayerSelectionError(f"{input_name}: empty; list layers such as output.3, output.4.1")
    return select_layers(all_layers(sites), selections,
                         input_name + ": this model has no self-attention at {name}; its layers are {layers}")


def select_layers(layers: list[SelfAttentionLayer], selections: list[tuple[str, int, int | None]],
                  missing: str) -> list[SelfAttentionLayer]:
    """The layers each selection names (block.number: every depth; block.number.index: one), each once.

    A selection that names none of them is an error: missing formatted with its {name} and the {layers}.
    """
    chosen: list[SelfAttentionLayer] = []
    for block, number, index in selections:
        matches = [layer for layer in layers if layer[:2] == (block, number) and index in (None, layer[2])]
        if not matches:
            raise LayerSelectionError(missing.format(name=layer_name(block, number, index), layers=format_layers(layers)))
        chosen.extend(layer for layer in matches if layer not in chosen)
    return chosen


def layer_name(block: str, number: int, index: int | None = None) -> str:
    return f"{block}.{number}" + ("" if index is None else f".{index}")


def format_layers(layers: list[SelfAttentionLayer]) -> str:
    return ", ".join(layer_name(*layer) for layer in layers) or "none"


def coarsest_level_layers(sites: list[TransformerSite]) -> list[SelfAttentionLayer]:
    """The encoder's and decoder's transformer layers at their coarsest attention level (the middle
    block left out): on SD1.5 at 512 px the 16x16 layers (input 7-8, output 3-5), the ones
    StyleDiffusion's attention regulariser compares."""
    outside = [site for site in sites if site.block != "middle" and site.depth > 0]
    if not outside:
        return []
    coarsest = max(site.downsamplings for site in outside)
    return all_layers([site for site in outside if site.downsamplings == coarsest])
