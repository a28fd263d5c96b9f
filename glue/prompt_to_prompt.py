"""StyleDiffusion's prompt-to-prompt edit inside ComfyUI (the attention control is
attention_patches/prompt_to_prompt.py, the local blend attention_patches/local_blend.py).

The edit samples the source and the target prompt as one pair of batch rows from the inverted
latent, on the inversion's schedule at its cfg, in the guided-loop glue (so LoRAs and model patches
on the MODEL apply, and a ControlNet the node copies onto its conditioning): DDIM steps, the local blend after each step once it starts. One StyleCall
wrapper hands every layer the step's EditStep and value inputs (EditPlan); each attention layer of
the UNet is replaced by a PromptToPromptAttention on a clone, so the input MODEL is never modified.
"""

from dataclasses import dataclass, field

import torch

from ..attention_patches.attention import AttentionFunction
from ..attention_patches.feature_store import UnrecordedSigmaError
from ..attention_patches.layers import TransformerSite
from ..attention_patches.local_blend import BlendMaps, blend_mask, blended
from ..attention_patches.prompt_to_prompt import EDIT_SITE, CrossAttentionEdit, EditSchedule, PromptToPromptAttention
from ..attention_patches.style_call import StyleOwner
from ..attention_patches.value_input import SITE, ValueInput, ValueInputPatch
from ..inversion.style_inversion import StyleInversion
from ..inversion.value_input import ddim_step
from .architectures import adapter_for
from .guided_loop import run_guided_loop
from .site_patches import Claim, claim_sites
from .style_call import install_style_call
from .value_inversion import EVERY_SIGMA


@dataclass(frozen=True)
class LocalBlend:
    words: torch.Tensor  # (2, keys): the source's blend words in row 0, the target's in row 1
    layers: tuple  # the layers whose cross-attention maps it reads
    threshold: float = 0.3
    start: float = 0.2  # blends after each step i >= int(start * steps), as the authors' code


@dataclass(frozen=True)
class EditPlan:
    """The StyleCall store of an edit: at each sigma of the inversion's schedule the step's EditStep and
    the rows' value inputs (the source's learned always, the target's while tau_v lasts, else plain)."""

    inversion: StyleInversion
    schedule: EditSchedule
    _moved: dict = field(default_factory=dict, compare=False, repr=False)

    def step_index(self, sigma: float) -> int:
        index = self.inversion.step_index(sigma)
        if index is None:
            raise UnrecordedSigmaError(f"the edit runs on its inversion's {self.inversion.steps} steps; the model was "
                                       f"called at sigma {sigma:.5f}, which is not one of them")
        return index

    def at(self, sigma: float, device, tag=None) -> dict:
        index = self.step_index(sigma)
        step = self.schedule.at(index)
        key = (index, step.target_values, str(device))
        if key not in self._moved:
            scale, shift = self.inversion.scales[index], self.inversion.shifts[index]
            target_scale = scale if step.target_values else torch.ones_like(scale)
            target_shift = shift if step.target_values else torch.zeros_like(shift)
            self._moved.clear()  # one step's tensors on the device at a time
            self._moved[key] = ValueInput(torch.stack([scale, target_scale]).to(device),
                                          torch.stack([shift, target_shift]).to(device))
        return {SITE: self._moved[key], EDIT_SITE: step}


EDIT_CLAIM = Claim("PromptToPromptEdit", "model", "a prompt-to-prompt edit controls every attention layer: connect "
                   "the model before that node", takes_over=(),
                   foreign="{input_name}: the {what} of {names} is already replaced by another node ({patch_type}); a "
                   "prompt-to-prompt edit controls every attention layer: connect the model before that node")


def edit_model(model, inversion: StyleInversion, schedule: EditSchedule, edit: CrossAttentionEdit,
               sites: list[TransformerSite], owner: StyleOwner, attention: AttentionFunction,
               blend: LocalBlend | None = None) -> tuple[object, BlendMaps | None]:
    """A clone whose attention layers run the edit (a batch of source and target rows), and the maps
    its local blend collects (None without one)."""
    adapter = adapter_for(model, "PromptToPromptEdit")
    layers = [layer for site in sites for layer in site.layers()]
    for kind in ("attn1", "attn2"):  # every site of both kinds checked before anything is installed
        claim_sites(model, adapter, layers, kind, EDIT_CLAIM)
    maps = None if blend is None else BlendMaps(blend.words)
    patched = model.clone()
    patched.set_model_attn2_patch(ValueInputPatch(owner))
    # self-attention maps are replaced at every attention level but the finest (the authors' "at most
    # 32x32 queries" at 512 px on SD1.5; SDXL at 1024 px: its 32x32 level, not its 64x64 one)
    finest = min(site.downsamplings for site in sites if site.depth > 0)
    for site in sites:
        for layer in site.layers():
            adapter.install(patched, layer, "attn1", PromptToPromptAttention(
                owner, attention, cross=False, self_replaced=site.downsamplings > finest))
            adapter.install(patched, layer, "attn2", PromptToPromptAttention(
                owner, attention, cross=True, edit=edit,
                blend=maps if blend is not None and layer in blend.layers else None))
    install_style_call(patched, owner, None, EVERY_SIGMA, recorded=EditPlan(inversion, schedule))
    return patched, maps


def paired(conditioning_source, conditioning_target):
    """One conditioning whose batch rows are the source prompt's and the target's."""
    (source, source_extras), (target, target_extras) = conditioning_source[0], conditioning_target[0]
    if source.shape != target.shape:
        raise ValueError(f"target_prompt: encodes to {target.shape[1]} tokens and the source prompt to "
                         f"{source.shape[1]}; both must fit one 77-token chunk")
    extras = dict(target_extras)
    if source_extras.get("pooled_output") is not None and target_extras.get("pooled_output") is not None:
        extras["pooled_output"] = torch.cat([source_extras["pooled_output"], target_extras["pooled_output"]])
    return [[torch.cat([source, target]), extras]]


def run_edit(patched, inversion: StyleInversion, positive, negative, blend: LocalBlend | None,
             maps: BlendMaps | None, latent_format) -> torch.Tensor:
    """Samples the pair from the inverted latent: (2, ...) VAE-space latents, source then target."""
    sigmas = inversion.sampling_sigmas()
    steps = len(sigmas) - 1
    top = latent_format.process_out(inversion.trajectory.top).repeat(2, 1, 1, 1)

    def loop(denoise, x, loop_sigmas, on_step):
        for i in range(steps):
            sigma, sigma_next = loop_sigmas[i], loop_sigmas[i + 1]
            denoised = denoise(x, sigma * x.new_ones(x.shape[0]))
            x = ddim_step(x, sigma, sigma_next, denoised)
            if blend is not None and i >= int(blend.start * steps):
                mask = blend_mask(maps, tuple(x.shape[-2:]), blend.threshold)
                x = torch.cat([x[:1], blended(x[:1], x[1:], mask)])
            on_step(i, x, denoised)
        return x, None

    with torch.no_grad():
        out, _ = run_guided_loop(patched, positive, negative, inversion.guidance, sigmas, top, loop)
    return out
