"""A style LoRA fitted on one image (DiffStyler §III-C): pure torch, no comfy."""
