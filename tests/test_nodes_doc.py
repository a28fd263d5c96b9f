"""NODES.md is generated from the node schemas; it must match what the nodes say now."""

import subprocess
import sys

import pytest

from conftest import COMFYUI_DIR, REPO

pytestmark = pytest.mark.one_host  # NODES.md is generated on the newest host


def test_nodes_md_is_up_to_date():
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "nodes_doc.py"), "--check"], capture_output=True,
                            text=True, timeout=300, env={"COMFYUI_DIR": str(COMFYUI_DIR), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


def test_nodes_md_documents_every_node_and_input_with_its_tooltip(pack):
    text = (REPO / "NODES.md").read_text()
    for cls in pack.nodes.NODES:
        info = cls.GET_NODE_INFO_V1()
        assert f"(`{info['name']}`)" in text
        for section in ("required", "optional"):
            for name, spec in info["input"].get(section, {}).items():
                assert spec[1].get("tooltip"), f"{info['name']}.{name} has no tooltip"
                assert f"`{name}`" in text
