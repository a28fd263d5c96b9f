"""ComfyUI inside this Python process, for the tests, the benchmark, the demo and the docs generator.

ComfyUI comes from COMFYUI_DIR (`make setup` provisions .comfyui/ComfyUI); prepare() makes it
importable the way its main.py sets itself up, before anything imports comfy.
"""

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMFYUI_DIR = Path(os.environ.get("COMFYUI_DIR", REPO / ".comfyui" / "ComfyUI")).resolve()


def prepare(cpu: bool = True) -> None:
    if not (COMFYUI_DIR / "main.py").is_file():
        raise RuntimeError(f"no ComfyUI at {COMFYUI_DIR}; run `make setup` or set COMFYUI_DIR")
    for path in (str(REPO / "scripts"), str(COMFYUI_DIR)):
        if path not in sys.path:
            sys.path.insert(0, path)
    import utils.install_util  # noqa: F401  ComfyUI's utils package, bound before anything shadows it
    import comfy.options

    comfy.options.enable_args_parsing(False)
    from comfy.cli_args import args

    args.cpu = cpu


def pack_module():
    """The pack as ComfyUI's custom-node loader imported it (module name derived from its folder path)."""
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if path and Path(path).resolve() == REPO / "__init__.py":
            return module
    raise RuntimeError("ComfyUI did not import the pack from custom_nodes/")


def pack_submodule(name: str):
    """A module of the pack, e.g. pack_submodule("glue.lora_fit")."""
    return sys.modules[f"{pack_module().__name__}.{name}"]
