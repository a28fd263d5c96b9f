"""Sampling and inspection helpers shared by the integration tests (all through real ComfyUI code)."""

import math
from contextlib import contextmanager

import torch

import comfy.patcher_extension
import comfy.sample
import nodes


def run_node(node_id: str, **inputs):
    """Execute one of the pack's nodes and return its outputs as a tuple."""
    return nodes.NODE_CLASS_MAPPINGS[node_id].execute(**inputs).args


def encode(clip, text: str):
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def vsp(model, reference=None, layers="late_self_attention", custom_layers="", strength=1.0, start_percent=0.0,
        end_percent=1.0):
    (patched,) = run_node("VisualStylePrompting", model=model, layers=layers, custom_layers=custom_layers,
                          strength=strength, start_percent=start_percent, end_percent=end_percent,
                          reference=reference)
    return patched


def latent_reference(models, seed=7, prompt="", size=8, reference_seed=3):
    generator = torch.Generator().manual_seed(seed)
    latent = {"samples": torch.randn(1, 4, size, size, generator=generator)}
    (reference,) = run_node("StyleReferenceLatent", latent=latent, clip=models.clip, prompt=prompt,
                            reference_seed=reference_seed)
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
        outputs = {i: executor(model_base, [conds[i]], x_in, timestep, model_options)[0] for i in order}
        return [outputs[i] for i in range(len(conds))]

    clone = model.clone()
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, "test_separate", one_cond_per_call)
    return clone


def self_attention_module(model, layer):
    block, number, index = layer
    unet = model.get_model_object("diffusion_model")
    container = {"input": unet.input_blocks, "middle": [unet.middle_block], "output": unet.output_blocks}[block][
        number if block != "middle" else 0]
    (transformer,) = [m for m in container if hasattr(m, "transformer_blocks")]
    return transformer.transformer_blocks[index]


@contextmanager
def record_self_attention(model, layer):
    """Record, per model call, the q/k/v projections and the attention output (input of to_out) at a layer."""
    block = self_attention_module(model, layer).attn1
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


def attention_by_hand(q, k, v, heads):
    """softmax(q k^T / sqrt(d)) v per head, written out independently of the pack."""
    batch, tokens, inner = q.shape
    d = inner // heads
    qh = q.reshape(batch, tokens, heads, d).permute(0, 2, 1, 3).double()
    kh = k.reshape(k.shape[0], k.shape[1], heads, d).permute(0, 2, 1, 3).double()
    vh = v.reshape(v.shape[0], v.shape[1], heads, d).permute(0, 2, 1, 3).double()
    weights = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1)
    return (weights @ vh).permute(0, 2, 1, 3).reshape(batch, tokens, inner)


def assert_relative_close(actual, expected, tolerance=1e-5):
    """||actual - expected|| <= tolerance * ||expected||: batch layout alone moves float32 results by ~1e-6."""
    error = ((actual.double() - expected.double()).norm() / expected.double().norm()).item()
    assert error <= tolerance, f"relative error {error:.2e} > {tolerance:.0e}"
