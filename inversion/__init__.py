"""Recovering what reproduces an image: latents (DDIM inversion), weights (a style LoRA), embeddings
(StyleDiffusion's value-input mapping). Pure torch; nothing here imports ComfyUI. Filled by the
inversion, DiffStyler and StyleDiffusion work."""
