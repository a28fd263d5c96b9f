"""Prompt-to-prompt attention control as StyleDiffusion edits with it (Hertz et al. 2022; Li et al.
2023, the authors' stylediffusion.py), pure torch.

Every cond/uncond chunk of an edit's model call holds two rows: the source (the inverted image's
reconstruction) and the target (the edited prompt). Per step (EditStep), the target's
- cross-attention maps (cond) become the source's mapped through the token alignment,
  P_t <- P_s A + P_t diag(b) (replace: A = mapper diag(w), b = 0; refine: A = select diag(alpha w),
  b = (1 - alpha) w; w: reweighting);
- self-attention maps (cond, and for tau_u the uncond) become the source's, at every attention level
  but the finest (the authors' "at most 32x32 queries" at 512 px on SD1.5).

No map is formed: (P_s A) V_t = P_s (A V_t), so an edited layer is one or two calls of the attention
kernel, softmax(q_s k_s^T) (A v_t) [+ softmax(q_t k_t^T) (b v_t)]; the source's self-attention
applied to the target is the kernel on (q_s, k_s, v_t).
"""

from dataclasses import dataclass

import torch

from .attention import AttentionFunction, for_call
from .attention_probe import attention_probabilities
from .local_blend import BlendMaps, layer_spatial
from .reference import StyleReferenceError, batch_chunks
from .style_call import StyleOwner, style_call

EDIT_SITE = "prompt_to_prompt"  # the StyleCall store's entry for the step's EditStep


@dataclass(frozen=True)
class EditSchedule:
    """Which controls act at step i of n (from the noisiest), with the authors' integer bounds:
    values i < n tau_v, cross i < int(tau_c (n + 1)), self i < int(tau_s n), uncond self i < int(tau_u n)."""

    steps: int
    tau_v: float = 0.5
    tau_c: float = 0.6
    tau_s: float = 0.6
    tau_u: float = 0.0

    def at(self, i: int) -> "EditStep":
        return EditStep(target_values=i < self.steps * self.tau_v, cross=i < int(self.tau_c * (self.steps + 1)),
                        self_cond=i < int(self.tau_s * self.steps), self_uncond=i < int(self.tau_u * self.steps))


@dataclass(frozen=True)
class EditStep:
    target_values: bool  # the target row's value input is the learned one (the source row's always is)
    cross: bool
    self_cond: bool
    self_uncond: bool


@dataclass(frozen=True)
class CrossAttentionEdit:
    """The target's cross-attention maps from the source's: P_t <- P_s @ source_map + P_t * own (own None: 0)."""

    source_map: torch.Tensor  # (keys, keys)
    own: torch.Tensor | None = None  # (keys,)

    @classmethod
    def replace(cls, mapper: torch.Tensor, weights: torch.Tensor) -> "CrossAttentionEdit":
        return cls(mapper * weights[None, :])

    @classmethod
    def refine(cls, indices: torch.Tensor, alphas: torch.Tensor, weights: torch.Tensor) -> "CrossAttentionEdit":
        select = torch.zeros(len(indices), len(indices))
        select[indices, torch.arange(len(indices))] = 1.0
        return cls(select * (alphas * weights)[None, :], (1 - alphas) * weights)

    def maps(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The edited target maps (..., queries, keys), for the local blend and the tests."""
        edited = source @ self.source_map.to(source)
        return edited if self.own is None else edited + target * self.own.to(target)

    def output(self, kernel: AttentionFunction, q_s, k_s, q_t, k_t, v_t, heads: int, precision=None) -> torch.Tensor:
        if v_t.shape[1] != self.source_map.shape[0]:
            raise StyleReferenceError(f"the edit's token alignment is for {self.source_map.shape[0]} keys and this "
                                      f"cross-attention has {v_t.shape[1]}: prompts of one 77-token chunk only")
        out = kernel(q_s, k_s, self.source_map.to(v_t) @ v_t, heads, attn_precision=precision)
        if self.own is not None:
            out = out + kernel(q_t, k_t, self.own.to(v_t)[:, None] * v_t, heads, attn_precision=precision)
        return out


@dataclass(frozen=True)
class PromptToPromptAttention:
    """attn1 or attn2 replace at one layer of an edit: the target row's maps from the source row's in
    the steps and branches its node's StyleCall (an EditStep) turns on; plain attention otherwise."""

    owner: StyleOwner
    attention: AttentionFunction
    cross: bool  # attn2 (cross-attention) or attn1
    edit: CrossAttentionEdit | None = None  # cross layers
    self_replaced: bool = False  # attn1 at a level coarser than the finest attention level
    blend: BlendMaps | None = None  # cross layers the local blend reads

    def __call__(self, query, key, value, extra_options: dict) -> torch.Tensor:
        heads = extra_options["n_heads"]
        precision = extra_options.get("attn_precision")
        kernel = for_call(self.attention, extra_options)
        call = style_call(extra_options, self.owner)
        step = None if call is None or call.store is None else call.store.features.get(EDIT_SITE)
        if step is None:
            return kernel(query, key, value, heads, attn_precision=precision)
        outputs = []
        for chunk, kind in zip(batch_chunks(query.shape[0], call.cond_or_uncond), call.cond_or_uncond):
            q, k, v = query[chunk], key[chunk], value[chunk]
            if q.shape[0] != 2:
                raise StyleReferenceError(f"a prompt-to-prompt edit runs the source and the target as one pair; "
                                          f"this call has {q.shape[0]} rows per chunk")
            outputs.append(self._pair(kernel, q, k, v, heads, precision, kind, step, extra_options))
        return torch.cat(outputs)

    def _pair(self, kernel, q, k, v, heads, precision, kind, step: EditStep, extra_options):
        source = kernel(q[:1], k[:1], v[:1], heads, attn_precision=precision)
        if self.cross:
            if kind == 0 and self.blend is not None:
                probabilities = attention_probabilities(q.float(), k.float(), heads)
                if step.cross:
                    probabilities = torch.cat([probabilities[:1], self.edit.maps(probabilities[:1], probabilities[1:])])
                self.blend.add(probabilities, layer_spatial(q.shape[1], extra_options["original_shape"]))
            if kind == 0 and step.cross:
                return torch.cat([source, self.edit.output(kernel, q[:1], k[:1], q[1:], k[1:], v[1:], heads, precision)])
        elif self.self_replaced and (step.self_cond if kind == 0 else step.self_uncond):
            return torch.cat([source, kernel(q[:1], k[:1], v[1:], heads, attn_precision=precision)])
        return torch.cat([source, kernel(q[1:], k[1:], v[1:], heads, attn_precision=precision)])

