"""Plug-and-play injection (Tumanyan et al. 2023, as DiffStyler uses it): a source run's features
replace or blend into the targets' at chosen sites.

- Self-attention: the targets' queries and keys become rate * source + (1 - rate) * target, with
  rate = min(1, 2 t / 1000) (t the model timestep; the DiffStyler code's rule); values stay the
  targets' own.
- A decoder ResBlock: the output of its residual branch (before the skip connection is added) is
  the source's.

The source's features come from an external pass (the content's DDIM inversion at this sigma),
recorded through the same ReferenceFeatureStore as the style references.
"""

from dataclasses import dataclass

import torch

from .attention import AttentionFunction
from .layers import LayerSelectionError, SelfAttentionLayer, TransformerSite, all_layers, resolve_custom_layers
from .reference import ReferenceFeatures, StyleReferenceError
from .style_call import ModelCallSlot, StyleOwner
from .token_layout import UNET_LAYOUT, TokenLayout

SIZE_HINT = "sample the content's inverted latent itself (same size as the content image)"


def injection_rate(timestep: float) -> float:
    """How much of the source's queries and keys a target takes at model timestep t (0..999)."""
    return min(1.0, 2.0 * timestep / 1000.0)


def blended(target: torch.Tensor, source: torch.Tensor, rate: float) -> torch.Tensor:
    source = source.to(target)
    if rate >= 1.0:
        return source.expand_as(target)
    return rate * source + (1.0 - rate) * target


@dataclass(frozen=True)
class QueryKeyInjection:
    """A StyleMethod: the targets attend with the source's queries and keys blended into theirs (in
    cross-attention, key_sources ("text",), the keys are the source prompt's). UNet layers only: every
    row is an image token (layout is the UNet's)."""

    key_sources: tuple[str, ...] = ("self",)

    def __call__(self, query, key, value, reference: ReferenceFeatures, heads: int, attention: AttentionFunction,
                 attn_precision=None, timestep: float | None = None, layout: TokenLayout = UNET_LAYOUT) -> torch.Tensor:
        if reference.query.shape[1:] != query.shape[1:]:
            raise StyleReferenceError(
                f"the content has {reference.query.shape[1]} tokens at a self-attention layer where the sampled "
                f"latent has {query.shape[1]}: {SIZE_HINT}"
            )
        if reference.key.shape[1:] != key.shape[1:]:
            raise StyleReferenceError(
                f"the source prompt has {reference.key.shape[1]} tokens where the sampled prompts have {key.shape[1]}: "
                "keep the source prompt and the prompts within one 75-token chunk, or turn cross_attention off"
            )
        rate = injection_rate(timestep)
        return attention(blended(query, reference.query, rate), blended(key, reference.key, rate), value, heads,
                         attn_precision=attn_precision)


@dataclass(frozen=True)
class InjectedResidual:
    """What a stand-in for the last layer of a ResBlock's residual branch does (glue/stand_ins.py: the
    layer itself seen through a subclass, so its weights keep their names for ComfyUI's patches): its
    output, the branch's, is recorded during the source's pass and replaced by the source's after.

    Several nodes' injections at one layer (the branches of a masked style blend) share one stand-in,
    each with its own slot: only the node whose call is running fills its slot."""

    name: str
    taps: tuple[tuple[ModelCallSlot, StyleOwner], ...]

    @property
    def owner(self) -> StyleOwner:
        """The node that installed it first, named in errors."""
        return self.taps[0][1]

    def merged_with(self, other: "InjectedResidual") -> "InjectedResidual":
        """One behaviour serving both nodes' injections at this layer."""
        return InjectedResidual(self.name, (*self.taps, *other.taps))

    def __call__(self, layer: torch.nn.Module, x: torch.Tensor, forward) -> torch.Tensor:
        out = forward(x)
        calls = [tap.current for tap, _ in self.taps if tap.current is not None]
        if not calls or calls[0].store is None:
            return out
        store = calls[0].store
        if store.recording:
            store.record(self.name, out)
            return out
        source = store.get(self.name)
        if source.shape[1:] != out.shape[1:]:
            raise StyleReferenceError(
                f"the content's features at {self.name} are {tuple(source.shape[2:])} where the sampled latent's "
                f"are {tuple(out.shape[2:])}: {SIZE_HINT}"
            )
        return source.to(out).expand_as(out)


PLUG_AND_PLAY = "plug_and_play"
DECODER = "decoder"
NONE = "none"
CUSTOM = "custom"
ATTENTION_SITE_PRESETS = (PLUG_AND_PLAY, DECODER, CUSTOM)
FEATURE_SITE_PRESETS = (PLUG_AND_PLAY, NONE, CUSTOM)


def plug_and_play_sites(sites: list[TransformerSite]) -> tuple[list[TransformerSite], int]:
    """The decoder's transformers after its first one, and the output block of the second.

    Plug-and-Play on SD1.5/SD2 injects attention in decoder layers 4-11 (all but the first
    transformer of the coarsest attention level, output block 3) and features at up_blocks[1].resnets[1]
    (output block 4: the second block of that level). The same rule on SDXL, whose coarsest attention
    level is output blocks 0-2 (10 transformer blocks each), selects attention in output blocks 1-5
    (every depth) and the ResBlock of output block 1.
    """
    decoder = [site for site in sites if site.block == "output" and site.depth > 0]
    if len(decoder) < 2:
        raise LayerSelectionError("this UNet's decoder has fewer than two transformers; choose sites with custom")
    return decoder[1:], decoder[1].number


def resolve_attention_sites(sites: list[TransformerSite], preset: str, custom: str = "") -> list[SelfAttentionLayer]:
    if preset == PLUG_AND_PLAY:
        return all_layers(plug_and_play_sites(sites)[0])
    if preset == DECODER:
        return all_layers([site for site in sites if site.block == "output"])
    if preset == CUSTOM:
        return resolve_custom_layers(sites, custom, "custom_attention_sites")
    raise LayerSelectionError(f"attention_sites: unknown preset {preset!r}; expected one of {', '.join(ATTENTION_SITE_PRESETS)}")


def resolve_feature_blocks(sites: list[TransformerSite], output_blocks: int, preset: str, custom: str = "") -> list[int]:
    """Output block numbers whose ResBlock's residual branch is injected."""
    if preset == PLUG_AND_PLAY:
        return [plug_and_play_sites(sites)[1]]
    if preset == NONE:
        return []
    if preset != CUSTOM:
        raise LayerSelectionError(f"feature_sites: unknown preset {preset!r}; expected one of {', '.join(FEATURE_SITE_PRESETS)}")
    blocks = []
    for token in custom.replace(",", " ").split():
        parts = token.split(".")
        if len(parts) != 2 or parts[0] != "output" or not parts[1].isdigit() or int(parts[1]) >= output_blocks:
            raise LayerSelectionError(
                f"custom_feature_sites: cannot read {token!r}; expected output.N with N from 0 to {output_blocks - 1} "
                "(the decoder ResBlock of output block N), e.g. output.4"
            )
        if int(parts[1]) not in blocks:
            blocks.append(int(parts[1]))
    if not blocks:
        raise LayerSelectionError("custom_feature_sites: empty; list decoder blocks such as output.4")
    return blocks
