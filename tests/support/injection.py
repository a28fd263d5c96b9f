"""Style Injection (DiffStyler part 2) of a DDIM-inverted content, and sampling from the content's
inverted latent on the inversion's schedule."""

import torch

import comfy.sample
from helpers import encode, invert, run_node

STEPS = 4


def inject(model, trajectory=None, clip=None, conditioning=None, feature_fraction=0.6, attention_fraction=0.5,
           attention_sites="plug_and_play", custom_attention_sites="", feature_sites="plug_and_play",
           custom_feature_sites="", cache_megabytes=0, content_features=None, cross_attention=False):
    (patched,) = run_node("StyleInjection", model=model, inversion=trajectory, content_features=content_features,
                          clip=clip, source_prompt="",
                          feature_fraction=feature_fraction, attention_fraction=attention_fraction,
                          attention_sites=attention_sites, custom_attention_sites=custom_attention_sites,
                          feature_sites=feature_sites, custom_feature_sites=custom_feature_sites,
                          cross_attention=cross_attention, cache_megabytes=cache_megabytes, cache_on_cpu=False, conditioning=conditioning)
    return patched


def content(models, seed=11, size=8, steps=STEPS):
    latent = torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(seed))
    empty = encode(models.clip, "")
    inverted, trajectory = invert(models.model, latent, empty, empty, steps=steps, scheduler="ddim_uniform")
    return latent, inverted["samples"], trajectory


def sample_from(model, start, positive, negative, steps=STEPS, cfg=4.0, batch=1):
    """KSampler (Advanced) with add_noise off, from the inverted latent, on the inversion's schedule."""
    start = start.expand(max(batch, start.shape[0]), -1, -1, -1)
    return comfy.sample.sample(model, torch.zeros_like(start), steps, cfg, "euler", "ddim_uniform", positive, negative,
                               start, disable_noise=True, disable_pbar=True, seed=0)
