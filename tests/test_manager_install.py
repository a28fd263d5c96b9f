"""Installed the way most users install packs: through ComfyUI-Manager, into an untouched ComfyUI.

ComfyUI 0.8.0 ships the Manager as a PyPI package (manager_requirements.txt: comfyui_manager==4.0.4),
enabled with --enable-manager. Here the Manager's own CLI (`python -m comfyui_manager.cm_cli
install <git url>`, the path its "Install via Git URL" takes: legacy manager_core.gitclone_install)
installs this repository from a local git clone, with the network unreachable (a network namespace
of its own) and the Manager's offline settings; then ComfyUI starts with the Manager and must list
every node of the pack. Whatever the install runs (requirements.txt) must leave torch alone.
"""

import importlib.util
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

import hosts
from comfyui_server import request, running_server
from conftest import COMFYUI_VERSION, PACK_NODE_IDS, REPO

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("comfyui_manager") is None,
                       reason="ComfyUI-Manager is not installed for this host (0.8.0's manager_requirements.txt has it)"),
    pytest.mark.skipif(COMFYUI_VERSION != "0.8.0" or not hosts.ARCHIVE_080.is_file(),
                       reason=f"installs into a fresh ComfyUI 0.8.0 from {hosts.ARCHIVE_080}; this host is {COMFYUI_VERSION}"),
]

# What a user sets for an offline Manager: no channel or registry fetches, pip (uv ignores this
# venv's layering and pip's torch constraint), and the security level that allows git-URL installs.
OFFLINE_CONFIG = "[default]\nnetwork_mode = offline\nsecurity_level = weak\nuse_uv = False\n"


def installed_distributions() -> set[str]:
    """Every distribution this Python sees, with its version and where it lives."""
    import importlib.metadata

    return {f"{d.metadata['Name']}=={d.version}@{d._path}" for d in importlib.metadata.distributions()}


def offline(command: list[str]) -> list[str]:
    """command in a network namespace of its own (nothing but a down loopback), where root may make one."""
    if shutil.which("unshare") and subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0:
        return ["unshare", "-n", *command]
    return command


@pytest.fixture(scope="module")
def fresh_comfyui(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("manager")
    with tarfile.open(hosts.ARCHIVE_080) as archive:
        archive.extractall(root, filter="data")
    comfyui = root / "ComfyUI"
    (comfyui / "user" / "__manager").mkdir(parents=True)
    (comfyui / "user" / "__manager" / "config.ini").write_text(OFFLINE_CONFIG)
    return comfyui


@pytest.fixture(scope="module")
def manager_install(fresh_comfyui, tmp_path_factory):
    """Clones this repository as a user's git remote would hold it, then installs it with the Manager."""
    remote = tmp_path_factory.mktemp("remote") / hosts.PACK_LINK_NAME
    subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(REPO), str(remote)], check=True)
    before = installed_distributions()
    # The Manager takes only URLs with a host: file://localhost/... for a local repository.
    command = [sys.executable, "-m", "comfyui_manager.cm_cli", "install", "--exit-on-fail", f"file://localhost{remote}"]
    result = subprocess.run(offline(command), cwd=fresh_comfyui, capture_output=True, text=True, timeout=300,
                            env={"PATH": "/usr/bin:/bin", "COMFYUI_PATH": str(fresh_comfyui), "HOME": str(fresh_comfyui)})
    return result, before, installed_distributions()


def test_the_manager_installs_the_pack_from_its_git_url(manager_install, fresh_comfyui):
    result, _, _ = manager_install
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "[INSTALLED]" in result.stdout, result.stdout[-3000:]
    installed = fresh_comfyui / "custom_nodes" / hosts.PACK_LINK_NAME
    assert (installed / "__init__.py").is_file() and (installed / ".git").is_dir()


def test_the_install_leaves_torch_and_every_other_package_alone(manager_install):
    _, before, after = manager_install
    assert after == before, f"installed: {sorted(after - before)}, removed: {sorted(before - after)}"
    found = subprocess.check_output([sys.executable, "-c", "import torch; print(torch.__version__, torch.__file__)"],
                                    text=True).split()
    assert found == [torch.__version__, torch.__file__]


def test_comfyui_with_the_manager_lists_every_node_of_the_installed_pack(manager_install, fresh_comfyui, tmp_path):
    log = tmp_path / "comfyui.log"
    with running_server(fresh_comfyui, log, ["--enable-manager"]) as server:
        object_info = request(server.base, "/object_info", timeout=120)
    missing = [node for node in PACK_NODE_IDS if node not in object_info]
    assert not missing, f"missing after a Manager install: {missing}; see {log}"
    module = {object_info[node]["python_module"] for node in PACK_NODE_IDS}
    assert module == {f"custom_nodes.{hosts.PACK_LINK_NAME}"}, module
    text = log.read_text()
    assert "IMPORT FAILED" not in "".join(line for line in text.splitlines() if hosts.PACK_LINK_NAME in line)
    assert "ComfyUI-Manager" in text, "the Manager did not start"
