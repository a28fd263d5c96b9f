"""A test or script that starts a ComfyUI server stops it whatever happens: an exception in the
`with` block, Ctrl-C, SIGTERM, or the starting process killed outright (a test's timeout)."""

import signal
import subprocess
import sys
import time

import pytest

from comfyui_server import running_server
from conftest import COMFYUI_DIR, REPO

pytestmark = pytest.mark.end_to_end

# A process that starts the server, says its pid and then waits to be stopped.
HOLDER = f"""
import sys, time
sys.path.insert(0, {str(REPO / "scripts")!r})
from comfyui_server import running_server, terminate_on_sigterm
with terminate_on_sigterm(), running_server({str(COMFYUI_DIR)!r}, __import__("pathlib").Path(sys.argv[1])) as server:
    print(server.pid, flush=True)
    time.sleep(600)
"""


def gone(pid: int, within: float = 30) -> bool:
    """True once pid is no process (or a zombie, which holds no port or memory) any more."""
    deadline = time.time() + within
    while time.time() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.2)
    return False


def test_an_exception_in_the_block_stops_the_server(tmp_path):
    with pytest.raises(RuntimeError, match="the test failed here"):
        with running_server(COMFYUI_DIR, tmp_path / "comfyui.log") as server:
            pid = server.pid
            raise RuntimeError("the test failed here")
    assert gone(pid, within=1)


@pytest.mark.parametrize("sent", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_the_server_dies_with_the_process_that_started_it(tmp_path, sent):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "comfyui.log")], stdout=subprocess.PIPE,
                              text=True)
    try:
        line = holder.stdout.readline()
        assert line.strip(), (tmp_path / "comfyui.log").read_text()[-3000:]
        pid = int(line)
        assert not gone(pid, within=0.5), "the server should be running"
        holder.send_signal(sent)
        holder.wait(timeout=60)
        assert gone(pid), f"the server outlived its starter after {sent.name}"
    finally:
        holder.kill()
        holder.wait()
