"""A fitted style LoRA as a standard LoRA file: kohya-style keys that stock LoraLoader reads."""

import json
import os

import torch

from ..safetensors_file import write_atomically

LORA_FORMAT = "style-attention-nodes/style-lora/1"


def lora_tensors(adapters: dict[str, tuple[torch.Tensor, torch.Tensor]], alpha: float) -> dict[str, torch.Tensor]:
    """{file key: (up, down)} -> the file's tensors; the model adds (alpha / rank) * up @ down."""
    tensors = {}
    for key, (up, down) in adapters.items():
        tensors[f"{key}.lora_up.weight"] = up.detach().float()
        tensors[f"{key}.lora_down.weight"] = down.detach().float()
        tensors[f"{key}.alpha"] = torch.tensor(float(alpha))
    return tensors


def free_path(folder: str, prefix: str, suffix: str = ".safetensors") -> str:
    """folder/prefix_00001_<suffix>, with the first counter no file has."""
    stem = os.path.join(folder, prefix)
    counter = 1
    while os.path.exists(f"{stem}_{counter:05}_{suffix}"):
        counter += 1
    return f"{stem}_{counter:05}_{suffix}"


def save_lora(tensors: dict[str, torch.Tensor], folder: str, prefix: str, settings: dict) -> str:
    """Writes a new file (never over an existing one) and returns its path."""
    os.makedirs(os.path.dirname(os.path.join(folder, prefix)) or folder, exist_ok=True)
    metadata = {"format": LORA_FORMAT, "style_attention_nodes": json.dumps(settings),
                "ss_network_dim": str(settings["rank"]), "ss_network_alpha": str(settings["alpha"])}
    while True:
        path = free_path(folder, prefix)
        try:
            write_atomically(tensors, path, metadata, overwrite=False)
            return path
        except FileExistsError:  # another writer took this counter meanwhile
            continue
