"""Sampling and inspection helpers shared by the integration tests (all through real ComfyUI code)."""

import math
from contextlib import contextmanager

import torch

import comfy.model_management
import comfy.patcher_extension
import comfy.sample
import nodes


def run_node(node_id: str, **inputs):
    """Execute one of the pack's nodes and return its outputs as a tuple."""
    return nodes.NODE_CLASS_MAPPINGS[node_id].execute(**inputs).args


def encode(clip, text: str):
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def vsp(model, reference=None, layers="late_self_attention", custom_layers="", strength=1.0, start_percent=0.0,
        end_percent=1.0, cond_only=False, **calibration):
    (patched,) = run_node("VisualStylePrompting", model=model, layers=layers, custom_layers=custom_layers,
                          strength=strength, start_percent=start_percent, end_percent=end_percent,
                          reference=reference, cond_only=cond_only, **calibration)
    return patched


def latent_reference(models, seed=7, prompt="", size=8, reference_seed=3, cache_megabytes=2048, cache_on_cpu=False):
    generator = torch.Generator().manual_seed(seed)
    latent = {"samples": torch.randn(1, 4, size, size, generator=generator)}
    (reference,) = run_node("StyleReferenceLatent", latent=latent, clip=models.clip, prompt=prompt,
                            reference_seed=reference_seed, cache_megabytes=cache_megabytes, cache_on_cpu=cache_on_cpu)
    return reference


def batch_prompts(models, batch=3, style_description="watercolor"):
    """(positive, negative): a reference prompt and batch - 1 target prompts sharing a style description."""
    (conditioning, batch_size) = run_node("ReferenceTargetPrompts", clip=models.clip, reference_prompt="a cat",
                                          target_prompts="\n".join(f"a dog {i}" for i in range(batch - 1)),
                                          style_description=style_description)
    assert batch_size == batch
    return conditioning, encode(models.clip, "")


def selected_layers(model):
    """The layers that carry a self-attention replace patch."""
    return list(model.model_options["transformer_options"]["patches_replace"]["attn1"])


def invert(model, latent, positive, negative, steps, cfg=1.0, scheduler="normal"):
    """DDIMInversion of a latent tensor: (inverted LATENT, INVERSION)."""
    return run_node("DDIMInversion", model=model, latent={"samples": latent}, positive=positive, negative=negative,
                    steps=steps, cfg=cfg, scheduler=scheduler)


def inversion_reference(models, trajectory, prompt="a painting", cache_megabytes=0, cache_on_cpu=False):
    (reference,) = run_node("StyleReferenceInversion", inversion=trajectory, clip=models.clip, prompt=prompt,
                            cache_megabytes=cache_megabytes, cache_on_cpu=cache_on_cpu)
    return reference


def sample(model, positive, negative, batch=3, size=8, steps=3, cfg=4.0, seed=0, sampler="euler",
           scheduler="normal"):
    latent = torch.zeros(batch, 4, size, size)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, positive, negative, latent, seed=seed,
                               disable_pbar=True)


def with_separate_cond_batches(model, reverse=False):
    """A clone on which ComfyUI evaluates cond and uncond in separate model calls (optionally uncond first)."""

    def one_cond_per_call(executor, model_base, conds, x_in, timestep, model_options):
        order = list(range(len(conds)))[::-1] if reverse else list(range(len(conds)))
        outputs = {}
        for i in order:  # the others left None (skipped), so cond_or_uncond still labels this one as it is
            alone = [cond if j == i else None for j, cond in enumerate(conds)]
            outputs[i] = executor(model_base, alone, x_in, timestep, model_options)[i]
        return [outputs[i] for i in range(len(conds))]

    clone = model.clone()
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, "test_separate", one_cond_per_call)
    return clone


# the cond/uncond layouts ComfyUI evaluates a model in: together in one call, apart, apart uncond first
LAYOUTS = {"together": lambda m: m, "separate": with_separate_cond_batches,
           "reversed": lambda m: with_separate_cond_batches(m, reverse=True)}


def self_attention_module(model, layer):
    block, number, index = layer
    unet = model.get_model_object("diffusion_model")
    container = {"input": unet.input_blocks, "middle": [unet.middle_block], "output": unet.output_blocks}[block][
        number if block != "middle" else 0]
    (transformer,) = [m for m in container if hasattr(m, "transformer_blocks")]
    return transformer.transformer_blocks[index]


@contextmanager
def record_attention(model, layer, which="attn1"):
    """Record, per model call, the q/k/v projections and the attention output (input of to_out) of a
    layer's self- (attn1) or cross-attention (attn2)."""
    block = getattr(self_attention_module(model, layer), which)
    calls = []
    handles = [
        block.to_q.register_forward_hook(lambda m, i, o: calls.append({"q": o.detach().clone()})),
        block.to_k.register_forward_hook(lambda m, i, o: calls[-1].update(k=o.detach().clone())),
        block.to_v.register_forward_hook(lambda m, i, o: calls[-1].update(v=o.detach().clone())),
        block.to_out[0].register_forward_hook(lambda m, i, o: calls[-1].update(out=i[0].detach().clone())),
    ]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def attention_weights_by_hand(q, k, heads):
    """softmax(q k^T / sqrt(d)) per head, in float64: (batch, heads, queries, keys)."""
    batch, tokens, inner = q.shape
    d = inner // heads
    qh = q.reshape(batch, tokens, heads, d).permute(0, 2, 1, 3).double()
    kh = k.reshape(k.shape[0], k.shape[1], heads, d).permute(0, 2, 1, 3).double()
    return torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1)


def attention_by_hand(q, k, v, heads):
    """softmax(q k^T / sqrt(d)) v per head, written out independently of the pack."""
    batch, tokens, inner = q.shape
    vh = v.reshape(v.shape[0], v.shape[1], heads, inner // heads).permute(0, 2, 1, 3).double()
    return (attention_weights_by_hand(q, k, heads) @ vh).permute(0, 2, 1, 3).reshape(batch, tokens, inner)


def relative_error(actual, expected) -> float:
    """||actual - expected|| / ||expected||, in float64."""
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def assert_relative_close(actual, expected, tolerance=1e-5):
    """||actual - expected|| <= tolerance * ||expected||: batch layout alone moves float32 results by ~1e-6."""
    error = relative_error(actual, expected)
    assert error <= tolerance, f"relative error {error:.2e} > {tolerance:.0e}"


def style_aligned(model, reference=None, share_attention=True, adain_queries=True, adain_keys=True,
                  adain_values=False, shared_score_scale=1.0, shared_score_shift=0.0, shared_group_norm="auto",
                  layers="all_self_attention", custom_layers="", start_percent=0.0, end_percent=1.0):
    (patched,) = run_node("StyleAlignedAttention", model=model, share_attention=share_attention,
                          adain_queries=adain_queries, adain_keys=adain_keys, adain_values=adain_values,
                          shared_score_scale=shared_score_scale, shared_score_shift=shared_score_shift,
                          shared_group_norm=shared_group_norm, layers=layers, custom_layers=custom_layers,
                          start_percent=start_percent, end_percent=end_percent, reference=reference)
    return patched


def adain_by_hand(x, reference):
    """Per channel over tokens, unbiased variance + 1e-5 (StyleAligned's calc_mean_std), in float64."""
    x, reference = x.double(), reference.double()
    mean, std = x.mean(1, keepdim=True), (x.var(1, keepdim=True) + 1e-5).sqrt()
    ref_mean, ref_std = reference.mean(1, keepdim=True), (reference.var(1, keepdim=True) + 1e-5).sqrt()
    return (x - mean) / std * ref_std + ref_mean


def shared_attention_by_hand(q, k, v, ref_q, ref_k, ref_v, heads, adain_values=False, scale=1.0, shift=0.0):
    """StyleAligned for targets q/k/v (b, n, c) and one reference (1, m, c), written out in float64."""
    batch, tokens, inner = q.shape
    d = inner // heads
    q, k = adain_by_hand(q, ref_q), adain_by_hand(k, ref_k)
    if adain_values:
        v = adain_by_hand(v, ref_v)
    keys = torch.cat([k.double(), scale * ref_k.double().expand(batch, -1, -1)], 1)
    values = torch.cat([v.double(), ref_v.double().expand(batch, -1, -1)], 1)
    split = lambda t: t.reshape(batch, t.shape[1], heads, d).permute(0, 2, 1, 3)  # noqa: E731
    scores = split(q.double()) @ split(keys).transpose(-1, -2) / math.sqrt(d)
    scores[..., k.shape[1]:] += shift
    out = torch.softmax(scores, -1) @ split(values)
    return out.permute(0, 2, 1, 3).reshape(batch, tokens, inner)


def group_norm_by_hand(norm, x, reference=None):
    """torch.nn.GroupNorm with statistics over x's positions and, when given, the reference's too."""
    groups = norm.num_groups
    batch, channels = x.shape[:2]
    grouped = x.double().reshape(batch, groups, -1)
    pooled = grouped if reference is None else torch.cat(
        [grouped, reference.double().reshape(1, groups, -1).expand(batch, -1, -1)], 2)
    mean = pooled.mean(2, keepdim=True)
    var = pooled.var(2, unbiased=False, keepdim=True)
    normalised = ((grouped - mean) / (var + norm.eps).sqrt()).reshape(x.shape)
    shape = (1, channels) + (1,) * (x.ndim - 2)
    return normalised * norm.weight.double().reshape(shape) + norm.bias.double().reshape(shape)


@contextmanager
def partial_loading(fraction=0.5):
    """ComfyUI loads every model partially, as --lowvram does on a GPU: about fraction of its weights
    loaded and patched up front, the rest cast and patched per layer during the forward (its
    weight_function). Every model is unloaded before and after, so each run starts from a fresh load.

    The budget is what load_models_gpu gives a model on a GPU with that much free memory: what is free
    minus what the model already holds (0.1 once it holds it all), so a model already loaded loads no more.
    """
    loaded_model = comfy.model_management.LoadedModel
    original = loaded_model.model_load

    def model_load(self, lowvram_model_memory=0, force_patch_weights=False):
        budget = int(self.model.model_size() * fraction) - self.model.loaded_size()
        return original(self, max(budget, 0.1), force_patch_weights=force_patch_weights)

    comfy.model_management.unload_all_models()
    loaded_model.model_load = model_load
    try:
        yield
    finally:
        loaded_model.model_load = original
        comfy.model_management.unload_all_models()
