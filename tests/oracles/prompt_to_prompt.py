"""StyleDiffusion's prompt-to-prompt edit (Li et al. 2023; the authors' stylediffusion.py:
AttentionControlEdit / AttentionRefine / AttentionReweight driven by register_attention_control)
written out as diffusers attention processors on the twin UNet.

Independent of the pack: nothing here imports it. The attention probabilities are formed explicitly,
softmax(q k^T * scale), edited as tensors and multiplied with the values, the way the authors'
controller edits the maps it is handed (the pack never forms them; it uses P_s (A V) instead).

A diffusers pipeline batches [uncond; cond]; each half holds the source row (0) and the target row (1),
so one UNet call sees [uncond_source, uncond_target, cond_source, cond_target]. At step i of n (from
the noisiest; a before_call hook sets it):
- every cross-attention's value input is, in the cond half, context * scale_i + shift_i for the source
  row, and for the target row too while i < n tau_v (plain context afterwards); keys and the uncond half
  keep the plain context;
- cond cross-attention, while i < int(tau_c (n + 1)): P_t <- P_s @ A + P_t * b (b None: 0);
- cond self-attention, while i < int(tau_s n), and uncond self-attention while i < int(tau_u n),
  in the layers with fewer queries than the UNet's largest self-attention (the authors' 32x32 cut
  at 512 px leaves only the finest attention level alone): P_t <- P_s.
"""

from dataclasses import dataclass

import torch

from .sampling import Prompts, ddim_sample, sd_scheduler

UNCOND_SOURCE, UNCOND_TARGET, COND_SOURCE, COND_TARGET = range(4)


@dataclass
class EditControl:
    """The authors' controller state: the taus, the token alignment and the learned value inputs."""

    steps: int
    tau_v: float
    tau_c: float
    tau_s: float
    tau_u: float
    source_map: torch.Tensor  # A: (77, 77)
    own: torch.Tensor | None  # b: (77,) or None
    scales: torch.Tensor  # (steps, 77, channels)
    shifts: torch.Tensor
    largest_self_queries: int  # the finest attention level's query count (never self-replaced)
    step: int = 0

    def target_values(self) -> bool:
        return self.step < self.steps * self.tau_v

    def cross(self) -> bool:
        return self.step < int(self.tau_c * (self.steps + 1))

    def self_cond(self) -> bool:
        return self.step < int(self.tau_s * self.steps)

    def self_uncond(self) -> bool:
        return self.step < int(self.tau_u * self.steps)


def largest_self_attention_queries(unet, height: int, width: int) -> int:
    """Query count of the finest level that has attention: down block k works at (height, width) / 2^k."""
    levels = [k for k, block in enumerate(unet.down_blocks) if hasattr(block, "attentions")]
    return max((height >> k) * (width >> k) for k in levels)


class PromptToPromptProcessor:
    def __init__(self, control: EditControl, cross: bool):
        self.control, self.cross = control, cross

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        control = self.control
        batch = hidden_states.shape[0]
        if batch != 4:
            raise ValueError(f"the edit runs [uncond source, uncond target, cond source, cond target]; got {batch}")
        if self.cross:
            values = encoder_hidden_states.clone()
            scale, shift = control.scales[control.step], control.shifts[control.step]
            values[COND_SOURCE] = encoder_hidden_states[COND_SOURCE] * scale + shift
            if control.target_values():
                values[COND_TARGET] = encoder_hidden_states[COND_TARGET] * scale + shift
            query, key = attn.to_q(hidden_states), attn.to_k(encoder_hidden_states)
            value = attn.to_v(values)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)

        heads = attn.heads
        per_head = lambda t: t.view(batch, t.shape[1], heads, t.shape[2] // heads).transpose(1, 2)  # noqa: E731
        query, key, value = per_head(query), per_head(key), per_head(value)
        maps = torch.softmax(query @ key.transpose(-1, -2) * attn.scale, dim=-1)  # (4, heads, queries, keys)

        edited = list(maps.unbind(0))
        if self.cross:
            if control.cross():
                target = maps[COND_SOURCE] @ control.source_map.to(maps)
                if control.own is not None:
                    target = target + maps[COND_TARGET] * control.own.to(maps)
                edited[COND_TARGET] = target
        elif query.shape[2] < control.largest_self_queries:
            if control.self_cond():
                edited[COND_TARGET] = maps[COND_SOURCE]
            if control.self_uncond():
                edited[UNCOND_TARGET] = maps[UNCOND_SOURCE]
        out = torch.stack(edited) @ value
        out = out.transpose(1, 2).reshape(batch, -1, heads * out.shape[-1])
        return attn.to_out[1](attn.to_out[0](out))


def install(unet, control: EditControl):
    unet.set_attn_processor({name: PromptToPromptProcessor(control, cross=name.endswith("attn2.processor"))
                             for name in unet.attn_processors})


@torch.no_grad()
def edit_sample(unet, control: EditControl, comfy_top: torch.Tensor, prompts: Prompts, cfg: float) -> torch.Tensor:
    """DDIM (eta 0) with cfg from ComfyUI's top latent (model space, (1, 4, H, W)) for the pair; returns
    diffusers' x0 of (source, target). Installs the processors; the caller restores plain ones."""
    install(unet, control)
    scheduler = sd_scheduler()
    scheduler.set_timesteps(control.steps)
    order = [int(t) for t in scheduler.timesteps]

    def set_step(timestep):
        control.step = order.index(int(timestep))

    # ddim_sample turns ComfyUI's x at the first timestep into diffusers' latent x / sqrt(1 + sigma^2)
    return ddim_sample(unet, scheduler, comfy_top.expand(2, -1, -1, -1), control.steps, prompts, cfg,
                       before_call=set_step)
