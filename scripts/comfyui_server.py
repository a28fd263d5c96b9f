"""A real ComfyUI server on 127.0.0.1 in a child process, stopped whatever happens.

Used by the demo, the browser and Manager tests and the workflow tidier. The server is stopped when
the `with` block ends by any path (an exception, a test's timeout, Ctrl-C), and on Linux it also
gets SIGTERM from the kernel if the process that started it dies without cleaning up (SIGKILL, a
killed `make`), so no test leaves a server behind.
"""

import ctypes
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

PR_SET_PDEATHSIG = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(base: str, path: str, payload: dict | None = None, timeout: float = 30):
    data = json.dumps(payload).encode() if payload is not None else None
    req = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as response:
        return json.loads(response.read())


def _die_with_parent() -> None:
    """In the child before exec: the kernel sends SIGTERM when the parent dies."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the with-block's cleanup still applies
        pass


def stop(process: subprocess.Popen, grace: float = 20) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    """SIGTERM to this process raises SystemExit, so `finally` blocks (the server's stop) run."""
    def handler(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass(frozen=True)
class Server:
    base: str  # http://127.0.0.1:port
    pid: int


@contextmanager
def running_server(comfyui_dir: Path, log_path: Path, extra_args: Sequence[str] = (), cpu: bool | None = None,
                   startup_timeout: float = 180) -> Iterator[Server]:
    """Starts ComfyUI's main.py with this Python; yields it once /system_stats answers."""
    if cpu is None:
        import torch

        cpu = not torch.cuda.is_available()
    port = free_port()
    command = [sys.executable, "main.py", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
               *(["--cpu"] if cpu else []), *extra_args]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=comfyui_dir, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + startup_timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited during start-up (code {process.returncode}); see {log_path}")
            try:
                request(base, "/system_stats", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.time() > deadline:
                    raise RuntimeError(f"ComfyUI did not answer within {startup_timeout:.0f} s; see {log_path}")
                time.sleep(0.5)
        yield Server(base, process.pid)
    finally:
        stop(process)
