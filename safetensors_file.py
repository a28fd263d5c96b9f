"""Writing .safetensors files so that a reader never sees half of one (pure: no comfy)."""

import os

import torch
from safetensors.torch import save_file


def write_atomically(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str],
                     overwrite: bool = True) -> None:
    """Writes beside path and moves the file into place: a failed write (or an interrupt) leaves no
    partial file. With overwrite False an existing path is an error and is left as it was."""
    partial = f"{path}.partial"
    try:
        save_file({name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()}, partial,
                  metadata=metadata)
        if overwrite:
            os.replace(partial, path)
        else:
            _move_into_free_path(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def _move_into_free_path(partial: str, path: str) -> None:
    try:
        os.link(partial, path)  # fails if path exists, where a rename would replace it
    except FileExistsError:
        raise
    except OSError:  # no hard links on this file system (FAT, some network shares): check, then rename
        if os.path.exists(path):
            raise FileExistsError(path) from None
        os.replace(partial, path)
