"""Fit Style LoRA's inputs and outputs: a made-up style image, a saved LoRA file's tensors and metadata,
and a model's raw prediction to compare models by."""

import torch
from safetensors import safe_open

import comfy.model_management


def style_image(seed=0, height=48, width=64):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, height // 8, width // 8, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear").movedim(1, -1)


def file_tensors(folder, name):
    with safe_open(str(folder / name), framework="pt") as archive:
        return {key: archive.get_tensor(key) for key in archive.keys()}, archive.metadata()


def model_output(model, seed=5, size=8, context_dim=32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, size, size, generator=g)
    context = torch.randn(2, 77, context_dim, generator=g)
    comfy.model_management.load_models_gpu([model])
    with torch.inference_mode():
        return model.model.apply_model(x, torch.tensor([3.0, 0.4]), c_crossattn=context).float().clone()
