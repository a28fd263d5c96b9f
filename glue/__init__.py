"""Glue that runs inside ComfyUI's model calls (wrappers, callbacks); it may import comfy."""
