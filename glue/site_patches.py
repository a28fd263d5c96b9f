"""The one way this pack's nodes put a behaviour at attention sites: the conflict check, then the
architecture adapter's install. A site claimed twice is refused naming both nodes; a site another pack
replaced is refused naming its patch; an attention-map capture placed earlier is taken over (the
styled site records the maps itself)."""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import comfy.ldm.modules.attention

from ..attention_patches.attention import KernelAttention
from ..attention_patches.attention_maps import CapturingAttention
from ..attention_patches.style_call import StyleOwner
from ..attention_patches.styled_attention import BranchMethods, StyleMethod, StyledAttention

KIND_NAMES = {"attn1": "self-attention", "attn2": "cross-attention"}
STYLED = ("{input_name}: {claimant} would restyle {names}, which {other} earlier in this chain already styles; "
          "each layer takes one style node: {remedy}")
FOREIGN = ("{input_name}: {names} already have their {what} replaced by another node ({patch_type}); {claimant} "
           "would overwrite it: choose other layers, or apply {claimant} before that node")


class LayerConflictError(ValueError):
    pass


@dataclass(frozen=True)
class Claim:
    """Who asks for sites, and what it does with each kind of patch found there.

    takes_over: patch types replaced without a word (a capture: the styled site records its maps).
    yields_to_styles: a site whose patch records attention maps itself (a styled site) is left to it
    (for captures, which it serves) instead of refused.
    """

    claimant: str  # the node, as named in errors
    input_name: str = "layers"
    remedy: str = "give the two nodes disjoint layers (layers: custom)"
    takes_over: tuple[type, ...] = (CapturingAttention,)
    yields_to_styles: bool = False
    foreign: str = FOREIGN  # the message for another pack's patch: {input_name} {names} {what} {patch_type} {claimant}


def owner_of(patch) -> StyleOwner | None:
    owner = getattr(patch, "owner", None)
    return owner if isinstance(owner, StyleOwner) else None


def claim_sites(model, adapter, sites: Sequence, kind: str, claim: Claim) -> list:
    """The sites claim installs at (all of them, but those it yields), or LayerConflictError."""
    styled, foreign, free = {}, {}, []
    for site in sites:
        existing = adapter.installed(model, site, kind)
        if existing is None or isinstance(existing, claim.takes_over):
            free.append(site)
        elif owner_of(existing) is not None:
            if not (claim.yields_to_styles and getattr(existing, "records_attention_maps", False)):
                other = str(owner_of(existing)) + getattr(existing, "conflict_note", "")
                styled.setdefault(other, []).append(adapter.name(site))
        else:
            foreign.setdefault(type(existing).__name__, []).append(adapter.name(site))
    for other, names in styled.items():
        raise LayerConflictError(STYLED.format(input_name=claim.input_name, claimant=claim.claimant,
                                               names=", ".join(names), other=other, remedy=claim.remedy))
    for patch_type, names in foreign.items():
        raise LayerConflictError(claim.foreign.format(input_name=claim.input_name, names=", ".join(names),
                                                      what=getattr(adapter, "kind_names", KIND_NAMES).get(kind, kind), kind=kind,
                                                      patch_type=patch_type, claimant=claim.claimant))
    return free


def install_site_patches(model, adapter, patches: Mapping, kind: str, claim: Claim) -> None:
    """Each site's patch at its kind of attention on the clone `model`, after the conflict check (all
    sites are checked before any is installed: a refused claim leaves the clone as it was)."""
    for site in claim_sites(model, adapter, list(patches), kind, claim):
        adapter.install(model, site, kind, patches[site])


def install_styled_attention(model, adapter, layers: list, method: StyleMethod, owner: StyleOwner, patch: str = "attn1",
                             cond_only: bool = False, negative_layers: list = (),
                             negative_method: StyleMethod | None = None) -> None:
    """A StyledAttention per site at its attn1 (or, patch "attn2", cross-attention): method in every
    branch, or with cond_only in the cond chunks alone (the uncond chunks keep plain attention).
    negative_method acts in the style's negative branch at negative_layers, styled or not (those not
    styled are plain outside that branch)."""
    negative_only = [layer for layer in negative_layers if layer not in layers]
    # both claims are checked before anything is installed (a style claim yields no site)
    sites = claim_sites(model, adapter, layers, patch, Claim(str(owner))) + claim_sites(
        model, adapter, negative_only, patch,
        Claim(str(owner), "nvqg_layers", "set nvqg_layers to style_layers, or give the other node other layers"))
    attention = KernelAttention.of(comfy.ldm.modules.attention.optimized_attention)
    plain_keys = ("self",) if patch == "attn1" else ("text",)
    for layer in sites:
        styled = method if layer in layers else None
        methods = BranchMethods(styled, None if cond_only else styled,
                                negative_method if layer in negative_layers else None)
        adapter.install(model, layer, patch, StyledAttention(layer, methods, owner, attention, plain_keys))
