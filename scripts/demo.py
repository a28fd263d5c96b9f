"""`make demo`: run the SD1.5 example workflows headless through a real ComfyUI server.

CKPT=/path/to/model.safetensors runs them on your SD1.5 checkpoint, exactly as saved. Without it,
a checkpoint with random weights (generated once) stands in; random weights draw noise, not
pictures, and the demo shrinks the images and steps to keep that quick.
"""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comfyui_host import COMFYUI_DIR, REPO  # noqa: E402
OUTPUT_DIR = REPO / "output"
RANDOM_CHECKPOINT = REPO / ".comfyui" / "RANDOM-WEIGHTS-NOT-A-MODEL-sd15.safetensors"
# Every example workflow for SD1.5: the SDXL ones need an SDXL checkpoint (run them from the frontend).
WORKFLOWS = sorted(path.name for path in (REPO / "example_workflows").glob("*.json") if "sdxl" not in path.stem)

from ui_workflow import schema_inputs, ui_to_api  # noqa: E402


def make_random_checkpoint() -> None:
    if RANDOM_CHECKPOINT.is_file():
        return
    print(f"generating a random-weight SD1.5-shaped checkpoint once: {RANDOM_CHECKPOINT}")
    partial = RANDOM_CHECKPOINT.with_suffix(".partial")
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "import comfyui_host; comfyui_host.prepare(cpu=True)\n"
        "import random_models; random_models.save_demo_sd15_checkpoint(sys.argv[2])\n"
    )
    subprocess.run([sys.executable, "-c", code, str(REPO / "scripts"), str(partial)], check=True)
    partial.rename(RANDOM_CHECKPOINT)


def link_into_checkpoints(checkpoint: Path) -> str:
    folder = COMFYUI_DIR / "models" / "checkpoints"
    link = folder / checkpoint.name
    if not link.exists():
        link.symlink_to(checkpoint.resolve())
    return checkpoint.name


def small_copy_of_input(name: str, side: int) -> str:
    from PIL import Image

    small_name = f"{Path(name).stem}-{side}px.png"
    small = COMFYUI_DIR / "input" / small_name
    if not small.is_file():
        Image.open(COMFYUI_DIR / "input" / name).convert("RGB").resize((side, side)).save(small)
    return small_name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(base: str, path: str, payload: dict | None = None):
    data = json.dumps(payload).encode() if payload is not None else None
    req = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as response:
        return json.loads(response.read())


def start_server(port: int, log_path: Path) -> subprocess.Popen:
    import torch

    command = [sys.executable, "main.py", "--listen", "127.0.0.1", "--port", str(port),
               "--output-directory", str(OUTPUT_DIR), "--disable-auto-launch"]
    if not torch.cuda.is_available():
        command.append("--cpu")
    log = open(log_path, "w")
    server = subprocess.Popen(command, cwd=COMFYUI_DIR, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 180
    while time.time() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"ComfyUI exited during start-up; see {log_path}")
        try:
            request(f"http://127.0.0.1:{port}", "/system_stats")
            return server
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.5)
    server.terminate()
    raise SystemExit(f"ComfyUI did not answer within 180 s; see {log_path}")


def run_workflow(base: str, name: str, checkpoint_name: str, random_weights: bool) -> list[Path]:
    schemas = request(base, "/object_info")
    workflow = json.loads((REPO / "example_workflows" / name).read_text())
    prompt = ui_to_api(workflow, lambda class_type: schema_inputs(schemas[class_type]["input"]))
    for node in prompt.values():
        if node["class_type"] == "CheckpointLoaderSimple":
            node["inputs"]["ckpt_name"] = checkpoint_name
        elif random_weights and node["class_type"] == "EmptyLatentImage":
            node["inputs"].update(width=256, height=256)
        elif random_weights and node["class_type"] in ("KSampler", "DDIMInversion"):
            node["inputs"]["steps"] = 8
        elif random_weights and node["class_type"] == "LoadImage":
            node["inputs"]["image"] = small_copy_of_input(node["inputs"]["image"], 256)
    queued = request(base, "/prompt", {"prompt": prompt, "client_id": str(uuid.uuid4())})
    prompt_id = queued["prompt_id"]
    while True:
        history = request(base, f"/history/{prompt_id}")
        if prompt_id in history:
            break
        time.sleep(0.5)
    entry = history[prompt_id]
    if entry["status"]["status_str"] != "success":
        errors = [m for m in entry["status"]["messages"] if m[0] == "execution_error"]
        raise SystemExit(f"{name} failed: {errors[0][1]['exception_message'] if errors else entry['status']}")
    return [
        OUTPUT_DIR / image["subfolder"] / image["filename"]
        for output in entry["outputs"].values()
        for image in output.get("images", [])
    ]


def main() -> None:
    user_checkpoint = os.environ.get("CKPT")
    if user_checkpoint:
        checkpoint = Path(user_checkpoint).expanduser()
        if not checkpoint.is_file():
            raise SystemExit(f"CKPT={user_checkpoint}: no such file")
    else:
        make_random_checkpoint()
        checkpoint = RANDOM_CHECKPOINT
        print("NOTE: no CKPT given, so the checkpoint has RANDOM WEIGHTS: the images will be noise. The run shows")
        print("      the workflows executing end to end; for real pictures run  make demo CKPT=/path/to/sd15.safetensors")
    checkpoint_name = link_into_checkpoints(checkpoint)
    OUTPUT_DIR.mkdir(exist_ok=True)
    port = free_port()
    log_path = OUTPUT_DIR / "comfyui-demo.log"
    print(f"starting ComfyUI from {COMFYUI_DIR} on 127.0.0.1:{port} (log: {log_path})")
    server = start_server(port, log_path)
    try:
        for name in WORKFLOWS:
            started = time.time()
            images = run_workflow(f"http://127.0.0.1:{port}", name, checkpoint_name, random_weights=not user_checkpoint)
            print(f"{name}: {len(images)} images in {time.time() - started:.1f} s")
            for image in images:
                print(f"  {image}")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
