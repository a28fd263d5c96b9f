"""What ComfyUI Manager and the Comfy Registry rely on: the metadata, the requirements and the imports."""

import ast
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

import pytest
import torch

import hosts
from conftest import COMFYUI_DIR, PACK_NODE_IDS, REPO

pytestmark = pytest.mark.one_host  # the pack's files, the same on every host

PACKAGES = ("nodes", "attention_patches", "glue", "inversion", "mask")


def test_pyproject_has_what_the_registry_reads():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    meta, comfy = project["project"], project["tool"]["comfy"]
    assert meta["name"] == "style-attention-nodes" and "comfyui" not in meta["name"].lower()
    assert len(meta["version"].split(".")) == 3 and all(part.isdigit() for part in meta["version"].split("."))
    assert meta["urls"]["Repository"].startswith("https://")
    assert meta["license"] and meta["description"]
    assert comfy["PublisherId"] and comfy["DisplayName"] == "Style Attention Nodes"
    oldest, newest = hosts.TESTED_VERSIONS[0], hosts.TESTED_VERSIONS[-1]
    assert comfy["requires-comfyui"] == f">={oldest},<={newest}", "the range make test runs the suite on"
    assert comfy["includes"] == []
    requirements = [line for line in (REPO / "requirements.txt").read_text().splitlines()
                    if line.strip() and not line.startswith("#")]
    assert meta["dependencies"] == requirements


def test_the_pack_imports_only_itself_relatively():
    """Cloned under any folder name, its own modules must be reached by relative imports."""
    own = set(PACKAGES)
    for path in [REPO / "__init__.py", *(p for package in PACKAGES for p in (REPO / package).rglob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module.split(".")[0]]
            else:
                continue
            assert not own & set(names), f"{path.relative_to(REPO)} imports {names} absolutely"
            assert "style_attention_nodes" not in names


def test_the_pack_loads_under_another_folder_name(tmp_path):
    custom_nodes = tmp_path / "custom_nodes"
    custom_nodes.mkdir()
    renamed = custom_nodes / "ComfyUI-Style_Attention.v2 main"
    renamed.symlink_to(REPO, target_is_directory=True)
    script = f"""
import asyncio, sys
sys.path.insert(0, {str(REPO / "scripts")!r})
import comfyui_host
comfyui_host.prepare(cpu=True)
import nodes
assert asyncio.run(nodes.load_custom_node({str(renamed)!r}, module_parent="custom_nodes")), "the pack failed to load"
missing = [i for i in {list(PACK_NODE_IDS)!r} if i not in nodes.NODE_CLASS_MAPPINGS]
assert not missing, missing
print("loaded", len({list(PACK_NODE_IDS)!r}))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            cwd=COMFYUI_DIR)
    assert result.returncode == 0 and f"loaded {len(PACK_NODE_IDS)}" in result.stdout, result.stderr[-3000:]


def test_requirements_install_beside_an_existing_torch_without_touching_it(tmp_path):
    """A fresh venv that sees this one's torch (as a user's ComfyUI venv has it): installing
    requirements.txt must neither install nor change torch."""
    environment = tmp_path / "comfyui-venv"
    venv.create(environment, with_pip=True)
    python = environment / "bin" / "python"
    site = Path(subprocess.check_output([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    (site / "existing-torch.pth").write_text(str(Path(torch.__file__).parents[1]) + "\n")
    before = subprocess.check_output([python, "-c", "import torch; print(torch.__version__)"], text=True).strip()
    assert before == torch.__version__
    install = subprocess.run([python, "-m", "pip", "install", "--quiet", "-r", str(REPO / "requirements.txt")],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    after = subprocess.check_output([python, "-c", "import torch; print(torch.__version__, torch.__file__)"],
                                    text=True).split()
    assert after[0] == before and not after[1].startswith(str(environment)), "requirements.txt changed torch"
    assert not list(site.glob("torch*")), "requirements.txt installed a torch of its own"
